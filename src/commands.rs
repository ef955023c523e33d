//! What `main` runs: the agent, or one of the one-shot commands (`check`, `render`,
//! `explain`, `status`, `cleanup`, `windows-cni`, `version`).

use std::fmt::Arguments;
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use crate::agent::Settings;
use crate::backend::{iptables, nftables, windows};
use crate::cli::{Cli, Command};
use crate::config::{self, quote, source::ConfigPath};
use crate::kernel::SystemRunner;
use crate::observe::logging;
use crate::policy::{Decision, Family, InterfaceCheck, KeepReason, Policy};
use crate::survey::precedence::Survey;

/// Standard output was closed by the reader (`status | head -2`): the command stops
/// writing and ends quietly, as a tool that SIGPIPE ends would.
#[derive(Debug, thiserror::Error)]
#[error("standard output is closed")]
pub struct StdoutClosed;

/// The exit status after [`StdoutClosed`]: 128 + SIGPIPE, what a shell shows for a tool
/// that SIGPIPE ended (`cat`, `grep`).
pub const STDOUT_CLOSED_STATUS: u8 = 128 + 13;

/// Writes `text` to standard output; a closed pipe becomes [`StdoutClosed`] (the Rust
/// runtime ignores SIGPIPE, so the write fails with EPIPE, which `println!` turns into a
/// panic).
pub fn write_out(text: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let written = out.write_all(text).and_then(|()| out.flush());
    match written {
        Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(err) => Err(anyhow::Error::new(err).context("writing to standard output")),
        Ok(()) => Ok(()),
    }
}

/// One line to standard output (see [`write_out`]).
fn out_line(line: Arguments) -> anyhow::Result<()> {
    write_out(format!("{line}\n").as_bytes())
}

