//! Starting the agent for real: the tool deadline, the backend for this host, the signal
//! thread, the config watch, the HTTP endpoint, the loop, and `--cleanup-on-exit`. Each
//! background part fails alone: a watch or an endpoint that cannot start is logged and
//! the loop syncs anyway.

use std::sync::{Arc, mpsc};
use std::time::Duration;

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

use super::watch::Change;
use super::{Agent, Event, Settings};
use crate::backend::dry_run::DryRunBackend;
use crate::backend::{self, Backend};
use crate::config::source;
use crate::conntrack::ConntrackCleanup;
use crate::kernel::{self, SharedRunner, SystemRunner};
use crate::observe::http;
use crate::observe::telemetry::Telemetry;

/// How long the main loop gets to notice a SIGTERM before the process exits anyway.
const EXIT_GRACE: Duration = Duration::from_millis(800);

/// Runs the agent until SIGTERM/SIGINT; the rules stay in place unless
/// `--cleanup-on-exit` asks otherwise (never in a dry run).
pub fn run(settings: Settings) -> anyhow::Result<()> {
    kernel::set_tool_timeout(settings.tool_timeout);
    let runner: SharedRunner = SystemRunner::shared();
    let (chosen, leftovers) = backend::build(
        settings.backend,
        &settings.chain,
        settings.iptables_mode,
        settings.policy_settings.enable_ipv6,
        &runner,
    )?;
    let backend: Box<dyn Backend> = if settings.dry_run {
        Box::new(DryRunBackend::new(chosen, settings.chain.clone()))
    } else {
        chosen
    };

    // Other agents of this network namespace see this one while it runs (see
    // kernel::lock): a clean-up on exit leaves the rules to one still running, and an
    // older agent hands the metrics port to a newer one.
    let metrics_port = settings.metrics_address.map_or(0, |address| address.port());
    let presence = match kernel::lock::announce(metrics_port) {
        Ok(presence) => Some(Arc::new(presence)),
        Err(err) => {
            tracing::warn!("{err}; other agents of this node will not know of this one");
            None
        }
    };
    let (sender, events) = mpsc::channel();
    // Dry run never writes, not even the removal on exit.
    let cleanup_on_exit = settings.cleanup_on_exit && !settings.dry_run;
    if settings.cleanup_on_exit && settings.dry_run {
        tracing::info!("dry run: --cleanup-on-exit will not remove anything");
    }
    start_signal_thread(sender.clone(), cleanup_on_exit)?;
    let guard_sender = sender.clone();

    // Owned by the loop, which re-arms it before each read when it was lost; without
    // it (no inotify instance) the resync timer is the backstop.
    let config = settings.config.clone();
    let watched = config.watched_dir();
    let data_link = watched.join("..data");
    // An event on `..data` commits an update only when the link is there after it: a
    // removed directory (`rm -rf` of the volume) is no ConfigMap update, and its missing
    // file waits out the grace like any other.
    let committed = move || std::fs::symlink_metadata(&data_link).is_ok();
    let watch = match super::watch::ConfigWatch::start(
        &watched,
        move |name| config.is_of_interest(name),
        move |change| {
            // Kubelet's `..data` rename commits an update: act on it at once. Anything
            // else (an edited plain file) may come in a burst and is settled first.
            let event = match change {
                Change::Entries(names)
                    if names.iter().any(|name| source::is_commit(name)) && committed() =>
                {
                    Event::Commit("ConfigMap update committed (..data swapped)")
                }
                Change::Directory(name) if source::is_commit(&name) && committed() => {
                    Event::Commit("ConfigMap update committed (..data swapped)")
                }
                Change::Entries(_) => Event::Reload("config directory changed"),
                Change::Directory(_) => {
                    Event::Reload("config directory removed, renamed or made again")
                }
                Change::Overflow => Event::Reload("config watch overflowed"),
            };
            let _ = sender.send(event);
        },
    ) {
        Ok(watch) => Some(watch),
        Err(err) => {
            tracing::warn!(
                "cannot watch {} ({err}); config changes are picked up every resyncInterval",
                watched.display()
            );
            None
        }
    };
    start_remount_guard(watched.clone(), guard_sender);
    let telemetry = Arc::new(Telemetry::new());
    telemetry.set_sync_deadline(settings.tool_timeout);
    if let Some(address) = settings.metrics_address {
        // No `?`: a taken port or a failing HTTP thread must not keep the rules from being
        // written; serve logs such failures and retries the bind on its own thread.
        let hand_over: Option<http::HandOver> = presence.clone().map(|presence| {
            Box::new(move || {
                presence.newer_agent_on_my_port().map(|newer| {
                    format!(
                        "a newer ip-masq-agent (pid {} of its PID namespace) runs in this network namespace with the same metrics port",
                        newer.pid
                    )
                })
            }) as http::HandOver
        });
        http::serve(address, telemetry.clone(), hand_over);
    }
    let cleanup_chain = cleanup_on_exit.then(|| settings.chain.clone());
    let mut agent = Agent::new(settings.clone(), backend)
        .with_telemetry(telemetry)
        .with_watch(watch);
    if !settings.dry_run {
        agent = agent.with_leftovers(leftovers, runner.clone());
        // Over netlink (ctnetlink): no conntrack-tools needed.
        if settings.conntrack_cleanup == ConntrackCleanup::Udp {
            agent = agent.with_conntrack(runner.clone());
        }
    }
    // Read-only, so a dry run surveys too.
    agent = agent
        .with_srcnat_survey(runner.clone())
        .with_egress_check(runner.clone());
    if let Some(presence) = presence.clone() {
        agent = agent.with_other_agents(move || kernel::lock::others(&presence));
    }
    agent.run(&events);
    // Another agent still running here (the new pod of a rolling update) relies on the
    // rules: removing them would leave the node unmasqueraded until its next resync.
    let still_running = presence
        .as_ref()
        .map(|presence| kernel::lock::others(presence))
        .unwrap_or_default();
    let cleanup_chain = match (cleanup_chain, still_running.first()) {
        (Some(_), Some(other)) => {
            tracing::info!(
                "--cleanup-on-exit: another ip-masq-agent (pid {} of its PID namespace) runs in this network namespace; leaving the rules to it",
                other.pid
            );
            None
        }
        (chain, _) => chain,
    };
    if let Some(chain) = cleanup_chain {
        // The one step that still runs tools after a stop was asked for. Later signals
        // no longer stop tools (see start_signal_thread), so a clean-up that has started
        // finishes, each tool within its deadline.
        kernel::clear_stop();
        let removed = match backend::cleanup_everything(&chain, &runner) {
            Ok(removed) => removed,
            Err(err) => {
                tracing::error!(
                    "clean-up on exit failed, some of the agent's rules may be left (`ip-masq-agent cleanup` removes them): {err}"
                );
                return Err(err).context("cleaning up on exit");
            }
        };
        for place in &removed {
            tracing::info!("removed the agent's rules from {place}");
        }
        tracing::info!(
            "clean-up on exit finished ({}); exiting",
            if removed.is_empty() {
                "nothing to remove"
            } else {
                "every rule of the agent removed"
            }
        );
    }
    Ok(())
}

