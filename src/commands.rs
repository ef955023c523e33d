//! What `main` runs: the agent, or one of the one-shot commands (`check`, `render`,
//! `explain`, `status`, `cleanup`, `windows-cni`, `version`).

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use crate::agent::Settings;
use crate::backend::{iptables, nftables, windows};
use crate::cli::{Cli, Command};
use crate::config;
use crate::kernel::SystemRunner;
use crate::observe::logging;
use crate::policy::{Decision, Family, KeepReason, Policy};
use crate::survey::precedence::Survey;

/// Runs what the command line asks for.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.version.as_deref() {
        Some("raw") => {
            println!("{}", version_raw());
            return Ok(ExitCode::SUCCESS);
        }
        Some("true" | "1" | "t" | "T" | "TRUE" | "True") => {
            println!("{}", version_line());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let settings = cli.agent.settings();
    let done = ExitCode::SUCCESS;
    match &cli.command {
        Some(Command::Version) => {
            println!("{}", version_line());
            Ok(done)
        }
        Some(Command::Check { file }) => Ok(check(
            &settings,
            file.as_deref().unwrap_or(settings.config.path()),
        )),
        Some(Command::Render) => render(&settings).map(|()| done),
        Some(Command::Cleanup) => cleanup(&settings).map(|()| done),
        Some(Command::Explain { from, addresses }) => {
            explain(&settings, *from, addresses).map(|()| done)
        }
        Some(Command::Status) => status(&settings),
        Some(Command::WindowsCni { cni_conf }) => windows_cni(&settings, cni_conf).map(|()| done),
        None => {
            logging::init(cli.klog.verbosity, cli.agent.log_format);
            tracing::info!("{}", version_line());
            let ignored = cli.klog.ignored();
            if !ignored.is_empty() {
                tracing::info!(
                    "accepted klog flags that have no effect here: {}",
                    ignored.join(" ")
                );
            }
            crate::agent::wiring::run(settings).map(|()| done)
        }
    }
}

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

pub fn version_line() -> String {
    format!("ip-masq-agent v{VERSION}")
}

pub fn version_raw() -> String {
    format!(
        "ip-masq-agent v{VERSION} (rust, {} {})",
        std::env::consts::OS,
        std::env::consts::ARCH
    )
}

