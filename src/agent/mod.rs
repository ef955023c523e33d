//! The sync loop: read the config, keep the kernel in step with it, and keep the
//! last good rules when the config is bad or a tool fails.

pub mod egress;
pub mod flows;
pub mod watch;
pub mod wiring;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};

use crate::backend::iptables::IptablesMode;
use crate::backend::{Backend, BackendChoice, ChainName, Leftovers, SyncError, SyncErrorKind};
use crate::config::source::{ConfigPath, Identity};
use crate::config::{Config, ConfigError, ConfigSource, LoadedConfig, ParseCache, ParseOptions};
use crate::conntrack::ConntrackCleanup;
use crate::kernel::SharedRunner;
use crate::observe::telemetry::{PrefixCounts, SyncResult, Telemetry, fingerprint};
use crate::policy::{Policy, PolicySettings};
use crate::survey::SrcnatWatch;
use watch::{ConfigWatch, WatchProof};

/// What the agent (and the commands) derive from the flags.
#[derive(Clone, Debug)]
pub struct Settings {
    pub config: ConfigPath,
    pub parse_options: ParseOptions,
    pub policy_settings: PolicySettings,
    pub chain: ChainName,
    pub iptables_mode: IptablesMode,
    pub backend: BackendChoice,
    pub cleanup_on_exit: bool,
    pub dry_run: bool,
    /// None when the endpoint is disabled.
    pub metrics_address: Option<SocketAddr>,
    pub tool_timeout: Duration,
    pub conntrack_cleanup: ConntrackCleanup,
}

impl Settings {
    /// Reads the config the way the flags say: one file, or a merged directory.
    pub fn load_config(&self) -> Result<LoadedConfig, ConfigError> {
        self.config.load(self.parse_options)
    }
}

/// Something that should interrupt the wait between syncs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Exit now (leaving the rules in place unless `--cleanup-on-exit`).
    Shutdown(&'static str),
    /// Re-read the config and sync, once a burst of such events has settled.
    Reload(&'static str),
    /// Re-read the config and sync at once: the event commits an update (kubelet's
    /// `..data` rename), so nothing more is coming that a wait would gather.
    Commit(&'static str),
}

/// How the most recent sync ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SyncOutcome {
    /// The kernel matches the config just read (or, at an idle resync, provably unchanged).
    Applied { changed: bool },
    /// The config was rejected; the last good rules (if any) were re-applied.
    ConfigRejected,
    /// The config file was missing or empty while another config is applied: the applied
    /// rules were re-synced, and the defaults follow only if the file stays so for
    /// [`DEFAULTS_GRACE`].
    Deferred,
    /// The backend failed to write the rules.
    BackendFailed,
}

/// The first retry after a failed write; doubled per failure up to the resync interval.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A rejected config that stays the same is reported again this often, not every resync.
const REPEAT_ERROR_EVERY: Duration = Duration::from_secs(600);
/// How often the survey of NAT rules acting before the agent's reads everything again
/// (native nft tables, the other iptables flavour) rather than only what syncs read.
const FULL_SURVEY_EVERY: Duration = Duration::from_secs(600);
/// A plain file written in place can be several events (truncate, write); gather them.
const SETTLE: Duration = Duration::from_millis(15);
/// How long a config file that is missing or empty must stay so before the defaults it
/// means are applied over another config, unless kubelet's `..data` commit brought it
/// (then it is the ConfigMap's content, applied at once).
pub const DEFAULTS_GRACE: Duration = Duration::from_secs(1);

/// What started a sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    /// The resync timer: the config is read only if it may have changed.
    Resync,
    /// The watch saw a change (settled), or SIGHUP, or the start: read it.
    Change,
    /// Kubelet's `..data` rename: read it and act on it at once.
    Commit,
}

/// How what a write brings differs from what is applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Change {
    First,
    Changed,
    Same,
}

/// What proved the config at the read the applied rules came from.
struct ReadProof {
    watch: WatchProof,
    identity: Identity,
    /// When that read was: after [`FULL_READ_EVERY`] the file is read anyway.
    at: Instant,
}

/// An idle resync reads the config at least this often, proof or not: an edit that
/// changes no timestamp and sends no event (a write through a shared mapping of a page
/// already dirty) is picked up within this, as upstream's periodic re-read would.
const FULL_READ_EVERY: Duration = Duration::from_secs(600);
/// The longest wait between attempts to remove the agent's rules where it no longer works.
const LEFTOVER_RETRY_CAP: Duration = Duration::from_secs(600);

pub struct Agent {
    settings: Settings,
    backend: Box<dyn Backend>,
    /// The agent's rules where this backend does not work (the other backend, the other
    /// iptables flavour), removed after a successful sync while `leftovers_pending`.
    leftovers: Option<(Leftovers, SharedRunner)>,
    /// Set at start and whenever a survey finds such rules again; cleared once removed.
    leftovers_pending: bool,
    /// The other agents running in this network namespace, when known.
    other_agents: Option<Box<dyn Fn() -> Vec<crate::kernel::lock::OtherAgent>>>,
    /// Whether the agent last said another agent rewrites its rules (said once a spell).
    fighting_said: bool,
    /// Failed removals in a row, and when the next may be tried: the first retry comes
    /// at the next sync, later ones after 1 s, 2 s, 4 s ... up to 10 minutes (a removal
    /// that cannot fit in memory would otherwise run, and be killed, at every resync).
    leftover_failures: (u32, Option<Instant>),
    /// What the backend said about how it had to read the kernel, as last logged.
    read_notes: Vec<String>,
    /// Looks at what outputInterface/outputAddress meet on the node (None: never), and
    /// the warnings last logged.
    egress: Option<(SharedRunner, Vec<String>)>,
    /// Brings existing flows in line after a change of decisions (None: never).
    flows: Option<flows::FlowReconciler>,
    applied: Option<Applied>,
    last_loaded: Option<LoadedConfig>,
    last_error: Option<(String, Instant)>,
    consecutive_backend_failures: u32,
    last_outcome: Option<SyncOutcome>,
    drift_repairs: u64,
    started: Instant,
    telemetry: Arc<Telemetry>,
    /// The survey of other owners' NAT rules acting before the agent's (None: off).
    srcnat: Option<SrcnatWatch>,
    last_full_survey: Option<Instant>,
    parse_cache: ParseCache,
    /// The watch on the config's directory (None: none could be made), re-armed before
    /// each read when it was lost.
    watch: Option<ConfigWatch>,
    /// Set at a read whose config is applied, when the watch and the files' identities
    /// can later prove the config unchanged without reading it.
    read_proof: Option<ReadProof>,
    /// Since when reads have found the file missing or empty while another config is
    /// applied.
    defaults_since: Option<Instant>,
    /// Whether the current sync read the config (for its log line).
    config_read: bool,
}

