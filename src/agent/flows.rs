//! Bringing flows that already exist in line with a change of decisions, on a thread of
//! its own: listing conntrack on a busy node (a quarter of a million entries) takes time
//! the sync loop must not wait for. Changes that pile up while it works are merged into
//! one (the oldest decisions against the newest), and a failure is logged and counted,
//! never passed to the syncs.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::conntrack::{self, ConntrackCleanup};
use crate::kernel::SharedRunner;
use crate::observe::telemetry::Telemetry;
use crate::policy::Policy;

#[derive(Default)]
struct Queue {
    /// The decisions before the first change not yet handled, and the newest ones.
    pending: Option<(Policy, Policy)>,
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let worker = shared.clone();
        let started = std::thread::Builder::new()
            .name("conntrack".into())
            .stack_size(256 * 1024)
            .spawn(move || work(&worker, mode, &runner, &telemetry));
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

    /// Queues a change of decisions from `old` to `new`.
    pub fn submit(&self, old: &Policy, new: &Policy) {
        let mut queue = self.shared.queue();
        let oldest = match queue.pending.take() {
            Some((oldest, _)) => oldest,
            None => old.clone(),
        };
        queue.pending = Some((oldest, new.clone()));
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

fn work(shared: &Shared, mode: ConntrackCleanup, runner: &SharedRunner, telemetry: &Telemetry) {
    loop {
        let (old, new) = {
            let mut queue = shared.queue();
            loop {
                if let Some(job) = queue.pending.take() {
                    queue.busy = true;
                    break job;
                }
                queue = shared
                    .changed
                    .wait(queue)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        };
        match conntrack::reconcile(&old, &new, mode, runner) {
            Ok(done) => {
                telemetry.conntrack_reconciled(done.deleted_udp, &done.stale);
                if done.deleted_udp > 0 || !done.stale.is_empty() {
                    tracing::info!(
                        deleted_udp = done.deleted_udp,
                        left_alone = ?done.stale,
                        "conntrack: flows carrying the old decision updated"
                    );
                }
            }
            Err(err) => {
                tracing::warn!("conntrack: cannot update flows that carry the old decision: {err}")
            }
        }
        shared.queue().busy = false;
        shared.changed.notify_all();
    }
}