/// SIGHUP reloads; the first SIGTERM or SIGINT stops the agent (killing a tool that
/// hangs), and any later one is only logged: it must not cut short the clean-up of
/// `--cleanup-on-exit`, and without it the exit is already under way.
fn start_signal_thread(sender: mpsc::Sender<Event>, cleanup_on_exit: bool) -> anyhow::Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut stopping = false;
            for signal in signals.forever() {
                let event = match signal {
                    SIGHUP => Event::Reload("SIGHUP"),
                    SIGINT => Event::Shutdown("SIGINT"),
                    _ => Event::Shutdown("SIGTERM"),
                };
                if let Event::Shutdown(why) = event {
                    if stopping {
                        if cleanup_on_exit {
                            tracing::warn!(
                                "{why} again: the agent is stopping and its clean-up is under way (or next); it finishes first, each tool within --tool-timeout; SIGKILL stops it at once, leaving what is not yet removed"
                            );
                        } else {
                            tracing::info!("{why} again: already exiting");
                        }
                        continue;
                    }
                    stopping = true;
                    // A tool that hangs is killed now rather than at its deadline.
                    kernel::request_stop();
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
    Ok(())
}

/// A mount over the config directory (a volume remounted) or a directory swapped in
/// under its name sends no inotify event to a watch on the old one: a second's stat of
/// the directory and its parent notices, and the loop reloads and re-arms the watch.
fn start_remount_guard(dir: std::path::PathBuf, sender: mpsc::Sender<Event>) {
    let parent = dir.parent().map(std::path::Path::to_path_buf);
    let identity = move || {
        (
            super::watch::dir_id(&dir),
            parent.as_deref().and_then(super::watch::dir_id),
        )
    };
    let spawned = std::thread::Builder::new()
        .name("config-guard".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let mut last = identity();
            loop {
                std::thread::sleep(REMOUNT_CHECK);
                let now = identity();
                if now != last {
                    last = now;
                    let event = Event::Reload("the config directory was remounted or replaced");
                    if sender.send(event).is_err() {
                        return;
                    }
                }
            }
        });
    if let Err(err) = spawned {
        tracing::warn!(
            "cannot start the config directory guard ({err}); a remount is noticed at the next resync"
        );
    }
}

/// How often the guard looks at the config directory's identity.
const REMOUNT_CHECK: Duration = Duration::from_secs(1);

/// Leaves the rules in place and exits within a second of SIGTERM even if the loop is
/// stuck somewhere no deadline reaches (a config read on a hung mount, say).
fn exit_soon_whatever_happens(why: &'static str) {
    let spawned = std::thread::Builder::new()
        .name("exit-watchdog".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            std::thread::sleep(EXIT_GRACE);
            tracing::warn!(
                "{why}: the sync loop did not stop in {EXIT_GRACE:?}; exiting now, rules left in place"
            );
            std::process::exit(0);
        });
    if let Err(err) = spawned {
        tracing::warn!("cannot start the exit watchdog: {err}");
    }
}