struct Applied {
    config: Config,
    policy: Policy,
}

/// The policy the agent's replaced rules carried out: their RETURN destinations kept,
/// everything else masqueraded (or, with no MASQUERADE in force, nothing masqueraded).
fn replaced_policy(
    replaced: &crate::backend::ReplacedDecisions,
    settings: &crate::policy::PolicySettings,
) -> Policy {
    let keep_all: Vec<ipnet::IpNet> = ["0.0.0.0/0", "::/0"]
        .iter()
        .filter_map(|net| net.parse().ok())
        .collect();
    let mut config = Config::defaults(crate::config::ParseOptions::default());
    config.non_masquerade_cidrs = if replaced.masquerades {
        replaced.keep.clone()
    } else {
        keep_all
    };
    config.cidr_limit = usize::MAX;
    // Link-local ranges appear as RETURNs of their own when they were kept.
    config.masq_link_local = true;
    config.masq_link_local_ipv6 = true;
    Policy::new(&config, settings)
}

impl Agent {
    pub fn new(settings: Settings, backend: Box<dyn Backend>) -> Agent {
        Agent {
            settings,
            backend,
            leftovers: None,
            leftovers_pending: false,
            leftover_failures: (0, None),
            other_agents: None,
            fighting_said: false,
            read_notes: Vec::new(),
            egress: None,
            flows: None,
            applied: None,
            last_loaded: None,
            last_error: None,
            consecutive_backend_failures: 0,
            last_outcome: None,
            drift_repairs: 0,
            started: Instant::now(),
            telemetry: Arc::new(Telemetry::new()),
            srcnat: None,
            last_full_survey: None,
            parse_cache: ParseCache::default(),
            watch: None,
            read_proof: None,
            defaults_since: None,
            config_read: true,
        }
    }

    /// Follows the config's directory with `watch` (kept for the whole run): changes are
    /// acted on at once, and while it has seen nothing an idle resync does not read the
    /// config again when the files' identities prove it unchanged.
    pub fn with_watch(mut self, watch: Option<ConfigWatch>) -> Agent {
        self.watch = watch;
        self
    }

    /// Removes `leftovers` (the other backend's rules) after the first successful sync,
    /// retrying at every sync until that succeeds.
    pub fn with_leftovers(mut self, leftovers: Leftovers, runner: SharedRunner) -> Agent {
        self.leftovers = Some((leftovers, runner));
        self.leftovers_pending = true;
        self
    }

    /// After each change of decisions, deletes the conntrack entries of UDP flows that
    /// carry the old decision (`--conntrack-cleanup=udp`), on a worker thread.
    pub fn with_conntrack(mut self, runner: SharedRunner) -> Agent {
        self.start_conntrack(runner);
        self
    }

    fn start_conntrack(&mut self, runner: SharedRunner) {
        self.flows = flows::FlowReconciler::start(
            self.settings.conntrack_cleanup,
            runner,
            self.telemetry.clone(),
        );
    }

    /// Checks, at a change and with every full survey, whether the node holds
    /// outputAddress(IPv6) and has the interfaces outputInterface lists; warns when not.
    pub fn with_egress_check(mut self, runner: SharedRunner) -> Agent {
        self.egress = Some((runner, Vec::new()));
        self
    }

    /// How to list the other agents running in this network namespace (see
    /// [`crate::kernel::lock`]): while one runs, the rules it writes are not drift.
    pub fn with_other_agents(
        mut self,
        others: impl Fn() -> Vec<crate::kernel::lock::OtherAgent> + 'static,
    ) -> Agent {
        self.other_agents = Some(Box::new(others));
        self
    }