/// One line to standard error; a closed standard error is not worth failing for.
pub fn err_line(line: Arguments) {
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

macro_rules! say {
    ($($arg:tt)*) => {
        out_line(format_args!($($arg)*))?
    };
}

macro_rules! complain {
    ($($arg:tt)*) => {
        err_line(format_args!($($arg)*))
    };
}

/// Runs what the command line asks for.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.version.as_deref() {
        Some("raw") => {
            say!("{}", version_raw());
            return Ok(ExitCode::SUCCESS);
        }
        Some("true" | "1" | "t" | "T" | "TRUE" | "True") => {
            say!("{}", version_line());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let settings = cli.agent.settings();
    let done = ExitCode::SUCCESS;
    match &cli.command {
        Some(Command::Version) => {
            say!("{}", version_line());
            Ok(done)
        }
        Some(Command::Check { file }) => check(&settings, file.as_deref()),
        Some(Command::Render) => render(&settings).map(|()| done),
        Some(Command::Cleanup) => cleanup(&settings).map(|()| done),
        Some(Command::Explain {
            from,
            out,
            addresses,
        }) => explain(&settings, *from, out.as_deref(), addresses),
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

/// What the agent started with the same flags would read: `path` stands for
/// `--config-dir`'s directory when that flag is given, for `--config` otherwise.
pub fn checked_source(settings: &Settings, path: Option<&Path>) -> ConfigPath {
    match (&settings.config, path) {
        (ConfigPath::Dir(_), Some(path)) => ConfigPath::Dir(path.to_path_buf()),
        (ConfigPath::File(_), Some(path)) => ConfigPath::File(path.to_path_buf()),
        (own, None) => own.clone(),
    }
}

/// Validates the config the agent with the same flags would read (a file, or with
/// `--config-dir` a directory), and says what the agent would do: warnings and the
/// verdict on stdout, the error on stderr and exit status 1 where the agent would
/// reject it.
pub fn check(settings: &Settings, path: Option<&Path>) -> anyhow::Result<ExitCode> {
    let source = checked_source(settings, path);
    let shown = quote::path(source.path());
    match source.load(settings.parse_options) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                say!("warning: {warning}");
            }
            match loaded.source {
                config::ConfigSource::Missing(_) if matches!(source, ConfigPath::Dir(_)) => {
                    say!(
                        "{shown}: no {}* file in the directory; the agent would use the defaults",
                        config::source::DIR_FILE_PREFIX
                    )
                }
                config::ConfigSource::Missing(_) => {
                    say!("{shown}: no such file; the agent would use the defaults")
                }
                config::ConfigSource::Dir(_, ref files) => say!(
                    "{shown}: OK, {} file(s) merged ({} nonMasqueradeCIDRs, resyncInterval {:?})",
                    files.len(),
                    loaded.config.non_masquerade_cidrs.len(),
                    loaded.config.resync_interval
                ),
                config::ConfigSource::File(_) => say!(
                    "{shown}: OK ({} nonMasqueradeCIDRs, resyncInterval {:?})",
                    loaded.config.non_masquerade_cidrs.len(),
                    loaded.config.resync_interval
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(err) => {
            complain!("error: {err}");
            if matches!(source, ConfigPath::File(_)) && source.path().is_dir() {
                complain!(
                    "note: the agent reads --config as one file; to check a directory of {}* files as --config-dir reads it, run: ip-masq-agent check --config-dir {shown}",
                    config::source::DIR_FILE_PREFIX
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Prints the payload the chosen backend would write for the config (auto renders
/// iptables: deciding auto needs to look at the host).
pub fn render(settings: &Settings) -> anyhow::Result<()> {
    let loaded = settings.load_config()?;
    for warning in &loaded.warnings {
        complain!("warning: {warning}");
    }
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    let text = crate::backend::render(settings.backend, &policy, &settings.chain);
    write_out(text.as_bytes())
}

/// Removes everything the agent installs and says what it removed.
pub fn cleanup(settings: &Settings) -> anyhow::Result<()> {
    let removed = crate::backend::cleanup_everything(&settings.chain, &SystemRunner::shared())?;
    if removed.is_empty() {
        say!("nothing to remove");
    }
    for place in removed {
        say!("removed the agent's rules from {place}");
    }
    Ok(())
}

/// One line per address: the verdict, the prefix and list that decide it and the one it
/// beat, the source scope, and the rule behind it in both backends' terms; `Err` with
/// the reason for an argument that is not an address.
pub fn explain_lines(
    policy: &Policy,
    chain: &crate::backend::ChainName,
    source: Option<IpAddr>,
    interface: Option<&str>,
    addresses: &[String],
) -> Vec<Result<String, String>> {
    addresses
        .iter()
        .map(|text| {
            let Ok(ip) = text.parse::<IpAddr>() else {
                return Err(format!("{} is not an IP address", quote::quoted(text)));
            };
            let family = Family::of_addr(ip);
            let family_policy = policy.family(family);
            // A packet has one family: a source of the other one cannot send to `ip`, so
            // the scope is not applied, and the line says so.
            let other_family_source = source.filter(|s| Family::of_addr(*s) != family);
            let source = source.filter(|s| Family::of_addr(*s) == family);
            let why = policy.explain_via(source, ip, interface);
            let rules = format!(
                "iptables: {}; nftables: {}",
                iptables::explain(family_policy, &why.decision, source, ip, chain),
                nftables::explain(family_policy, &why.decision, family)
            );
            let beat = why
                .runner_up
                .map(|r| format!(" (the most specific match: it beats {} from {})", r.prefix, r.list))
                .unwrap_or_default();
            let scope = match (why.source_in_scope, source, other_family_source) {
                (Some(true), Some(s), _) => format!("; source {s} is in masqueradeSourceCIDRs"),
                (Some(false), Some(s), _) => format!("; source {s} is outside masqueradeSourceCIDRs"),
                (_, _, Some(other)) => other_family_note(other, ip),
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
                    "MASQUERADED ({}): forceMasqueradeCIDRs entry {prefix}{beat}",
                    leaves_with(family_policy)
                ),
                Decision::Masquerade => format!(
                    "MASQUERADED ({}): no nonMasqueradeCIDRs entry contains it",
                    leaves_with(family_policy)
                ),
                Decision::OtherInterface => {
                    let listed = policy
                        .out_interfaces
                        .as_deref()
                        .map(list_interfaces)
                        .unwrap_or_default();
                    format!(
                        "not masqueraded (keeps the pod address): it leaves through {}, which outputInterface ({listed}) does not list{}",
                        quote::quoted(interface.unwrap_or_default()),
                        why.deciding
                            .map(|m| format!("; {} from {} alone would masquerade it", m.prefix, m.list))
                            .unwrap_or_default()
                    )
                }
                Decision::SourceOutOfScope => {
                    let would = why.deciding.map(|m| format!(", although {} from {} would masquerade it", m.prefix, m.list)).unwrap_or_default();
                    format!("not masqueraded (keeps its source): the source is outside masqueradeSourceCIDRs{would}")
                }
                Decision::Unmanaged => {
                    return Ok(format!(
                        "{ip}: not handled by the agent: IPv6 rules are only written with --enable-ipv6{scope}"
                    ));
                }
            };
            let egress = match &why.interface {
                Some(InterfaceCheck::Listed(pattern)) => format!(
                    "; it leaves through {}, which outputInterface lists ({pattern})",
                    quote::quoted(interface.unwrap_or_default())
                ),
                Some(InterfaceCheck::Only(listed)) => format!(
                    "; only when it leaves through {} (outputInterface; --out IFACE says for one interface)",
                    list_interfaces(listed)
                ),
                Some(InterfaceCheck::NotListed) | None => String::new(),
            };
            Ok(format!("{ip}: {verdict}{scope}{egress}; {rules}"))
        })
        .collect()
}

/// What a masqueraded packet leaves with: the node's address, or outputAddress.
fn leaves_with(family: Option<&crate::policy::FamilyPolicy>) -> String {
    match family.and_then(|f| f.snat_to.as_ref()) {
        Some(to) if to.is_ipv6() => format!("SNAT to {to}, outputAddressIPv6"),
        Some(to) => format!("SNAT to {to}, outputAddress"),
        None => "leaves with the node address".to_string(),
    }
}

fn list_interfaces(list: &[crate::config::egress::InterfacePattern]) -> String {
    if list.is_empty() {
        return "none".to_string();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// `--from` names an address of the other family than the destination's.
fn other_family_note(source: IpAddr, destination: IpAddr) -> String {
    let (source_family, destination_family) = match destination {
        IpAddr::V4(_) => ("IPv6", "IPv4"),
        IpAddr::V6(_) => ("IPv4", "IPv6"),
    };
    let mapped = match source {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(|v4| {
                format!(" (an IPv4-mapped IPv6 address; for the IPv4 source write --from {v4})")
            })
            .unwrap_or_default(),
        IpAddr::V4(_) => String::new(),
    };
    format!(
        "; the source {source} is {source_family}{mapped} and cannot send to the {destination_family} {destination}, so masqueradeSourceCIDRs is not checked: this is the answer for any {destination_family} source in scope"
    )
}

/// `explain [--from SRC] IP...`: the verdict for each address under the current config.
/// A local destination of the node is never masqueraded; this answers for remote ones.
/// An argument that is not an address is said on stderr and makes the exit status 1.
pub fn explain(
    settings: &Settings,
    source: Option<IpAddr>,
    interface: Option<&str>,
    addresses: &[String],
) -> anyhow::Result<ExitCode> {
    let loaded = settings.load_config()?;
    let policy = Policy::new(&loaded.config, &settings.policy_settings);
    let mut code = ExitCode::SUCCESS;
    if let Some(name) = interface {
        match crate::config::egress::parse_interface(name) {
            Err(problem) => anyhow::bail!("--out: {problem}"),
            Ok(pattern) if pattern.prefix().1 => anyhow::bail!(
                "--out: {} is a pattern; name the one interface the packet leaves by",
                quote::quoted(name)
            ),
            Ok(_) => {}
        }
    }
    for line in explain_lines(&policy, &settings.chain, source, interface, addresses) {
        match line {
            Ok(line) => say!("{line}"),
            Err(problem) => {
                complain!("error: {problem}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
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
    let diff = match backend.diff(&policy) {
        Ok(diff) => diff,
        // What the agent cannot read is reported with what acts before it (the rules it
        // cannot read are often those), and the exit code says the rules are not known good.
        Err(err @ crate::backend::SyncError::Unreadable(_)) => {
            complain!("error: {err}");
            if let Some(survey) = crate::survey::survey_srcnat(backend.as_ref(), &policy, &runner) {
                for line in preceding_lines(&survey) {
                    say!("{line}");
                }
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(err) => return Err(err.into()),
    };
    for note in backend.read_notes() {
        println!("note: {note}");
    }
    let code = if diff.is_empty() {
        say!("in sync: the {} rules match the config", backend.describe());
        ExitCode::SUCCESS
    } else {
        say!(
            "out of sync: the {} rules differ from the config",
            backend.describe()
        );
        for line in diff {
            say!("  {line}");
        }
        ExitCode::FAILURE
    };
    // Informational, as the survey below: what outputInterface/outputAddress meet here.
    for line in crate::agent::egress::check(&policy, &runner).lines() {
        say!("{line}");
    }
    // Informational: the exit code says only whether the agent's own rules match.
    if let Some(survey) = crate::survey::survey_srcnat(backend.as_ref(), &policy, &runner) {
        for line in preceding_lines(&survey) {
            say!("{line}");
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
    let following = survey.following();
    let before: Vec<_> = survey
        .rules
        .iter()
        .filter(|r| r.order != crate::survey::precedence::Order::After)
        .collect();
    let after: Vec<_> = survey
        .rules
        .iter()
        .filter(|r| r.order == crate::survey::precedence::Order::After)
        .collect();
    let mut rules = before;
    if following > 0 {
        rules.extend(after);
    }
    for (at, rule) in rules.into_iter().enumerate() {
        if following > 0 && at == survey.rules.len() - following {
            lines.push(format!(
                "NAT rules that act after the agent's on srcnat and can NAT what it keeps: {following}"
            ));
        }
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
        complain!(
            "warning: masqueradeSourceCIDRs cannot be expressed in the OutBoundNAT exception list; it is ignored on Windows nodes"
        );
    }
    if policy.out_interfaces.is_some() {
        complain!(
            "warning: outputInterface cannot be expressed in the OutBoundNAT exception list; it is ignored on Windows nodes (every interface is masqueraded)"
        );
    }
    if policy.families.iter().any(|f| f.snat_to.is_some()) {
        complain!(
            "warning: outputAddress cannot be expressed in the OutBoundNAT exception list; it is ignored on Windows nodes (the host's own address is used)"
        );
    }
    if windows::rewrite_file(cni_conf, &list)? {
        say!(
            "{}: exception list set to {}",
            quote::path(cni_conf),
            list.join(", ")
        );
    } else {
        say!(
            "{}: exception list already up to date",
            quote::path(cni_conf)
        );
    }
    Ok(())
}
