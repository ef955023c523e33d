use std::process::ExitCode;
use std::sync::{Arc, mpsc};

use anyhow::Context;
use ip_masq_agent::agent::{Agent, Event};
use ip_masq_agent::backend::dry_run::DryRunBackend;
use ip_masq_agent::backend::{self, Backend};
use ip_masq_agent::cli::{Cli, Command, Settings};
use ip_masq_agent::telemetry::Telemetry;
use ip_masq_agent::{commands, http, logging, watch};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

fn main() -> ExitCode {
    let cli = match Cli::parse_go_style(std::env::args_os()) {
        Ok(cli) => cli,
        Err(err) => {
            let _ = err.print();
            return ExitCode::from(2);
        }
    };
    match &cli.version.as_deref() {
        Some("raw") => {
            println!("{}", commands::version_raw());
            return ExitCode::SUCCESS;
        }
        Some("true") | Some("1") | Some("t") | Some("T") | Some("TRUE") | Some("True") => {
            println!("{}", commands::version_line());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let settings = cli.agent.settings();
    let result = match &cli.command {
        Some(Command::Version) => {
            println!("{}", commands::version_line());
            return ExitCode::SUCCESS;
        }
        Some(Command::Check { file }) => {
            return commands::check(&settings, file.as_ref().unwrap_or(&settings.config_path));
        }
        Some(Command::Render) => commands::render(&settings),
        Some(Command::Cleanup) => commands::cleanup(&settings),
        Some(Command::Explain { addresses }) => commands::explain(&settings, addresses),
        Some(Command::Status) => match commands::status(&settings) {
            Ok(code) => return code,
            Err(err) => Err(err),
        },
        Some(Command::WindowsCni { cni_conf }) => commands::windows_cni(&settings, cni_conf),
        None => run_agent(&cli, settings),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ip-masq-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_agent(cli: &Cli, settings: Settings) -> anyhow::Result<()> {
    logging::init(cli.klog.verbosity, cli.agent.log_format);
    tracing::info!("{}", commands::version_line());
    let ignored = cli.klog.ignored();
    if !ignored.is_empty() {
        tracing::info!(
            "accepted klog flags that have no effect here: {}",
            ignored.join(" ")
        );
    }
    backend::command::set_tool_timeout(settings.tool_timeout);
    let chosen = backend::build(
        settings.backend,
        &settings.chain,
        settings.iptables_mode,
        settings.policy_settings.enable_ipv6,
    )?;
    let backend: Box<dyn Backend> = if settings.dry_run {
        Box::new(DryRunBackend::new(chosen))
    } else {
        chosen
    };

    let (sender, events) = mpsc::channel();
    let sender_for_watch = sender.clone();
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    // Dry run never writes, not even the removal on exit.
    let cleanup_on_exit = settings.cleanup_on_exit && !settings.dry_run;
    if settings.cleanup_on_exit && settings.dry_run {
        tracing::info!("dry run: --cleanup-on-exit will not remove anything");
    }
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for signal in signals.forever() {
                let event = match signal {
                    SIGHUP => Event::Reload("SIGHUP"),
                    SIGINT => Event::Shutdown("SIGINT"),
                    _ => Event::Shutdown("SIGTERM"),
                };
                if let Event::Shutdown(why) = event {
                    // A tool that hangs is killed now rather than at its deadline.
                    backend::command::request_stop();
                    if !cleanup_on_exit {
                        exit_soon_whatever_happens(why);
                    }
                }
                if sender.send(event).is_err() {
                    return;
                }
            }
        })
        .context("starting the signal thread")?;

    // Kept alive for the whole run; without a directory the resync timer is the backstop.
    let config_dir = settings.watched_dir();
    let _watcher =
        match watch::watch_config_dir(&config_dir, settings.watch_interest(), sender_for_watch) {
            Ok(watcher) => Some(watcher),
            Err(err) => {
                tracing::warn!(
                    "cannot watch {} ({err}); config changes are picked up every resyncInterval",
                    config_dir.display()
                );
                None
            }
        };
    let telemetry = Arc::new(Telemetry::new());
    telemetry.set_sync_deadline(settings.tool_timeout);
    if let Some(address) = settings.metrics_address {
        // No `?`: a taken port or a failing HTTP thread must not keep the rules from being
        // written; serve logs such failures and retries the bind on its own thread.
        http::serve(address, telemetry.clone());
    }
    let cleanup_chain = cleanup_on_exit.then(|| settings.chain.clone());
    Agent::new(settings, backend)
        .with_telemetry(telemetry)
        .run(&events);
    if let Some(chain) = cleanup_chain {
        // The one step that still runs tools after a stop was asked for.
        backend::command::clear_stop();
        for place in backend::cleanup_everything(&chain).context("cleaning up on exit")? {
            tracing::info!("removed the agent's rules from {place}");
        }
    }
    Ok(())
}

/// How long the main loop gets to notice a SIGTERM before the process exits anyway.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(800);

/// Leaves the rules in place and exits within a second of SIGTERM even if the loop is
/// stuck somewhere no deadline reaches (a config read on a hung mount, say).
fn exit_soon_whatever_happens(why: &'static str) {
    let spawned = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            std::thread::sleep(EXIT_GRACE);
            tracing::warn!("{why}: the sync loop did not stop in {EXIT_GRACE:?}; exiting now, rules left in place");
            std::process::exit(0);
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start the exit watchdog: {err}");
    }
}