    /// Logs what the egress keys meet on the node when that changes, and exports it.
    fn check_egress(&mut self) {
        let (Some((runner, last)), Some(applied)) = (self.egress.as_mut(), self.applied.as_ref())
        else {
            return;
        };
        let found = egress::check(&applied.policy, runner);
        let present: Vec<(&'static str, bool)> = found
            .addresses
            .iter()
            .map(|address| (address.family.label(), address.present()))
            .collect();
        self.telemetry.egress(
            applied.policy.out_interfaces.as_ref().map(Vec::len),
            &present,
        );
        let warnings = found.warnings();
        for warning in warnings.iter().filter(|w| !last.contains(w)) {
            tracing::warn!("{warning}");
        }
        for gone in last.iter().filter(|w| !warnings.contains(w)) {
            tracing::info!("no longer so: {gone}");
        }
        *last = warnings;
    }

    /// Reports into `telemetry` (shared with the HTTP endpoint) instead of a private one.
    pub fn with_telemetry(mut self, telemetry: Arc<Telemetry>) -> Agent {
        self.telemetry = telemetry;
        self
    }

    /// Surveys the NAT rules of others that act before the agent's after each successful
    /// sync: fully at the first and then every [`FULL_SURVEY_EVERY`] (reading the whole
    /// nft ruleset costs a third of a second beside a 50,000-element set, which a config
    /// change should not pay), otherwise from what the sync read (no extra process),
    /// classified again for the new policy after a change.
    pub fn with_srcnat_survey(mut self, runner: SharedRunner) -> Agent {
        self.srcnat = Some(SrcnatWatch::new(runner));
        self
    }

    /// Logs the NAT rules acting before the agent's when their set changes: a warning per
    /// rule, kube-proxy's expected masquerade at info; sets the gauge.
    fn survey_srcnat(&mut self, full: bool) {
        let Some(policy) = self.applied.as_ref().map(|a| a.policy.clone()) else {
            return;
        };
        self.survey_srcnat_for(&policy, full);
    }

    /// [`Agent::survey_srcnat`] against `policy` (the config a failed sync was for).
    fn survey_srcnat_for(&mut self, policy: &Policy, full: bool) {
        let Some(watch) = self.srcnat.as_mut() else {
            return;
        };
        let Some(change) = watch.update(self.backend.as_ref(), policy, full) else {
            return;
        };
        for rule in &change.appeared {
            if rule.order == crate::survey::precedence::Order::After {
                tracing::warn!("NAT rule acts after the agent's on what it keeps: {rule}");
            } else if rule.expected {
                tracing::info!("NAT rule acts before the agent's: {rule}");
            } else {
                tracing::warn!("NAT rule acts before the agent's: {rule}");
            }
        }
        for rule in &change.gone {
            let when = match rule.order {
                crate::survey::precedence::Order::After => "after",
                _ => "before",
            };
            tracing::info!(
                "NAT rule no longer acts {when} the agent's: {} `{}`",
                rule.place,
                rule.rule
            );
        }
        if change.survey.omitted > 0 {
            tracing::warn!(
                "{} more NAT rules act before the agent's (not listed)",
                change.survey.omitted
            );
        }
        for note in &change.new_notes {
            tracing::warn!("surveying the NAT rules before the agent's: {note}");
        }
        let (expected, unexpected) = change.survey.counts();
        self.telemetry.preceding_nat_rules(expected, unexpected);
        self.telemetry
            .following_nat_rules(change.survey.following());
        if change.survey.has_leftovers() && self.leftovers.is_some() && !self.leftovers_pending {
            tracing::warn!(
                "the agent's own rules are back where it does not work; removing them after the next successful sync"
            );
            self.leftovers_pending = true;
        }
    }

    /// Logs (and exports) how the backend had to read the kernel when that changes:
    /// e.g. a nat table iptables-nft can only list chain by chain.
    fn report_read_notes(&mut self) {
        let notes = self.backend.read_notes();
        if notes == self.read_notes {
            return;
        }
        for note in notes.iter().filter(|n| !self.read_notes.contains(n)) {
            tracing::warn!("{note}");
        }
        for gone in self.read_notes.iter().filter(|n| !notes.contains(n)) {
            tracing::info!("no longer so: {gone}");
        }
        self.telemetry.read_notes(&notes);
        self.read_notes = notes;
    }

    /// Reads the config and makes the kernel match it (or the last good config), as
    /// after a change seen by the watch or SIGHUP.
    pub fn sync_once(&mut self) -> SyncOutcome {
        self.sync(Trigger::Change)
    }

    fn sync(&mut self, trigger: Trigger) -> SyncOutcome {
        if let Some(watch) = self.watch.as_mut() {
            watch.ensure_armed();
        }
        let outcome = if trigger == Trigger::Resync && self.source_unchanged() {
            self.config_read = false;
            self.resync_applied()
        } else {
            self.config_read = true;
            self.read_and_apply()
        };
        self.last_outcome = Some(outcome.clone());
        outcome
    }

    /// Whether the config provably is what the applied rules were made from, without
    /// reading it: the watch has been armed and seen nothing since that read (no change
    /// of interest, no overflow, no loss), and the files' identities (every symlink on
    /// the way and the file: device, inode, size, times in ns) are as they were then.
    fn source_unchanged(&self) -> bool {
        let (Some(proof), Some(watch)) = (&self.read_proof, &self.watch) else {
            return false;
        };
        if self.applied.is_none() || self.defaults_since.is_some() || self.last_error.is_some() {
            return false;
        }
        let now = watch.proof();
        now.armed
            && now == proof.watch
            && proof.at.elapsed() < FULL_READ_EVERY
            && self.settings.config.identity().as_ref() == Some(&proof.identity)
    }

    fn read_and_apply(&mut self) -> SyncOutcome {
        // Taken before the read: whatever changes after it shows in the next ones.
        let watch = self.watch.as_ref().map(ConfigWatch::proof);
        let read_started = SystemTime::now();
        let identity = watch
            .filter(|w| w.armed)
            .and_then(|_| self.settings.config.identity());
        self.read_proof = None;
        let outcome = match self
            .settings
            .config
            .load_cached(self.settings.parse_options, &mut self.parse_cache)
        {
            Ok(loaded) => {
                self.telemetry.config_loaded(true);
                self.last_error = None;
                // Even after kubelet's `..data` swap: when a volume is set up anew (torn
                // down, `rm -rf`, a new pod's first write) `..data` comes before the key's
                // link, and the file is missing for that moment.
                if self.defers_defaults(&loaded) {
                    return self.keep_applied_for_now();
                }
                self.defaults_since = None;
                self.note_loaded(&loaded);
                // The liveness bound follows the config from the first read on, not from
                // the first sync that finishes.
                self.telemetry
                    .resync_interval(loaded.config.resync_interval);
                let policy = Policy::new(&loaded.config, &self.settings.policy_settings);
                self.apply(loaded.config, policy)
            }
            Err(err) => {
                self.telemetry.config_loaded(false);
                self.defaults_since = None;
                let problem = err.to_string();
                self.report_config_error(&problem);
                if self.applied.is_none() {
                    // Nothing to sync yet: waiting for a good config is not a failure.
                    self.telemetry
                        .waiting_for_config(self.next_wait(), &problem);
                }
                // Last-known-good: keep the previous rules, and repair drift from them.
                // Kept until a new good config replaces it, even when this re-apply fails.
                if let Some(applied) = self.applied.take() {
                    let _ = self.write(applied, Change::Same);
                }
                SyncOutcome::ConfigRejected
            }
        };
        if matches!(outcome, SyncOutcome::Applied { .. })
            && let (Some(watch), Some(identity)) = (watch, identity)
            && identity.settled_before(read_started)
        {
            self.read_proof = Some(ReadProof {
                watch,
                identity,
                at: Instant::now(),
            });
        }
        outcome
    }

    /// Whether a read of nothing (a missing or empty file) waits for [`DEFAULTS_GRACE`]
    /// before the defaults it means are acted on, because another config is applied: a
    /// writer that truncates, then writes, must not flip the node to the defaults in
    /// between. Logs when the wait starts and ends.
    fn defers_defaults(&mut self, loaded: &LoadedConfig) -> bool {
        let Some(applied) = &self.applied else {
            return false;
        };
        if applied.config == loaded.config
            || !self
                .settings
                .config
                .is_blank(loaded, &self.parse_cache, self.last_loaded.as_ref())
        {
            self.defaults_since = None;
            return false;
        }
        let path = self.settings.config.path().display();
        match self.defaults_since {
            None => {
                tracing::info!(
                    "{path} is missing or empty (or a file of it is); keeping the current rules unless it stays so for {DEFAULTS_GRACE:?} (a writer may be replacing it)"
                );
                self.defaults_since = Some(Instant::now());
                true
            }
            Some(since) if since.elapsed() < DEFAULTS_GRACE => true,
            Some(_) => {
                tracing::info!(
                    "{path} has stayed missing or empty for {DEFAULTS_GRACE:?}; applying the default values"
                );
                false
            }
        }
    }

    /// Re-syncs the applied rules (repairing drift) while a missing or empty file waits
    /// out its grace period.
    fn keep_applied_for_now(&mut self) -> SyncOutcome {
        let Some(applied) = self.applied.take() else {
            return SyncOutcome::Deferred;
        };
        match self.write(applied, Change::Same) {
            SyncOutcome::Applied { .. } => SyncOutcome::Deferred,
            other => other,
        }
    }

    /// Re-syncs the applied rules without reading the config (it provably has not
    /// changed): no parse, no policy built, nothing cloned.
    fn resync_applied(&mut self) -> SyncOutcome {
        match self.applied.take() {
            Some(applied) => self.write(applied, Change::Same),
            None => self.read_and_apply(),
        }
    }

    fn note_loaded(&mut self, loaded: &LoadedConfig) {
        if self.last_loaded.as_ref() == Some(loaded) {
            return;
        }
        if let ConfigSource::Missing(path) = &loaded.source {
            let had_file = self
                .last_loaded
                .as_ref()
                .is_some_and(|last| !matches!(last.source, ConfigSource::Missing(_)));
            if had_file {
                tracing::warn!(path = %path.display(), "config file removed; reverting to the default values, as upstream does");
            } else {
                tracing::info!(path = %path.display(), "no config file; using default values");
            }
        }
        for warning in &loaded.warnings {
            tracing::warn!("{warning}");
        }
        self.last_loaded = Some(loaded.clone());
    }

    fn report_config_error(&mut self, message: &str) {
        let now = Instant::now();
        let repeat = matches!(&self.last_error, Some((last, at)) if last == message && now.duration_since(*at) < REPEAT_ERROR_EVERY);
        if repeat {
            tracing::debug!("config still rejected: {message}");
            return;
        }
        let keeping = if self.applied.is_some() {
            "keeping the last good rules"
        } else {
            "nothing applied yet"
        };
        tracing::error!("config rejected, {keeping}: {message}");
        self.last_error = Some((message.to_string(), now));
    }

    fn apply(&mut self, config: Config, policy: Policy) -> SyncOutcome {
        let change = match &self.applied {
            None => Change::First,
            Some(applied) if applied.policy == policy => Change::Same,
            Some(_) => Change::Changed,
        };
        self.write(Applied { config, policy }, change)
    }

    /// Makes the kernel hold `next`; `change` says how it differs from what is applied
    /// (with [`Change::Same`] the caller may have taken it out of `self.applied`: it is
    /// put back whatever happens).
    fn write(&mut self, next: Applied, change: Change) -> SyncOutcome {
        let started = Instant::now();
        let report = match self.backend.sync(&next.policy) {
            Ok(report) => report,
            Err(err) => {
                let outcome = self.sync_failed(&err, format!("{err}"), started, &next.config);
                if change == Change::Same {
                    self.applied = Some(next);
                }
                return outcome;
            }
        };
        // The backend's sync alone: rules read, compared and written.
        let synced_in = started.elapsed();
        self.report_read_notes();
        let changed = change != Change::Same;
        let first = change == Change::First;
        let Applied { config, policy } = next;
        // Recorded before the log line, so whoever sees "rules applied" sees the metrics.
        if changed {
            let prefixes: Vec<PrefixCounts> = policy
                .families
                .iter()
                .map(|f| PrefixCounts {
                    family: f.family.label(),
                    non_masquerade: f.non_masq.0.len(),
                    force: f.force.len(),
                    sources: f.sources.as_ref().map(Vec::len),
                })
                .collect();
            self.telemetry
                .applied(&fingerprint(&config), self.backend.kind(), &prefixes);
        }
        if changed {
            let prefixes: usize = policy.families.iter().map(|f| f.non_masq.0.len()).sum();
            tracing::info!(
                prefixes,
                rules = report.rules,
                resync_interval = ?config.resync_interval,
                elapsed_ms = format!("{:.3}", synced_in.as_secs_f64() * 1e3),
                since_start_ms = format!("{:.3}", self.started.elapsed().as_secs_f64() * 1e3),
                processes = report.processes,
                "{}",
                if first { "rules applied" } else { "config changed; rules applied" }
            );
        } else if report.wrote {
            self.drift_repairs += 1;
            self.telemetry.drift_repaired();
            tracing::info!(
                rules = report.rules,
                processes = report.processes,
                "the kernel's rules differed from the config; rewritten"
            );
        } else {
            tracing::debug!(
                rules = report.rules,
                elapsed_ms = format!("{:.3}", started.elapsed().as_secs_f64() * 1e3),
                processes = report.processes,
                config_read = self.config_read,
                "rules resynced"
            );
        }
        let resync_interval = config.resync_interval;
        let previous = self.applied.replace(Applied { config, policy });
        match (previous, &self.flows, &self.applied) {
            (Some(previous), Some(flows), Some(applied)) if changed => {
                flows.submit(&previous.policy, &applied.policy);
            }
            // The first sync, or a repair of drift, wrote over rules that decided the
            // existing flows: when the backend knows exactly what those decided (the
            // rules of another config before a restart, none at all while the jump was
            // missing), the flows they decided otherwise are re-decided too. Not while
            // another agent runs here and the "drift" is its rules: two agents of two
            // configs (a rolling update to a new ConfigMap) rewrite each other's rules
            // at every resync, and re-deciding each time would give a live UDP flow a
            // new source port every few seconds.
            // (On an unchanged config `previous` may be None: the caller took it out.)
            (_, Some(flows), Some(applied)) if report.wrote => {
                let others = match &self.other_agents {
                    Some(list) if !first => list(),
                    _ => Vec::new(),
                };
                if let Some(other) = others.first() {
                    if !self.fighting_said {
                        tracing::warn!(
                            other_pid = other.pid,
                            "another agent runs in this network namespace and its rules differ: each rewrites the other's at every resync until one stops; existing flows are not re-decided meanwhile"
                        );
                        self.fighting_said = true;
                    }
                } else if let Some(replaced) = self.backend.replaced_decisions() {
                    let old = replaced_policy(&replaced, &self.settings.policy_settings);
                    flows.submit(&old, &applied.policy);
                }
            }
            _ => {}
        }
        if !report.wrote || changed {
            self.fighting_said = false;
        }
        if self.consecutive_backend_failures > 0 {
            tracing::info!(
                "rules written again after {} failed attempt(s)",
                self.consecutive_backend_failures
            );
        }
        self.consecutive_backend_failures = 0;
        self.telemetry.sync_finished(
            SyncResult::Success,
            started.elapsed(),
            resync_interval,
            None,
        );
        // Only after our own rules are in force, so traffic is never left unmasqueraded,
        // and after the success is recorded: a removal whose tool hangs until its deadline
        // must not keep /readyz and /healthz from saying the rules are in force.
        // A removal that fails does not fail the sync: the agent's own rules are in
        // force, and a restart would not remove them either (an iptables-legacy-save that
        // cannot fit in the pod's memory limit, say). It is logged, shown in /healthz
        // and counted, and retried with backoff.
        if let Err(err) = self.remove_leftovers() {
            let (failures, _) = self.leftover_failures;
            let failures = failures.saturating_add(1);
            let wait = match failures {
                1 => Duration::ZERO,
                n => Duration::from_secs(1u64 << (n - 2).min(10)).min(LEFTOVER_RETRY_CAP),
            };
            self.leftover_failures = (failures, Some(Instant::now() + wait));
            let when = if wait.is_zero() {
                "retried at the next sync".to_string()
            } else {
                format!("retried in {wait:?}")
            };
            tracing::error!(
                attempt = failures,
                kind = err.kind().label(),
                "removing the agent's rules where it no longer works failed ({when}): {err}"
            );
            self.telemetry.leftovers_pending(Some(format!(
                "the agent's rules where it no longer works could not be removed ({failures} attempt(s); {when}): {err}"
            )));
            // The agent's own rules stayed in force all along: the loop is alive and the
            // success stands as of now (liveness counts from it; nothing more is counted).
            self.telemetry.success_stands();
        }
        let full = self
            .last_full_survey
            .is_none_or(|at| at.elapsed() >= FULL_SURVEY_EVERY);
        if full {
            self.last_full_survey = Some(Instant::now());
        }
        // A sync that ran no process read no nat table (the backends read them only
        // through iptables-save or nft), so an unchanged policy has nothing new to
        // survey: skipping it spares hashing what the last read kept (megabytes at
        // 50,000 prefixes) at every idle resync.
        if full || changed || report.processes > 0 {
            self.survey_srcnat(full);
        }
        // Addresses float and interfaces come and go: while the keys are set, every sync
        // looks (a dump of the local routes and the interface names, no process).
        let egress_keys = self.applied.as_ref().is_some_and(|a| {
            a.policy.out_interfaces.is_some()
                || a.policy.families.iter().any(|f| f.snat_to.is_some())
        });
        if full || changed || egress_keys {
            self.check_egress();
        }
        SyncOutcome::Applied { changed }
    }

    fn remove_leftovers(&mut self) -> Result<(), SyncError> {
        let Some((leftovers, runner)) = &self.leftovers else {
            return Ok(());
        };
        if !self.leftovers_pending {
            return Ok(());
        }
        if let (_, Some(next)) = self.leftover_failures
            && Instant::now() < next
        {
            return Ok(());
        }
        for line in leftovers.remove(runner)? {
            tracing::info!("{line}");
        }
        self.leftovers_pending = false;
        if self.leftover_failures.0 > 0 {
            self.telemetry.leftovers_pending(None);
        }
        self.leftover_failures = (0, None);
        Ok(())
    }

    fn sync_failed(
        &mut self,
        err: &SyncError,
        message: String,
        started: Instant,
        config: &Config,
    ) -> SyncOutcome {
        let kind = err.kind();
        self.telemetry.sync_error(kind.label());
        if kind == SyncErrorKind::Interrupted {
            tracing::info!("sync interrupted: the agent is stopping");
            return SyncOutcome::BackendFailed;
        }
        self.consecutive_backend_failures += 1;
        self.telemetry.sync_finished(
            SyncResult::Failure,
            started.elapsed(),
            config.resync_interval,
            Some(format!("{}: {message}", kind.label())),
        );
        tracing::error!(
            attempt = self.consecutive_backend_failures,
            kind = kind.label(),
            "syncing masquerade rules failed: {message}"
        );
        // Rules the agent cannot read (native nft rules in POSTROUTING, say) or may not
        // flush (someone else's in its chain) leave the node deciding by others' rules
        // and the agent's leftovers: surveyed, as after a success, at the first such
        // failure and then as often as a full survey runs.
        if matches!(
            kind,
            SyncErrorKind::Unreadable | SyncErrorKind::ForeignChain
        ) {
            let full = self
                .last_full_survey
                .is_none_or(|at| at.elapsed() >= FULL_SURVEY_EVERY);
            if full || self.consecutive_backend_failures == 1 {
                self.last_full_survey = Some(Instant::now());
                let policy = Policy::new(config, &self.settings.policy_settings);
                self.survey_srcnat_for(&policy, true);
            }
        }
        SyncOutcome::BackendFailed
    }

    /// How long to wait before the next sync.
    pub fn next_wait(&self) -> Duration {
        let interval = self
            .last_loaded
            .as_ref()
            .filter(|_| self.last_error.is_none())
            .map(|l| l.config.resync_interval)
            .or_else(|| self.applied.as_ref().map(|a| a.config.resync_interval))
            .unwrap_or_else(|| Config::defaults(self.settings.parse_options).resync_interval);
        let wait = if self.consecutive_backend_failures == 0 {
            interval
        } else {
            let exponent = self.consecutive_backend_failures.saturating_sub(1).min(16);
            FIRST_RETRY.saturating_mul(1 << exponent).min(interval)
        };
        // A missing or empty file is looked at again when its grace period ends.
        match self.defaults_since {
            Some(since) => wait.min(DEFAULTS_GRACE.saturating_sub(since.elapsed()).max(SETTLE)),
            None => wait,
        }
    }

    /// Syncs that found the kernel out of step with an unchanged config.
    pub fn drift_repairs(&self) -> u64 {
        self.drift_repairs
    }

    pub fn last_outcome(&self) -> Option<&SyncOutcome> {
        self.last_outcome.as_ref()
    }

    /// Says what happens to the rules on the way out.
    fn log_exit(&self, why: &str) {
        if self.settings.cleanup_on_exit && !self.settings.dry_run {
            tracing::info!("{why}: exiting; removing the agent's rules first (--cleanup-on-exit)");
        } else {
            tracing::info!("{why}: exiting and leaving the rules in place");
        }
    }

    /// Swallows the burst of events that follows the first, until it settles or a commit
    /// ends it (kubelet's `..data_tmp` is followed at once by the `..data` rename); what
    /// the next sync follows, or None if an event asks to exit.
    fn settle(&self, events: &Receiver<Event>) -> Option<Trigger> {
        let until = Instant::now() + SETTLE;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match events.recv_timeout(left) {
                Ok(Event::Shutdown(why)) => {
                    self.log_exit(why);
                    return None;
                }
                Ok(Event::Commit(_)) => return (!self.drain(events)).then_some(Trigger::Commit),
                Ok(Event::Reload(_)) => {}
                Err(_) => break,
            }
        }
        Some(Trigger::Change)
    }