/// Validates a config file, or a `--config-dir` style directory: warnings and the
/// verdict on stdout, the error on stderr.
pub fn check(settings: &Settings, file: &Path) -> ExitCode {
    let loaded = if file.is_dir() {
        config::load_dir(file, settings.parse_options)
    } else {
        config::load(file, settings.parse_options)
    };
    match loaded {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                println!("warning: {warning}");
            }
            match loaded.source {
                config::ConfigSource::Missing(_) => {
                    println!(
                        "{}: no such file; the agent would use the defaults",
                        file.display()
                    )
                }
                config::ConfigSource::Dir(_, ref files) => println!(
                    "{}: OK, {} file(s) merged ({} nonMasqueradeCIDRs, resyncInterval {:?})",
                    file.display(),
                    files.len(),
                    loaded.config.non_masquerade_cidrs.len(),
                    loaded.config.resync_interval
                ),
                config::ConfigSource::File(_) => println!(
                    "{}: OK ({} nonMasqueradeCIDRs, resyncInterval {:?})",
                    file.display(),
                    loaded.config.non_masquerade_cidrs.len(),
                    loaded.config.resync_interval
                ),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Prints the payload the chosen backend would write for the config (auto renders
/// iptables: deciding auto needs to look at the host).
pub fn render(settings: &Settings) -> anyhow::Result<()> {
    let loaded = settings.load_config()?;
    for warning in &loaded.warnings {
        eprintln!("warning: {warning}");
    }
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    let text = crate::backend::render(settings.backend, &policy, &settings.chain);
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(())
}

/// Removes everything the agent installs and says what it removed.
pub fn cleanup(settings: &Settings) -> anyhow::Result<()> {
    let removed = crate::backend::cleanup_everything(&settings.chain, &SystemRunner::shared())?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for place in removed {
        println!("removed the agent's rules from {place}");
    }
    Ok(())
}

/// One line per address: the verdict, the prefix and list that decide it and the one it
/// beat, the source scope, and the rule behind it in both backends' terms.
pub fn explain_lines(
    policy: &Policy,
    chain: &crate::backend::ChainName,
    source: Option<IpAddr>,
    addresses: &[String],
) -> Vec<String> {
    addresses
        .iter()
        .map(|text| {
            let Ok(ip) = text.parse::<IpAddr>() else {
                return format!("{text}: not an IP address");
            };
            let family = Family::of_addr(ip);
            let family_policy = policy.family(family);
            let source = source.filter(|s| Family::of_addr(*s) == family);
            let why = policy.explain(source, ip);
            let rules = format!(
                "iptables: {}; nftables: {}",
                iptables::explain(family_policy, &why.decision, source, ip, chain),
                nftables::explain(family_policy, &why.decision, family)
            );
            let beat = why
                .runner_up
                .map(|r| format!(" (the most specific match: it beats {} from {})", r.prefix, r.list))
                .unwrap_or_default();
            let scope = match (why.source_in_scope, source) {
                (Some(true), Some(s)) => format!("; source {s} is in masqueradeSourceCIDRs"),
                (Some(false), Some(s)) => format!("; source {s} is outside masqueradeSourceCIDRs"),
                _ => String::new(),
            };
            let verdict = match why.decision {
                Decision::Keep { prefix, reason: KeepReason::LinkLocal } => format!(
                    "not masqueraded (keeps the pod address): link-local {prefix} (masqLinkLocal{} is false){beat}",
                    if ip.is_ipv4() { "" } else { "IPv6" }
                ),
                Decision::Keep { prefix, reason: KeepReason::NonMasqueradeCidr } => format!(
                    "not masqueraded (keeps the pod address): nonMasqueradeCIDRs entry {prefix}{beat}"
                ),
                Decision::Forced { prefix } => format!(
                    "MASQUERADED (leaves with the node address): forceMasqueradeCIDRs entry {prefix}{beat}"
                ),
                Decision::Masquerade => "MASQUERADED (leaves with the node address): no nonMasqueradeCIDRs entry contains it".to_string(),
                Decision::SourceOutOfScope => {
                    let would = why.deciding.map(|m| format!(", although {} from {} would masquerade it", m.prefix, m.list)).unwrap_or_default();
                    format!("not masqueraded (keeps its source): the source is outside masqueradeSourceCIDRs{would}")
                }
                Decision::Unmanaged => {
                    return format!(
                        "{ip}: not handled by the agent: IPv6 rules are only written with --enable-ipv6"
                    );
                }
            };
            format!("{ip}: {verdict}{scope}; {rules}")
        })
        .collect()
}

/// `explain [--from SRC] IP...`: the verdict for each address under the current config.
/// A local destination of the node is never masqueraded; this answers for remote ones.
pub fn explain(
    settings: &Settings,
    source: Option<IpAddr>,
    addresses: &[String],
) -> anyhow::Result<()> {
    let loaded = settings.load_config()?;
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    for line in explain_lines(&policy, &settings.chain, source, addresses) {
        println!("{line}");
    }
    Ok(())
}

/// `status`: reads the kernel's rules and compares them with the config.
pub fn status(settings: &Settings) -> anyhow::Result<ExitCode> {
    let loaded = settings.load_config()?;
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    let runner = SystemRunner::shared();
    let (mut backend, _) = crate::backend::build(
        settings.backend,
        &settings.chain,
        settings.iptables_mode,
        settings.policy_settings.enable_ipv6,
        &runner,
    )?;
    let diff = backend.diff(&policy)?;
    for note in backend.read_notes() {
        println!("note: {note}");
    }
    let code = if diff.is_empty() {
        println!("in sync: the {} rules match the config", backend.describe());
        ExitCode::SUCCESS
    } else {
        println!(
            "out of sync: the {} rules differ from the config",
            backend.describe()
        );
        for line in diff {
            println!("  {line}");
        }
        ExitCode::FAILURE
    };
    // Informational: the exit code says only whether the agent's own rules match.
    if let Some(survey) = crate::survey::survey_srcnat(backend.as_ref(), &policy, &runner) {
        for line in preceding_lines(&survey) {
            println!("{line}");
        }
    }
    Ok(code)
}

/// `status`'s report of the NAT rules that act before the agent's.
pub fn preceding_lines(survey: &Survey) -> Vec<String> {
    let (expected, unexpected) = survey.counts();
    let mut lines = Vec::new();
    if expected + unexpected == 0 {
        lines.push("no NAT rule of others acts before the agent's on srcnat".to_string());
    } else {
        lines.push(format!(
            "NAT rules that act before the agent's on srcnat: {} ({expected} expected)",
            expected + unexpected
        ));
    }
    for rule in &survey.rules {
        lines.push(format!("  {} {}:", rule.place, rule.position));
        lines.push(format!("      {}", rule.rule));
        if let Some(via) = &rule.via {
            lines.push(format!("      -> {via}"));
        }
        lines.push(format!("      {}", rule.effect));
    }
    if survey.omitted > 0 {
        lines.push(format!("  ... and {} more", survey.omitted));
    }
    if !survey.read.is_empty() {
        lines.push(format!("surveyed: {}", survey.read.join(", ")));
    }
    for note in &survey.notes {
        lines.push(format!("not surveyed: {note}"));
    }
    lines
}

/// `windows-cni --cni-conf PATH`: rewrites the OutBoundNAT exception list in place.
pub fn windows_cni(settings: &Settings, cni_conf: &Path) -> anyhow::Result<()> {
    let loaded = settings.load_config()?;
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    let list = windows::exception_list(&policy);
    if policy.families.iter().any(|f| f.sources.is_some()) {
        eprintln!(
            "warning: masqueradeSourceCIDRs cannot be expressed in the OutBoundNAT exception list; it is ignored on Windows nodes"
        );
    }
    if windows::rewrite_file(cni_conf, &list)? {
        println!(
            "{}: exception list set to {}",
            cni_conf.display(),
            list.join(", ")
        );
    } else {
        println!("{}: exception list already up to date", cni_conf.display());
    }
    Ok(())
}
