//! What the agent reports about itself: Prometheus metrics and the health state behind
//! /healthz and /readyz. The agent loop writes it; the HTTP thread reads it.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: &'static str,
}

/// Prefix counts of one family of an applied config.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixCounts {
    pub family: &'static str,
    pub non_masquerade: usize,
    pub force: usize,
    /// None when every source is masqueraded (no masqueradeSourceCIDRs).
    pub sources: Option<usize>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProtocolLabels {
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpectedLabels {
    expected: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConfigLabels {
    hash: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PrefixLabels {
    family: &'static str,
    backend: &'static str,
}

/// How one sync ended, for the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncResult {
    Success,
    /// Writing the rules failed.
    Failure,
}

#[derive(Debug)]
struct Health {
    started: Instant,
    /// How long one sync may legitimately take (its tools' deadline): part of the
    /// liveness bound, so a slow but working sync is not called dead.
    sync_deadline: Duration,
    last_attempt_ok: Option<bool>,
    last_success: Option<Instant>,
    last_error: Option<String>,
    resync_interval: Duration,
    /// Set when the HTTP endpoint could only be bound after failed attempts.
    late_bind: Option<LateBind>,
    /// How the last sync had to read the kernel, when out of the ordinary.
    read_notes: Vec<String>,
    /// Why the agent's rules where it no longer works are still there, while they are.
    leftovers: Option<String>,
    /// Before any sync was attempted: when the loop last read a config it rejected, and
    /// why. The loop is alive while it keeps reading; a restart would not fix the file.
    waiting_for_config: Option<(Instant, String)>,
}

#[derive(Debug)]
struct LateBind {
    failed_attempts: u64,
    after_start: Duration,
}

pub struct Telemetry {
    registry: Registry,
    syncs: Family<ResultLabels, Counter>,
    sync_duration: Histogram,
    last_success_time: Gauge<f64, AtomicU64>,
    reloads: Family<ResultLabels, Counter>,
    config_info: Family<ConfigLabels, Gauge>,
    prefixes: Family<PrefixLabels, Gauge>,
    force_prefixes: Family<FamilyLabels, Gauge>,
    source_prefixes: Family<FamilyLabels, Gauge>,
    drift_repairs: Counter,
    preceding_nat_rules: Family<ExpectedLabels, Gauge>,
    following_nat_rules: Gauge,
    leftovers_stuck: Gauge,
    sync_errors: Family<KindLabels, Counter>,
    conntrack_deleted: Family<ProtocolLabels, Counter>,
    conntrack_stale: Family<ProtocolLabels, Gauge>,
    http_endpoint_bound: Gauge,
    http_bind_failures: Counter,
    http_accept_errors: Counter,
    read_by_chain: Gauge,
    output_interfaces: Gauge,
    output_address_present: Family<FamilyLabels, Gauge>,
    http_connections_closed: Counter,
    health: Mutex<Health>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("ip_masq_agent");
        let syncs = Family::<ResultLabels, Counter>::default();
        let sync_duration = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let last_success_time = Gauge::<f64, AtomicU64>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        let config_info = Family::<ConfigLabels, Gauge>::default();
        let prefixes = Family::<PrefixLabels, Gauge>::default();
        let force_prefixes = Family::<FamilyLabels, Gauge>::default();
        let source_prefixes = Family::<FamilyLabels, Gauge>::default();
        let drift_repairs = Counter::default();
        let preceding_nat_rules = Family::<ExpectedLabels, Gauge>::default();
        let following_nat_rules = Gauge::default();
        let leftovers_stuck = Gauge::default();
        let sync_errors = Family::<KindLabels, Counter>::default();
        let conntrack_deleted = Family::<ProtocolLabels, Counter>::default();
        let conntrack_stale = Family::<ProtocolLabels, Gauge>::default();
        registry.register(
            "conntrack_deleted_flows",
            "Conntrack entries deleted after a change of decisions, so the flow's next packet follows the new rules (UDP only)",
            conntrack_deleted.clone(),
        );
        registry.register(
            "conntrack_stale_flows",
            "Flows still carrying the old decision after the last change, left alone because deleting them would break them (TCP, SCTP, ...)",
            conntrack_stale.clone(),
        );
        let http_endpoint_bound = Gauge::default();
        let http_bind_failures = Counter::default();
        let http_accept_errors = Counter::default();
        let read_by_chain = Gauge::default();
        let output_interfaces = Gauge::default();
        let output_address_present = Family::<FamilyLabels, Gauge>::default();
        registry.register(
            "output_interfaces",
            "Interface patterns outputInterface lists (-1: the key is absent, every interface masquerades)",
            output_interfaces.clone(),
        );
        registry.register(
            "output_address_present",
            "1 when this node holds outputAddress (family=\"ipv4\") or outputAddressIPv6, 0 when not: replies to an address the node does not hold never come back",
            output_address_present.clone(),
        );
        registry.register(
            "nat_tables_read_by_chain",
            "nat tables the last sync could not read in full: a chain on the POSTROUTING path iptables-nft cannot list (native nft rules), or more chains reached than it reads (64)",
            read_by_chain.clone(),
        );
        let http_connections_closed = Counter::default();
        registry.register(
            "syncs",
            "Syncs of the kernel's rules, by result",
            syncs.clone(),
        );
        registry.register(
            "sync_errors",
            "Failed syncs by kind: foreign_chain, tool_missing, tool_failed, tool_timed_out, interrupted, unusable, unreadable (a listing the agent could not read; nothing was written on it)",
            sync_errors.clone(),
        );
        registry.register(
            "sync_duration_seconds",
            "Time one sync took, reading and (if needed) writing the rules",
            sync_duration.clone(),
        );
        registry.register(
            "last_successful_sync_timestamp_seconds",
            "Unix time of the last sync that left the kernel matching the config",
            last_success_time.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reads, by result (success, or failure for a rejected config)",
            reloads.clone(),
        );
        registry.register(
            "config",
            "The applied config, as a hash label (value always 1)",
            config_info.clone(),
        );
        registry.register(
            "prefixes",
            "Non-masquerade prefixes installed, by family and backend",
            prefixes.clone(),
        );
        registry.register(
            "force_prefixes",
            "forceMasqueradeCIDRs prefixes of the applied config, by family",
            force_prefixes.clone(),
        );
        registry.register(
            "source_prefixes",
            "masqueradeSourceCIDRs prefixes of the applied config, by family (absent: every source is masqueraded)",
            source_prefixes.clone(),
        );
        registry.register(
            "drift_repairs",
            "Syncs that found the kernel's rules out of step with an unchanged config",
            drift_repairs.clone(),
        );
        registry.register(
            "preceding_nat_rules",
            "Other owners' NAT rules that can masquerade or SNAT before the agent's rules on srcnat (expected=\"true\": kube-proxy's mark-guarded masquerade)",
            preceding_nat_rules.clone(),
        );
        registry.register(
            "leftover_rules_stuck",
            "1 while the agent's rules where it no longer works (the other backend, the other iptables flavour) could not be removed; retried with backoff",
            leftovers_stuck.clone(),
        );
        registry.register(
            "following_nat_rules",
            "Other owners' NAT rules that run after the agent's rules on srcnat and can masquerade or SNAT a destination the config keeps",
            following_nat_rules.clone(),
        );
        registry.register(
            "http_endpoint_bound",
            "1 once this endpoint listens; 0 while its address cannot be bound (syncing goes on)",
            http_endpoint_bound.clone(),
        );
        registry.register(
            "http_bind_failures",
            "Failed attempts to bind this endpoint's address (retried in the background)",
            http_bind_failures.clone(),
        );
        registry.register(
            "http_accept_errors",
            "accept() errors on this endpoint (EMFILE, ENFILE, ENOBUFS, ...), each followed by a backoff",
            http_accept_errors.clone(),
        );
        registry.register(
            "http_connections_closed",
            "Connections this endpoint closed to make room for new ones (more open than its cap, or out of file descriptors): the ones that went longest without a request",
            http_connections_closed.clone(),
        );
        Telemetry {
            registry,
            syncs,
            sync_duration,
            last_success_time,
            reloads,
            config_info,
            prefixes,
            force_prefixes,
            source_prefixes,
            drift_repairs,
            preceding_nat_rules,
            following_nat_rules,
            leftovers_stuck,
            sync_errors,
            conntrack_deleted,
            conntrack_stale,
            http_endpoint_bound,
            http_bind_failures,
            http_accept_errors,
            read_by_chain,
            output_interfaces,
            output_address_present,
            http_connections_closed,
            health: Mutex::new(Health {
                started: Instant::now(),
                sync_deadline: Duration::ZERO,
                last_attempt_ok: None,
                last_success: None,
                last_error: None,
                resync_interval: Duration::from_secs(60),
                late_bind: None,
                read_notes: Vec::new(),
                leftovers: None,
                waiting_for_config: None,
            }),
        }
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // A poisoned lock only means a panic elsewhere; the data is still usable.
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn config_loaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// The longest a sync may take before its tools are killed (`--tool-timeout`).
    pub fn set_sync_deadline(&self, deadline: Duration) {
        self.health().sync_deadline = deadline;
    }

    /// What the last conntrack reconciliation did.
    pub fn conntrack_reconciled(&self, deleted_udp: usize, stale: &[(String, usize)]) {
        self.conntrack_deleted
            .get_or_create(&ProtocolLabels {
                protocol: "udp".into(),
            })
            .inc_by(deleted_udp as u64);
        self.conntrack_stale.clear();
        for (protocol, count) in stale {
            self.conntrack_stale
                .get_or_create(&ProtocolLabels {
                    protocol: protocol.clone(),
                })
                .set(i64::try_from(*count).unwrap_or(i64::MAX));
        }
    }

    /// Counts a failed sync by the kind of its error.
    pub fn sync_error(&self, kind: &'static str) {
        self.sync_errors.get_or_create(&KindLabels { kind }).inc();
    }

    /// The last success still stands as of now (a step after it, such as removing
    /// leftovers, took a while and changed nothing of the agent's rules).
    pub fn success_stands(&self) {
        let mut health = self.health();
        if health.last_attempt_ok == Some(true) {
            health.last_success = Some(Instant::now());
        }
    }

    /// The resync interval of the config just read (part of the liveness bound).
    pub fn resync_interval(&self, interval: Duration) {
        self.health().resync_interval = interval;
    }

    pub fn sync_finished(
        &self,
        result: SyncResult,
        took: Duration,
        resync_interval: Duration,
        error: Option<String>,
    ) {
        let label = match result {
            SyncResult::Success => "success",
            SyncResult::Failure => "failure",
        };
        self.syncs
            .get_or_create(&ResultLabels { result: label })
            .inc();
        self.sync_duration.observe(took.as_secs_f64());
        let mut health = self.health();
        health.resync_interval = resync_interval;
        health.last_attempt_ok = Some(result == SyncResult::Success);
        health.waiting_for_config = None;
        if result == SyncResult::Success {
            health.last_success = Some(Instant::now());
            health.last_error = None;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            self.last_success_time.set(now);
        } else {
            health.last_error = error;
        }
    }

    /// The loop read a config and rejected it before any sync was attempted (nothing to
    /// apply): liveness counts from this read, not from start-up.
    pub fn waiting_for_config(&self, resync_interval: Duration, problem: &str) {
        let mut health = self.health();
        if health.last_attempt_ok.is_some() {
            return;
        }
        health.resync_interval = resync_interval;
        health.waiting_for_config = Some((Instant::now(), problem.to_string()));
    }

    pub fn drift_repaired(&self) {
        self.drift_repairs.inc();
    }

    /// The NAT rules of others that act before the agent's, as the last survey found them.
    pub fn preceding_nat_rules(&self, expected: usize, unexpected: usize) {
        let gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
        for (label, count) in [("true", expected), ("false", unexpected)] {
            self.preceding_nat_rules
                .get_or_create(&ExpectedLabels { expected: label })
                .set(gauge(count));
        }
    }

    /// The NAT rules of others that run after the agent's and can NAT what it keeps.
    pub fn following_nat_rules(&self, count: usize) {
        self.following_nat_rules
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// What the egress keys meet on the node: how many interface patterns are listed,
    /// and per family whether the node holds the SNAT address.
    pub fn egress(&self, interfaces: Option<usize>, present: &[(&'static str, bool)]) {
        let listed = interfaces.map_or(-1, |count| i64::try_from(count).unwrap_or(i64::MAX));
        self.output_interfaces.set(listed);
        self.output_address_present.clear();
        for (family, held) in present {
            self.output_address_present
                .get_or_create(&FamilyLabels { family })
                .set(i64::from(*held));
        }
    }

    /// How the last sync had to read the kernel (shown in /healthz; counted).
    pub fn read_notes(&self, notes: &[String]) {
        self.read_by_chain
            .set(i64::try_from(notes.len()).unwrap_or(i64::MAX));
        self.health().read_notes = notes.to_vec();
    }

    /// Whether the agent's rules where it no longer works could not be removed (why), or
    /// are gone (None): a note in /healthz and a gauge.
    pub fn leftovers_pending(&self, why: Option<String>) {
        self.leftovers_stuck.set(i64::from(why.is_some()));
        self.health().leftovers = why;
    }

    pub fn http_bind_failed(&self) {
        self.http_bind_failures.inc();
    }

    /// The endpoint listens now, after `failed_attempts` failed binds.
    pub fn http_bound(&self, failed_attempts: u64) {
        self.http_endpoint_bound.set(1);
        if failed_attempts > 0 {
            let mut health = self.health();
            let after_start = health.started.elapsed();
            health.late_bind = Some(LateBind {
                failed_attempts,
                after_start,
            });
        }
    }

    /// The endpoint was closed for good (handed to a newer agent).
    pub fn http_unbound(&self) {
        self.http_endpoint_bound.set(0);
    }

    pub fn http_accept_failed(&self) {
        self.http_accept_errors.inc();
    }

    /// The endpoint closed `count` idle connections to make room for new ones.
    pub fn http_connections_closed(&self, count: usize) {
        self.http_connections_closed.inc_by(count as u64);
    }

    /// Records the applied config's hash and prefix counts.
    pub fn applied(&self, hash: &str, backend: &'static str, counts: &[PrefixCounts]) {
        let gauge = |count: usize| i64::try_from(count).unwrap_or(i64::MAX);
        self.config_info.clear();
        self.config_info
            .get_or_create(&ConfigLabels {
                hash: hash.to_string(),
            })
            .set(1);
        self.prefixes.clear();
        self.force_prefixes.clear();
        self.source_prefixes.clear();
        for count in counts {
            let family = count.family;
            self.prefixes
                .get_or_create(&PrefixLabels { family, backend })
                .set(gauge(count.non_masquerade));
            self.force_prefixes
                .get_or_create(&FamilyLabels { family })
                .set(gauge(count.force));
            if let Some(sources) = count.sources {
                self.source_prefixes
                    .get_or_create(&FamilyLabels { family })
                    .set(gauge(sources));
            }
        }
    }

    /// The Prometheus (OpenMetrics) text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            return format!("# encoding failed: {err}\n");
        }
        out
    }

    /// Healthy while a sync has succeeded within 3 x resyncInterval plus one sync's
    /// deadline (counted from start-up before the first success). The bound is measured
    /// from the last success, never from a sync returning: a sync stuck in a hung tool
    /// turns this unhealthy on time. A line about a late bind of the endpoint ends the
    /// body either way.
    pub fn liveness(&self) -> Result<String, String> {
        self.liveness_at(Instant::now())
    }

    /// [`Telemetry::liveness`] as it would be at `now` (tests look ahead without waiting).
    pub fn liveness_at(&self, now: Instant) -> Result<String, String> {
        let health = self.health();
        let mut note = match &health.late_bind {
            Some(late) => format!(
                "note: this endpoint was bound {:.1?} after start-up, after {} failed attempt(s); syncing did not wait for it\n",
                late.after_start, late.failed_attempts
            ),
            None => String::new(),
        };
        for read in &health.read_notes {
            note.push_str(&format!("note: {read}\n"));
        }
        if let Some(leftovers) = &health.leftovers {
            note.push_str(&format!("note: {leftovers}\n"));
        }
        Self::sync_liveness(&health, now)
            .map(|body| body + &note)
            .map_err(|body| body + &note)
    }

    fn sync_liveness(health: &Health, now: Instant) -> Result<String, String> {
        let since = health.last_success.unwrap_or(health.started);
        let grace = health
            .resync_interval
            .saturating_mul(3)
            .saturating_add(health.sync_deadline);
        if health.last_attempt_ok.is_none()
            && let Some((read, problem)) = &health.waiting_for_config
        {
            let age = now.saturating_duration_since(*read);
            return if age <= grace {
                Ok(format!(
                    "ok: config rejected {age:.1?} ago and nothing applied yet (a restart would not fix the file): {problem}\n"
                ))
            } else {
                Err(format!(
                    "unhealthy: the config was last read {age:.1?} ago (more than 3 x resyncInterval + tool timeout = {grace:?}) and nothing applied yet; it was rejected: {problem}\n"
                ))
            };
        }
        let age = now.saturating_duration_since(since);
        if age <= grace && health.last_attempt_ok == Some(true) {
            return Ok(format!("ok: the last sync succeeded {age:.1?} ago\n"));
        }
        let reason = health
            .last_error
            .as_deref()
            .unwrap_or(if health.last_attempt_ok.is_none() {
                "the first sync has not finished"
            } else {
                "no sync has succeeded yet"
            });
        if age <= grace && health.last_attempt_ok.is_none() {
            // The first sync has not finished yet: nothing failed, nothing succeeded.
            Ok(format!(
                "ok: the first sync is under way, {age:.1?} after start-up (unhealthy after {grace:?} without a success)\n"
            ))
        } else if age <= grace && health.last_success.is_none() {
            // Within the start-up grace: healthy, but no success to speak of.
            Ok(format!(
                "ok: no sync has succeeded yet, {age:.1?} after start-up (unhealthy after {grace:?}); last attempt failed: {reason}\n"
            ))
        } else if age <= grace {
            Ok(format!(
                "ok: last success {age:.1?} ago (within {grace:?}); last attempt failed: {reason}\n"
            ))
        } else if health.last_success.is_none() {
            Err(format!(
                "unhealthy: no sync has succeeded in the {age:.1?} since start-up (more than 3 x resyncInterval + tool timeout = {grace:?}); last error: {reason}\n"
            ))
        } else {
            Err(format!(
                "unhealthy: no successful sync for {age:.1?} (more than 3 x resyncInterval + tool timeout = {grace:?}); last error: {reason}\n"
            ))
        }
    }

    pub fn readiness(&self) -> Result<String, String> {
        if self.health().last_success.is_some() {
            Ok("ready\n".into())
        } else {
            Err("not ready: the first sync has not succeeded yet\n".into())
        }
    }
}

/// FNV-1a, 64 bits, over whatever a value feeds its `Hash` implementation.
struct Fnv(u64);

impl std::hash::Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A short hash of a value (a config), without formatting it first: a 50,000-prefix
/// config is hashed in a fraction of the time its Debug text takes to build.
pub fn fingerprint(value: &impl std::hash::Hash) -> String {
    let mut hasher = Fnv(0xcbf2_9ce4_8422_2325);
    value.hash(&mut hasher);
    format!("{:016x}", std::hash::Hasher::finish(&hasher))
}

/// A short, stable hash of a config's canonical text (FNV-1a, 64 bits).
pub fn config_hash(canonical: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in canonical.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_move_with_syncs() {
        let t = Telemetry::new();
        t.config_loaded(true);
        t.sync_finished(
            SyncResult::Success,
            Duration::from_millis(3),
            Duration::from_secs(60),
            None,
        );
        let counts = |non_masquerade, force, sources| PrefixCounts {
            family: "ipv4",
            non_masquerade,
            force,
            sources,
        };
        t.applied("abc", "iptables", &[counts(3, 0, None)]);
        t.drift_repaired();
        t.preceding_nat_rules(1, 2);
        let text = t.encode();
        for line in [
            "ip_masq_agent_syncs_total{result=\"success\"} 1",
            "ip_masq_agent_config_reloads_total{result=\"success\"} 1",
            "ip_masq_agent_config{hash=\"abc\"} 1",
            "ip_masq_agent_prefixes{family=\"ipv4\",backend=\"iptables\"} 3",
            "ip_masq_agent_drift_repairs_total 1",
            "ip_masq_agent_sync_duration_seconds_count 1",
            "ip_masq_agent_preceding_nat_rules{expected=\"true\"} 1",
            "ip_masq_agent_preceding_nat_rules{expected=\"false\"} 2",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        assert!(text.contains("ip_masq_agent_last_successful_sync_timestamp_seconds "));
        assert!(text.contains("ip_masq_agent_force_prefixes{family=\"ipv4\"} 0"));
        assert!(!text.contains("ip_masq_agent_source_prefixes{"), "{text}");
        t.applied("def", "iptables", &[counts(1, 2, Some(3))]);
        let text = t.encode();
        assert!(!text.contains("hash=\"abc\""));
        assert!(text.contains("ip_masq_agent_force_prefixes{family=\"ipv4\"} 2"));
        assert!(text.contains("ip_masq_agent_source_prefixes{family=\"ipv4\"} 3"));
    }

    #[test]
    fn liveness_allows_three_intervals_of_failure() {
        let t = Telemetry::new();
        assert!(t.readiness().is_err());
        t.sync_finished(
            SyncResult::Success,
            Duration::ZERO,
            Duration::from_millis(20),
            None,
        );
        assert!(t.liveness().is_ok() && t.readiness().is_ok());
        t.sync_finished(
            SyncResult::Failure,
            Duration::ZERO,
            Duration::from_millis(20),
            Some("boom".into()),
        );
        assert!(t.liveness().is_ok(), "still within 3 x interval");
        std::thread::sleep(Duration::from_millis(80));
        let reason = t.liveness().unwrap_err();
        assert!(reason.contains("boom"), "{reason}");
        assert!(
            t.readiness().is_ok(),
            "ready stays true once the first sync is done"
        );
    }

    /// rv1 (live-traffic review) #10: with no sync ever successful, /healthz said "ok:
    /// last success 6.0s ago", a success that never happened. rv4 #8: while the first
    /// sync ran it said "last attempt failed", with the bound of the default interval.
    #[test]
    fn regression_healthz_never_claims_a_success_that_did_not_happen() {
        let t = Telemetry::new();
        t.resync_interval(Duration::from_secs(3));
        let body = t.liveness().unwrap();
        assert!(
            body.starts_with("ok: the first sync is under way")
                && !body.contains("failed")
                && body.contains("unhealthy after 9s"),
            "{body}"
        );
        t.sync_finished(
            SyncResult::Failure,
            Duration::ZERO,
            Duration::from_millis(20),
            Some("refused".into()),
        );
        let body = t.liveness().unwrap();
        assert!(
            body.starts_with("ok: no sync has succeeded yet") && body.contains("refused"),
            "{body}"
        );
        assert!(!body.contains("last success"), "{body}");
        let later = Instant::now() + Duration::from_secs(3600);
        let body = t.liveness_at(later).unwrap_err();
        assert!(
            body.starts_with("unhealthy: no sync has succeeded in the"),
            "{body}"
        );
    }

    #[test]
    fn a_late_bind_shows_in_metrics_and_healthz() {
        let t = Telemetry::new();
        assert!(t.encode().contains("ip_masq_agent_http_endpoint_bound 0\n"));
        t.http_bind_failed();
        t.http_bind_failed();
        t.http_accept_failed();
        t.http_bound(2);
        let text = t.encode();
        for line in [
            "ip_masq_agent_http_endpoint_bound 1\n",
            "ip_masq_agent_http_bind_failures_total 2\n",
            "ip_masq_agent_http_accept_errors_total 1\n",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
        let body = t.liveness().unwrap();
        assert!(body.contains("after 2 failed attempt(s)"), "{body}");
    }

    #[test]
    fn config_hash_is_stable() {
        assert_eq!(config_hash(""), "cbf29ce484222325");
        assert_ne!(config_hash("a"), config_hash("b"));
    }
}