    /// Takes the events already queued (without waiting); true if one asks to exit.
    fn drain(&self, events: &Receiver<Event>) -> bool {
        while let Ok(event) = events.try_recv() {
            if let Event::Shutdown(why) = event {
                self.log_exit(why);
                return true;
            }
        }
        false
    }

    /// Syncs now and then after every wait, until a shutdown event arrives.
    pub fn run(&mut self, events: &Receiver<Event>) {
        tracing::info!(backend = %self.backend.describe(), config = %self.settings.config.path().display(), "starting");
        let mut trigger = Trigger::Change;
        loop {
            self.sync(trigger);
            trigger = match events.recv_timeout(self.next_wait()) {
                Ok(Event::Shutdown(why)) => {
                    self.log_exit(why);
                    return;
                }
                Ok(Event::Reload(why)) => {
                    tracing::debug!("{why}: reloading");
                    match self.settle(events) {
                        Some(trigger) => trigger,
                        None => return,
                    }
                }
                Ok(Event::Commit(why)) => {
                    tracing::debug!("{why}: reloading");
                    if self.drain(events) {
                        return;
                    }
                    Trigger::Commit
                }
                Err(RecvTimeoutError::Timeout) => Trigger::Resync,
                Err(RecvTimeoutError::Disconnected) => return,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SyncReport;
    use crate::cli::Cli;
    use std::cell::RefCell;
    use std::ffi::OsString;
    use std::rc::Rc;

    /// Records what it is asked to write and fails on demand; tests the loop's
    /// decisions, while the real kernel path is covered by tests/ in namespaces.
    struct Recorder {
        synced: Rc<RefCell<Vec<Policy>>>,
        fail: Rc<RefCell<bool>>,
    }

    impl Backend for Recorder {
        fn describe(&self) -> String {
            "recorder".into()
        }
        fn kind(&self) -> &'static str {
            "recorder"
        }
        fn diff(&mut self, _: &Policy) -> Result<Vec<String>, SyncError> {
            Ok(Vec::new())
        }
        fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError> {
            if *self.fail.borrow() {
                return Err(SyncError::Unusable("iptables-restore failed".into()));
            }
            self.synced.borrow_mut().push(policy.clone());
            Ok(SyncReport::default())
        }
    }

    struct Fixture {
        agent: Agent,
        synced: Rc<RefCell<Vec<Policy>>>,
        fail: Rc<RefCell<bool>>,
        file: std::path::PathBuf,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            if let Some(dir) = self.file.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn fixture(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("ima-agent-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ip-masq-agent");
        let _ = std::fs::remove_file(&file);
        let cli = Cli::parse_go_style(
            ["ip-masq-agent", "--config", file.to_str().unwrap()].map(OsString::from),
        )
        .unwrap();
        let synced = Rc::new(RefCell::new(Vec::new()));
        let fail = Rc::new(RefCell::new(false));
        let backend = Recorder {
            synced: synced.clone(),
            fail: fail.clone(),
        };
        Fixture {
            agent: Agent::new(cli.agent.settings(), Box::new(backend)),
            synced,
            fail,
            file,
        }
    }

    fn prefixes(policy: &Policy) -> Vec<String> {
        policy.families[0]
            .non_masq
            .0
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn bad_config_keeps_the_last_good_policy() {
        let mut f = fixture("lkg");
        std::fs::write(
            &f.file,
            "nonMasqueradeCIDRs: [10.0.0.0/8]\nresyncInterval: 5s\n",
        )
        .unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.1/8]\n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
        let synced = f.synced.borrow();
        assert_eq!(synced.len(), 2);
        assert_eq!(prefixes(&synced[1]), vec!["10.0.0.0/8"]);
        assert_eq!(f.agent.next_wait(), Duration::from_secs(5));
    }

    #[test]
    fn bad_config_at_start_writes_nothing() {
        let mut f = fixture("badstart");
        std::fs::write(&f.file, "resyncInterval: 0s\n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
        assert!(f.synced.borrow().is_empty());
        assert_eq!(f.agent.next_wait(), Duration::from_secs(60));
    }

    /// Issue 16, suspected and confirmed: with a rejected config at the first start no
    /// sync ever succeeded, so /healthz turned 503 after 3 x resyncInterval + tool
    /// timeout and kubelet would restart the pod forever, though a restart cannot fix
    /// the file and the README says a rejected config is not a failed sync.
    #[test]
    fn regression_a_rejected_first_config_turns_healthz_503() {
        let mut f = fixture("rejected-health");
        let created = Instant::now();
        let telemetry = Arc::new(Telemetry::new());
        telemetry.set_sync_deadline(Duration::from_secs(1));
        f.agent.telemetry = telemetry.clone();
        // 3 x the default 60 s resyncInterval + the 1 s deadline.
        let bound = Duration::from_secs(181);
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.1/8]\n").unwrap();
        std::thread::sleep(Duration::from_millis(40));
        let read = Instant::now();
        assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
        // Just past the bound counted from start-up, but within it counted from the
        // loop's last read of the rejected file: the loop is alive.
        let probed = created + bound + Duration::from_millis(20);
        assert!(probed < read + bound);
        let body = telemetry
            .liveness_at(probed)
            .expect("a loop that keeps reading a rejected first config is alive");
        assert!(body.contains("config rejected"), "{body}");
        assert!(
            telemetry.readiness().is_err(),
            "nothing is applied: not ready"
        );
        assert!(f.synced.borrow().is_empty());
        // A loop that stopped reading is not.
        assert!(
            telemetry
                .liveness_at(read + bound + Duration::from_secs(2))
                .is_err()
        );
        // Once a sync has been attempted and fails, the bound counts from start-up again.
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        *f.fail.borrow_mut() = true;
        assert_eq!(f.agent.sync_once(), SyncOutcome::BackendFailed);
        assert!(telemetry.liveness_at(probed).is_err());
    }

    /// Issue 15 #8: truncating the file and writing it 50 ms later applied the defaults
    /// node-wide in between.
    #[test]
    fn regression_a_truncated_file_applies_the_defaults_at_once() {
        let mut f = fixture("truncated");
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        std::fs::write(&f.file, "").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Deferred);
        assert!(f.agent.next_wait() <= DEFAULTS_GRACE);
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        assert_eq!(f.agent.next_wait(), Duration::from_secs(60));
        // Whitespace, or no file at all, is the same nothing.
        std::fs::write(&f.file, "\n  \n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Deferred);
        std::fs::remove_file(&f.file).unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Deferred);
        let synced = f.synced.borrow().clone();
        assert!(
            synced
                .iter()
                .all(|p| prefixes(p).first().map(String::as_str) == Some("10.0.0.0/8")),
            "the defaults were written: {:?}",
            synced.iter().map(prefixes).collect::<Vec<_>>()
        );
        assert_eq!(synced.len(), 5, "the applied rules are still re-synced");
    }

    #[test]
    fn a_file_that_stays_missing_brings_the_defaults_after_the_grace_period() {
        let mut f = fixture("stays-missing");
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        f.agent.sync_once();
        std::fs::remove_file(&f.file).unwrap();
        assert_eq!(f.agent.sync(Trigger::Resync), SyncOutcome::Deferred);
        // As if the grace period had passed.
        f.agent.defaults_since = Some(Instant::now() - DEFAULTS_GRACE);
        assert_eq!(
            f.agent.sync(Trigger::Resync),
            SyncOutcome::Applied { changed: true }
        );
        let synced = f.synced.borrow();
        assert_eq!(
            prefixes(synced.last().unwrap()),
            vec!["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
        );
        assert_eq!(f.agent.defaults_since, None);
    }

    #[test]
    fn a_configmap_commit_that_empties_the_file_waits_out_the_grace_too() {
        // A volume set up anew commits `..data` before the key's link is there: for that
        // moment a commit reads no file, which is no reason to flip the node.
        let mut f = fixture("commit-empty");
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        f.agent.sync_once();
        std::fs::remove_file(&f.file).unwrap();
        assert_eq!(f.agent.sync(Trigger::Commit), SyncOutcome::Deferred);
        f.agent.defaults_since = Some(Instant::now() - DEFAULTS_GRACE);
        assert_eq!(
            f.agent.sync(Trigger::Commit),
            SyncOutcome::Applied { changed: true }
        );
        // A file written on purpose with the default values is not nothing.
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        f.agent.sync_once();
        std::fs::write(
            &f.file,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]\n",
        )
        .unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
    }

    /// A watch on the fixture's directory that reports nothing (no name is of interest):
    /// only the files' identities can tell a change.
    fn blind_watch(f: &Fixture) -> ConfigWatch {
        ConfigWatch::start(f.file.parent().unwrap(), |_| false, |_| {}).unwrap()
    }

    #[test]
    fn an_idle_resync_reads_the_config_only_if_it_may_have_changed() {
        let mut f = fixture("idle-read");
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        // The file's times must lie behind the read to prove anything.
        std::thread::sleep(crate::config::source::SAME_TICK_MARGIN + Duration::from_millis(100));
        f.agent.watch = Some(blind_watch(&f));
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        assert!(f.agent.read_proof.is_some());
        for _ in 0..3 {
            assert_eq!(
                f.agent.sync(Trigger::Resync),
                SyncOutcome::Applied { changed: false }
            );
            assert!(!f.agent.config_read, "an idle resync read the config");
        }
        assert_eq!(f.synced.borrow().len(), 4, "the kernel is still resynced");
        // SIGHUP or a change the watch saw reads it whatever the proof says.
        f.agent.sync(Trigger::Change);
        assert!(f.agent.config_read);
        // An edit the (blind) watch misses: the identity tells.
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8, 10.1.0.0/16]\n").unwrap();
        assert_eq!(
            f.agent.sync(Trigger::Resync),
            SyncOutcome::Applied { changed: true }
        );
        assert!(f.agent.config_read);
        // Written just now: proves nothing yet, so the next resync reads again.
        assert!(f.agent.read_proof.is_none());
        f.agent.sync(Trigger::Resync);
        assert!(f.agent.config_read);
        // A lost watch proves nothing either.
        f.agent.read_proof = Some(ReadProof {
            watch: WatchProof {
                armed: false,
                changes: 0,
            },
            identity: f.agent.settings.config.identity().unwrap(),
            at: Instant::now(),
        });
        f.agent.sync(Trigger::Resync);
        assert!(f.agent.config_read);
        // Found by the hostile review: an edit that moves no timestamp and sends no event
        // (a write through a shared mapping) was never read; a proof older than the
        // backstop proves nothing.
        let watch = f.agent.watch.as_ref().map(ConfigWatch::proof).unwrap();
        f.agent.read_proof = Some(ReadProof {
            watch,
            identity: f.agent.settings.config.identity().unwrap(),
            at: Instant::now() - FULL_READ_EVERY,
        });
        f.agent.sync(Trigger::Resync);
        assert!(
            f.agent.config_read,
            "regression: an old proof kept an idle resync from reading"
        );
    }

    #[test]
    fn missing_file_means_defaults() {
        let mut f = fixture("missing");
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        assert_eq!(
            prefixes(&f.synced.borrow()[0]),
            vec!["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
        );
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: false });
    }

