//! Bringing flows that already exist in line with a change of decisions, on a thread of
//! its own: reading conntrack on a busy node (a quarter of a million entries) takes time
//! the sync loop must not wait for. Changes that pile up while it works are handled by
//! one pass that knows every decision in between (a flow may carry any of them), and a
//! failure is logged, tried again after [`REFRESH_EVERY`] (at most [`MAX_ATTEMPTS`]
//! times, then at the next change), and never passed to the syncs.
//!
//! The stale gauge (flows left carrying an earlier decision: TCP, SCTP, ...) is recounted
//! every [`REFRESH_EVERY`] while it is above zero, by one more streamed pass that deletes
//! nothing, so it falls as those flows end instead of waiting for the next change, which
//! replaces it with its own count.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::conntrack::{self, ConntrackCleanup, Pass, Reconciled};
use crate::kernel::SharedRunner;
use crate::observe::telemetry::Telemetry;
use crate::policy::Policy;

/// How often the stale flows of the last change are recounted while there are any, and
/// a failed pass is tried again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(60);

/// The most earlier decisions one pass judges flows against: changes that pile up while
/// a pass runs beyond this keep the first and the latest ones (each can hold a large
/// prefix list).
pub const MAX_EARLIER_DECISIONS: usize = 4;

/// A change not yet handled: every decision a flow may still carry, oldest first, and
/// the newest.
struct Job {
    olds: Vec<Policy>,
    new: Policy,
}

impl Job {
    /// This job followed by a change to `new`: the current decisions become one more
    /// that flows may carry.
    fn then(mut self, new: &Policy) -> Job {
        let previous = std::mem::replace(&mut self.new, new.clone());
        self.olds.push(previous);
        self.olds.retain(|old| old != new);
        self.olds.dedup();
        while self.olds.len() > MAX_EARLIER_DECISIONS {
            self.olds.remove(1);
        }
        self
    }
}

#[derive(Default)]
struct Queue {
    pending: Option<Job>,
    busy: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The handle the agent submits changes to.
#[derive(Clone)]
pub struct FlowReconciler {
    shared: Arc<Shared>,
}

impl FlowReconciler {
    /// Starts the worker; None (logged) when no thread can be started.
    pub fn start(
        mode: ConntrackCleanup,
        runner: SharedRunner,
        telemetry: Arc<Telemetry>,
    ) -> Option<FlowReconciler> {
        FlowReconciler::start_refreshing_every(mode, runner, telemetry, REFRESH_EVERY)
    }

    /// [`FlowReconciler::start`] with another refresh interval (tests).
    pub fn start_refreshing_every(
        mode: ConntrackCleanup,
        runner: SharedRunner,
        telemetry: Arc<Telemetry>,
        refresh_every: Duration,
    ) -> Option<FlowReconciler> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        let started = std::thread::Builder::new()
            .name("conntrack".into())
            .stack_size(256 * 1024)
            .spawn(move || work(&worker, mode, &runner, &telemetry, refresh_every));
        match started {
            Ok(_) => Some(FlowReconciler { shared }),
            Err(err) => {
                tracing::warn!(
                    "cannot start the conntrack worker ({err}); existing flows keep their old decision until they end"
                );
                None
            }
        }
    }

    /// Queues a change of decisions from `old` to `new`. Changes that pile up while a
    /// pass runs are handled by one pass that knows every decision in between.
    pub fn submit(&self, old: &Policy, new: &Policy) {
        let mut queue = self.shared.queue();
        queue.pending = Some(match queue.pending.take() {
            Some(job) => job.then(new),
            None => Job {
                olds: vec![old.clone()],
                new: new.clone(),
            },
        });
        self.shared.changed.notify_all();
    }

