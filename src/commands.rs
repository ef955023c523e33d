//! The one-shot commands: `check`, `render`, `version`. None needs root.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use crate::backend::iptables::IptablesBackend;
use crate::backend::nftables::NftablesBackend;
use crate::backend::{Backend, BackendChoice};
use crate::cli::Settings;
use crate::config;
use crate::policy::Policy;

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
    let backend: Box<dyn Backend> = match settings.backend {
        BackendChoice::Nftables => Box::new(NftablesBackend::for_rendering()),
        BackendChoice::Iptables | BackendChoice::Auto => {
            Box::new(IptablesBackend::for_rendering(settings.chain.clone()))
        }
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(backend.render(&policy).as_bytes())?;
    Ok(())
}

/// Removes everything the agent installs and says what it removed.
pub fn cleanup(settings: &Settings) -> anyhow::Result<()> {
    let removed = crate::backend::cleanup_everything(&settings.chain)?;
    if removed.is_empty() {
        println!("nothing to remove");
    }
    for place in removed {
        println!("removed the agent's rules from {place}");
    }
    Ok(())
}