    /// Regression: before v2.12.2 upstream slept with the previous config's interval.
    #[test]
    fn regression_wait_uses_the_interval_just_loaded() {
        let mut f = fixture("interval");
        std::fs::write(&f.file, "resyncInterval: 2s\n").unwrap();
        f.agent.sync_once();
        assert_eq!(f.agent.next_wait(), Duration::from_secs(2));
        std::fs::write(&f.file, "resyncInterval: 1m\n").unwrap();
        f.agent.sync_once();
        assert_eq!(f.agent.next_wait(), Duration::from_secs(60));
    }

    /// Log lines written while `body` runs (this thread only).
    fn logs_of(body: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, body);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn regression_last_known_good_survives_a_failed_reapply() {
        let mut f = fixture("lkg-fail");
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.1/8]\n").unwrap();
        let logs = logs_of(|| {
            assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
            *f.fail.borrow_mut() = true;
            assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
            *f.fail.borrow_mut() = false;
            // Before the fix the last good rules were forgotten here for good.
            for _ in 0..3 {
                assert_eq!(f.agent.sync_once(), SyncOutcome::ConfigRejected);
            }
        });
        let synced = f.synced.borrow();
        assert_eq!(
            synced.len(),
            5,
            "the first apply, then 4 successful re-applies"
        );
        assert!(synced.iter().all(|p| prefixes(p) == ["10.0.0.0/8"]));
        // Re-applying the same rules is not news.
        assert!(!logs.contains("rules applied"), "{logs}");
    }

    #[test]
    fn regression_other_backends_rules_are_removed_after_the_first_sync_and_retried() {
        use crate::kernel::fake::{FakeRunner, Fault};
        let runner = FakeRunner::new();
        runner.add_nft_table("inet ip-masq-agent", "table inet ip-masq-agent {\n}\n");
        runner.inject(
            "netlink nf_tables read",
            Fault::Fails("simulated failure"),
            Some(1),
        );
        let mut f = fixture("leftovers");
        f.agent.leftovers = Some((
            Leftovers::of_iptables_backend(
                &ChainName::default(),
                crate::backend::iptables::Flavour::Nft,
            ),
            runner.clone(),
        ));
        f.agent.leftovers_pending = true;
        // Our rules are written, then removing the other backend's fails: the sync still
        // applied (rv4 #2: a removal that can never succeed must not fail every sync and
        // have kubelet restart the agent for ever); /healthz says so in a note.
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        assert_eq!(f.synced.borrow().len(), 1);
        assert!(runner.nft_table("inet ip-masq-agent").is_some());
        let body = f.agent.telemetry.liveness().unwrap();
        assert!(body.contains("could not be removed"), "{body}");
        // Retried at the next sync.
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: false });
        assert!(runner.nft_table("inet ip-masq-agent").is_none());
        assert!(
            !f.agent
                .telemetry
                .liveness()
                .unwrap()
                .contains("could not be removed")
        );
        let calls = runner.calls().len();
        f.agent.sync_once();
        assert_eq!(
            runner.calls().len(),
            calls,
            "removed once, not at every sync"
        );
    }

    #[test]
    fn a_change_of_decisions_reaches_existing_udp_flows_and_nothing_else() {
        use crate::kernel::fake::FakeRunner;
        let runner = FakeRunner::new();
        // The node's address, which the flows are masqueraded to.
        runner.set_local_prefixes(crate::policy::Family::V4, &["127.0.0.0/8", "192.0.2.1/32"]);
        runner.set_conntrack(
            "ipv4",
            "udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40000 mark=0 use=1\n\
             udp      17 29 src=10.244.1.2 dst=198.51.100.7 sport=40001 dport=53 src=198.51.100.7 dst=192.0.2.1 sport=53 dport=40001 mark=0 use=1\n",
        );
        let mut f = fixture("conntrack");
        f.agent.start_conntrack(runner.clone());
        let settled = |f: &Fixture| {
            if let Some(flows) = &f.agent.flows {
                flows.wait_idle();
            }
        };
        std::fs::write(&f.file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        f.agent.sync_once();
        settled(&f);
        // The first sync changes no decision a flow was made under: nothing listed.
        assert!(runner.calls().is_empty(), "{:?}", runner.calls());
        std::fs::write(
            &f.file,
            "nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n",
        )
        .unwrap();
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        settled(&f);
        let commands: Vec<String> = runner.calls().into_iter().map(|c| c.command).collect();
        // One dump of the IPv4 table, one delete; no process.
        assert_eq!(
            commands,
            ["netlink conntrack dump ipv4", "netlink conntrack delete 1",]
        );
        assert_eq!(
            runner.conntrack_entries().len(),
            1,
            "the flow outside the changed range keeps its entry"
        );
        // An unchanged config never touches conntrack.
        f.agent.sync_once();
        settled(&f);
        assert_eq!(runner.calls().len(), 2);
    }

    /// rv1 (live-traffic review) #3: flows were re-decided only after a config change
    /// while the agent ran. Restarted with another config (a rollout), it wrote over the
    /// old rules and left every UDP flow they had decided as it was; after a drift repair
    /// (the jump deleted by hand for a while) likewise.
    #[test]
    fn regression_flows_decided_by_the_rules_a_sync_replaced_are_re_decided() {
        use crate::backend::iptables::{IptablesBackend, IptablesMode};
        use crate::kernel::fake::FakeRunner;
        let runner = FakeRunner::new();
        runner.set_local_prefixes(crate::policy::Family::V4, &["127.0.0.0/8", "192.0.2.1/32"]);
        // The rules of the previous run: `nonMasqueradeCIDRs: []` masquerades everything.
        let dir = std::env::temp_dir().join(format!("ima-agent-{}-replaced", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("ip-masq-agent");
        let settings = |file: &std::path::Path| {
            Cli::parse_go_style(
                [
                    "ip-masq-agent",
                    "--config",
                    file.to_str().unwrap(),
                    "--conntrack-cleanup=udp",
                ]
                .map(OsString::from),
            )
            .unwrap()
            .agent
            .settings()
        };
        let old_config = crate::config::parse(
            "nonMasqueradeCIDRs: []\n",
            std::path::Path::new("old"),
            crate::config::ParseOptions::default(),
        )
        .unwrap()
        .config;
        let old = Policy::new(&old_config, &settings(&file).policy_settings);
        runner.restore_nat(
            "iptables-nft",
            &crate::backend::iptables::render(&old, &ChainName::default())
                .lines()
                .filter(|line| !line.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        runner.set_conntrack(
            "ipv4",
            "udp      17 29 src=10.244.1.2 dst=10.99.0.10 sport=40000 dport=9999 src=10.99.0.10 dst=192.0.2.1 sport=9999 dport=40000 mark=0 use=1\n\
             udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40001 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40001 mark=0 use=1\n",
        );
        std::fs::write(&file, "nonMasqueradeCIDRs: [10.0.0.0/8]\n").unwrap();
        let shared: SharedRunner = runner.clone();
        let backend = IptablesBackend::new(
            ChainName::default(),
            IptablesMode::Nft,
            false,
            shared.clone(),
        )
        .unwrap();
        let mut agent = Agent::new(settings(&file), Box::new(backend));
        agent.start_conntrack(shared);
        // The destinations of the flows left once the worker is done.
        let left_after = |agent: &Agent| -> Vec<String> {
            if let Some(flows) = &agent.flows {
                flows.wait_idle();
            }
            runner
                .conntrack_entries()
                .iter()
                .map(|e| e.original.destination.to_string())
                .collect()
        };
        assert_eq!(agent.sync_once(), SyncOutcome::Applied { changed: true });
        // Masqueraded under the old rules, kept by the new: re-decided. The other flow's
        // decision is the same under both: left alone.
        assert_eq!(left_after(&agent), ["203.0.113.10"]);

        // Drift: the jump deleted by hand; a flow starts unmasqueraded meanwhile.
        runner.restore_nat(
            "iptables-nft",
            &format!(
                "*nat\n-D POSTROUTING {}\nCOMMIT\n",
                crate::backend::iptables::jump_spec_for(&ChainName::default())
            ),
        );
        runner.set_conntrack(
            "ipv4",
            "udp      17 29 src=10.244.1.2 dst=198.51.100.7 sport=40002 dport=53 src=198.51.100.7 dst=10.244.1.2 sport=53 dport=40002 mark=0 use=1\n",
        );
        runner.bump_generation();
        assert_eq!(agent.sync_once(), SyncOutcome::Applied { changed: false });
        assert_eq!(
            left_after(&agent),
            ["203.0.113.10"],
            "the unmasqueraded flow is re-decided"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_writes_back_off_up_to_the_interval() {
        let mut f = fixture("backoff");
        std::fs::write(&f.file, "resyncInterval: 5s\n").unwrap();
        *f.fail.borrow_mut() = true;
        let waits: Vec<Duration> = (0..5)
            .map(|_| {
                assert_eq!(f.agent.sync_once(), SyncOutcome::BackendFailed);
                f.agent.next_wait()
            })
            .collect();
        assert_eq!(waits, [1, 2, 4, 5, 5].map(Duration::from_secs));
        *f.fail.borrow_mut() = false;
        assert_eq!(f.agent.sync_once(), SyncOutcome::Applied { changed: true });
        assert_eq!(f.agent.next_wait(), Duration::from_secs(5));
    }
}