    /// Waits until every change submitted so far has been handled (for tests).
    pub fn wait_idle(&self) {
        let mut queue = self.shared.queue();
        while queue.pending.is_some() || queue.busy {
            queue = self
                .shared
                .changed
                .wait(queue)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

/// How many times in a row a pass may fail before the worker waits for the next change.
pub const MAX_ATTEMPTS: u32 = 3;

/// What the worker still has to do besides new changes.
enum Later {
    Nothing,
    /// A pass that failed `attempts` times, tried again after the refresh interval.
    Retry(Job, u32),
    /// The last change left flows carrying an earlier decision: recount them (a failed
    /// recount `attempts` times so far).
    Recount(Job, u32),
    /// A pass failed [`MAX_ATTEMPTS`] times: nothing more until the next change, which
    /// takes its decisions along.
    Abandoned(Job),
}

impl Later {
    /// The job a new change must extend: flows may still carry the decisions of a pass
    /// that failed. A recount is dropped: the new change's pass counts its own stale
    /// flows, and flows that only an earlier change left stale are not the new one's to
    /// re-decide.
    fn unfinished(self) -> Option<Job> {
        match self {
            Later::Nothing | Later::Recount(..) => None,
            Later::Retry(job, _) | Later::Abandoned(job) => Some(job),
        }
    }
}

fn work(
    shared: &Shared,
    mode: ConntrackCleanup,
    runner: &SharedRunner,
    telemetry: &Telemetry,
    refresh_every: Duration,
) {
    let mut later = Later::Nothing;
    loop {
        let (job, pass, attempts) = {
            let mut queue = shared.queue();
            let deadline = Instant::now() + refresh_every;
            loop {
                if let Some(job) = queue.pending.take() {
                    queue.busy = true;
                    let job = match std::mem::replace(&mut later, Later::Nothing).unfinished() {
                        Some(unfinished) => {
                            let mut merged = unfinished;
                            for old in &job.olds {
                                merged = merged.then(old);
                            }
                            merged.then(&job.new)
                        }
                        None => job,
                    };
                    break (job, Pass::Reconcile, 0);
                }
                if matches!(later, Later::Nothing | Later::Abandoned(_)) {
                    queue = shared
                        .changed
                        .wait(queue)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                    continue;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    queue.busy = true;
                    match std::mem::replace(&mut later, Later::Nothing) {
                        Later::Retry(job, attempts) => break (job, Pass::Reconcile, attempts),
                        Later::Recount(job, attempts) => break (job, Pass::CountOnly, attempts),
                        Later::Nothing | Later::Abandoned(_) => {}
                    }
                }
                queue = shared
                    .changed
                    .wait_timeout(queue, left)
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .0;
            }
        };
        let started = Instant::now();
        match conntrack::reconcile(&job.olds, &job.new, mode, pass, runner) {
            Ok(done) => {
                let deleted = if pass == Pass::Reconcile {
                    done.deleted_udp
                } else {
                    0
                };
                telemetry.conntrack_reconciled(deleted, &done.stale);
                report(&done, pass, started.elapsed());
                if done.stale_total() > 0 {
                    later = Later::Recount(job, 0);
                }
            }
            Err(err) if attempts + 1 >= MAX_ATTEMPTS => {
                tracing::warn!(
                    "conntrack: cannot update flows that carry the old decision ({} attempts; trying again at the next change): {err}",
                    attempts + 1
                );
                later = Later::Abandoned(job);
            }
            Err(err) => {
                tracing::warn!(
                    "conntrack: cannot update flows that carry the old decision (trying again in {refresh_every:?}): {err}"
                );
                later = match pass {
                    Pass::Reconcile => Later::Retry(job, attempts + 1),
                    Pass::CountOnly => Later::Recount(job, attempts + 1),
                };
            }
        }
        shared.queue().busy = false;
        shared.changed.notify_all();
    }
}

/// One log line per pass: at info when it deleted or left something, else at debug.
fn report(done: &Reconciled, pass: Pass, took: Duration) {
    let elapsed_ms = format!("{:.3}", took.as_secs_f64() * 1e3);
    let not_ours = &done.not_ours;
    if pass == Pass::CountOnly {
        tracing::debug!(
            left_alone = ?done.stale,
            recounted = done.examined,
            elapsed_ms,
            "conntrack: flows still carrying the old decision recounted"
        );
        return;
    }
    macro_rules! pass_line {
        ($level:ident, $message:literal) => {
            tracing::$level!(
                deleted_udp = done.deleted_udp,
                gone_udp = done.gone_udp,
                left_alone = ?done.stale,
                examined = done.examined,
                other_zone = not_ours.other_zone,
                destination_nat = not_ours.destination_nat,
                local_destination = not_ours.local_destination,
                others_source_nat = not_ours.others_source_nat,
                dumps = done.dumps,
                delete_datagrams = done.delete_datagrams,
                elapsed_ms,
                $message
            )
        };
    }
    if done.deleted_udp > 0 || !done.stale.is_empty() {
        pass_line!(info, "conntrack: flows carrying the old decision updated");
    } else {
        pass_line!(debug, "conntrack: no flow carries the old decision");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParseOptions, parse};
    use crate::kernel::fake::{FakeRunner, Fault};
    use crate::policy::{Family, PolicySettings};
    use std::path::Path;

    fn policy(yaml: &str) -> Policy {
        let config = parse(yaml, Path::new("t"), ParseOptions::default())
            .unwrap()
            .config;
        Policy::new(&config, &PolicySettings::default())
    }

    const FLOWS: &str = "\
udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40000 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=203.0.113.10 sport=40002 dport=80 src=203.0.113.10 dst=192.0.2.1 sport=80 dport=40002 [ASSURED] mark=0 use=1
";

    fn node() -> Arc<FakeRunner> {
        let runner = FakeRunner::new();
        runner.set_local_prefixes(Family::V4, &["127.0.0.0/8", "192.0.2.1/32"]);
        runner.set_conntrack("ipv4", FLOWS);
        runner
    }

    fn stale_lines(telemetry: &Telemetry) -> Vec<String> {
        telemetry
            .encode()
            .lines()
            .filter(|l| l.starts_with("ip_masq_agent_conntrack_stale_flows{"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn regression_conntrack_stale_flows_is_refreshed_only_on_the_next_change() {
        let runner = node();
        let telemetry = Arc::new(Telemetry::new());
        let flows = FlowReconciler::start_refreshing_every(
            ConntrackCleanup::Udp,
            runner.clone(),
            telemetry.clone(),
            Duration::from_millis(50),
        )
        .unwrap();
        let (old, new) = (
            policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n"),
            policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n"),
        );
        flows.submit(&old, &new);
        flows.wait_idle();
        assert_eq!(
            stale_lines(&telemetry),
            ["ip_masq_agent_conntrack_stale_flows{protocol=\"tcp\"} 1"]
        );
        // The TCP connection ends; no change follows. The gauge follows within a few
        // refresh intervals.
        runner.clear_conntrack();
        let until = Instant::now() + Duration::from_secs(5);
        while !stale_lines(&telemetry).is_empty() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(stale_lines(&telemetry), Vec::<String>::new());
        // Once nothing is stale the worker stops reading the table.
        flows.wait_idle();
        let dumps = runner.conntrack_stats().dumps;
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(runner.conntrack_stats().dumps, dumps);
    }

    #[test]
    fn a_failed_pass_is_tried_again() {
        let runner = node();
        runner.inject("netlink conntrack dump", Fault::TimesOut, Some(1));
        let telemetry = Arc::new(Telemetry::new());
        let flows = FlowReconciler::start_refreshing_every(
            ConntrackCleanup::Udp,
            runner.clone(),
            telemetry,
            Duration::from_millis(50),
        )
        .unwrap();
        flows.submit(
            &policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n"),
            &policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n"),
        );
        let until = Instant::now() + Duration::from_secs(5);
        while runner.conntrack_stats().deleted == 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(runner.conntrack_stats().deleted, 1);
    }

    #[test]
    fn a_pass_that_keeps_failing_waits_for_the_next_change() {
        let runner = node();
        runner.inject("netlink conntrack dump", Fault::TimesOut, None);
        let flows = FlowReconciler::start_refreshing_every(
            ConntrackCleanup::Udp,
            runner.clone(),
            Arc::new(Telemetry::new()),
            Duration::from_millis(20),
        )
        .unwrap();
        let (a, b) = (
            policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n"),
            policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n"),
        );
        flows.submit(&a, &b);
        std::thread::sleep(Duration::from_millis(400));
        flows.wait_idle();
        assert_eq!(runner.calls().len(), MAX_ATTEMPTS as usize);
        // The next change tries again, knowing the failed pass's decisions.
        runner.clear_faults();
        flows.submit(&b, &a);
        flows.wait_idle();
        assert_eq!(runner.calls().len(), MAX_ATTEMPTS as usize + 1);
    }

    #[test]
    fn changes_that_pile_up_keep_every_decision_in_between() {
        let [a, b, c, d, e, f] = [8, 16, 24, 12, 20, 28].map(|bits| {
            policy(&format!(
                "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.0.0/{bits}]\n"
            ))
        });
        let job = Job {
            olds: vec![a.clone()],
            new: b.clone(),
        }
        .then(&c);
        assert_eq!(
            (job.olds.clone(), job.new.clone()),
            (vec![a.clone(), b.clone()], c.clone())
        );
        // Back to a decision already listed: it is the newest, not an earlier one.
        let back = Job {
            olds: vec![a.clone(), b.clone()],
            new: c.clone(),
        }
        .then(&a);
        assert_eq!(back.olds, vec![b.clone(), c.clone()]);
        // Bounded: the first and the latest ones are kept.
        let many = job.then(&d).then(&e).then(&f);
        assert_eq!(many.olds.len(), MAX_EARLIER_DECISIONS);
        assert_eq!(many.olds, vec![a, c, d, e]);
        assert_eq!(many.new, f);
    }
}
