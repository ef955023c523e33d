use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use super::*;
use crate::config::{ParseOptions, parse};
use crate::kernel::fake::FakeRunner;
use crate::kernel::netlink::conntrack::{IPPROTO_TCP, IPS_SRC_NAT, Tuple};
use crate::policy::PolicySettings;

// ---------------------------------------------------------------------------------------
// Memory: a global allocator for this test binary that keeps, per thread, the bytes live
// and the most live at once, so a test can say what one call held at its peak.

struct CountingAllocator;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn track(delta: isize) {
    // try_with: a thread being torn down has no counters any more.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

// SAFETY: every call is passed on to the system allocator unchanged; the counters are
// thread-local cells that allocate nothing.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as isize);
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as isize));
        // SAFETY: the caller's pointer and layout, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's arguments, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `work` and returns its result and the most bytes it held at once on this thread
/// beyond what was live when it started.
fn peak_bytes<T>(work: impl FnOnce() -> T) -> (T, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|peak| peak.set(start));
    let result = work();
    let peak = PEAK.with(Cell::get);
    (result, usize::try_from(peak - start).unwrap_or(0))
}

// ---------------------------------------------------------------------------------------

fn policy(yaml: &str) -> Policy {
    policy_with(yaml, false)
}

fn policy_with(yaml: &str, enable_ipv6: bool) -> Policy {
    let options = ParseOptions {
        enable_ipv6,
        ..ParseOptions::default()
    };
    let config = parse(yaml, Path::new("t"), options).unwrap().config;
    let settings = PolicySettings {
        enable_ipv6,
        ..PolicySettings::default()
    };
    Policy::new(&config, &settings)
}

fn address(text: &str) -> IpAddr {
    text.parse().unwrap()
}

/// A UDP entry `source:40000 -> destination:9999` whose replies go to `reply_to`.
fn udp(source: &str, destination: &str, reply_to: &str) -> ConntrackEntry {
    let (s, d, r) = (address(source), address(destination), address(reply_to));
    let status = if r == s { 0 } else { IPS_SRC_NAT };
    ConntrackEntry {
        protocol: IPPROTO_UDP,
        original: Tuple {
            source: s,
            destination: d,
            source_port: 40000,
            destination_port: 9999,
        },
        reply: Tuple {
            source: d,
            destination: r,
            source_port: 9999,
            destination_port: 40000,
        },
        zone: 0,
        status,
        id: 1,
    }
}

const NODE: &str = "192.0.2.1";
const POD: &str = "10.244.1.2";

fn node_scope() -> Scope<'static> {
    let local: Vec<IpNet> = ["127.0.0.0/8", "192.0.2.1/32", "10.244.1.1/32"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    Scope {
        local: AddressRanges::new(&local, Family::V4),
        changed: None,
        egress: EgressLookup::none(),
    }
}

fn keep_203() -> (Policy, Policy) {
    (
        policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n"),
        policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n"),
    )
}

#[test]
fn address_ranges_merge_and_answer_containment() {
    let prefixes: Vec<IpNet> = ["10.0.0.0/9", "10.128.0.0/9", "192.0.2.1/32", "fd00::/8"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    let ranges = AddressRanges::new(&prefixes, Family::V4);
    assert_eq!(ranges.0.len(), 2, "adjacent halves merge; IPv6 is left out");
    for (inside, expected) in [
        ("10.0.0.0", true),
        ("10.255.255.255", true),
        ("11.0.0.0", false),
        ("192.0.2.1", true),
        ("192.0.2.2", false),
        ("0.0.0.0", false),
    ] {
        assert_eq!(ranges.contains(address(inside)), expected, "{inside}");
    }
    assert!(!AddressRanges::default().contains(address("1.2.3.4")));
}

#[test]
fn the_agents_flows_are_judged_by_their_decision_and_nat_state() {
    let (old, new) = keep_203();
    let scope = node_scope();
    let olds = [old];
    // Masqueraded to the node's address, now kept: carries the old decision.
    assert_eq!(
        judge(&udp(POD, "203.0.113.10", NODE), &olds, &new, &scope),
        Verdict::CarriesOldDecision
    );
    // Already kept: agrees.
    assert_eq!(
        judge(&udp(POD, "203.0.113.10", POD), &olds, &new, &scope),
        Verdict::Agrees
    );
    // Outside the change.
    assert_eq!(
        judge(&udp(POD, "198.51.100.7", NODE), &olds, &new, &scope),
        Verdict::Unchanged
    );
    // The reverse change picks the kept flow.
    let back = [new.clone()];
    assert_eq!(
        judge(&udp(POD, "203.0.113.10", POD), &back, &olds[0], &scope),
        Verdict::CarriesOldDecision
    );
    // Host-originated: from the node's address to a remote one passes the jump too.
    assert_eq!(
        judge(
            &udp("10.244.1.1", "203.0.113.10", NODE),
            &olds,
            &new,
            &scope
        ),
        Verdict::CarriesOldDecision
    );
}

#[test]
fn regression_conntrack_cleanup_deletes_flows_the_agent_never_decided() {
    let (old, new) = keep_203();
    let scope = node_scope();
    let olds = [old.clone()];
    // A NodePort flow: remote -> node:30053, DNATed to a pod and masqueraded by
    // kube-proxy to the node's address; the node's own range becomes non-masquerade.
    let node_range = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 192.0.2.0/24]\n");
    let mut nodeport = udp("192.0.2.2", NODE, "10.244.1.1");
    nodeport.original.destination_port = 30053;
    nodeport.reply.source = address("10.244.2.5");
    nodeport.reply.source_port = 5353;
    nodeport.status |= IPS_DST_NAT;
    assert_eq!(
        judge(&nodeport, &olds, &node_range, &scope),
        Verdict::NotOurs(NotOurs::DestinationNat)
    );
    // The same without the status bit (an entry made by hand): the reply says it.
    nodeport.status = IPS_SRC_NAT;
    assert_eq!(
        judge(&nodeport, &olds, &node_range, &scope),
        Verdict::NotOurs(NotOurs::DestinationNat)
    );
    // The host's loopback DNS flow, ['0.0.0.0/0'] -> [].
    let (all, none) = (
        policy("nonMasqueradeCIDRs: ['0.0.0.0/0']\n"),
        policy("nonMasqueradeCIDRs: []\n"),
    );
    assert_eq!(
        judge(
            &udp("127.0.0.1", "127.0.0.53", "127.0.0.1"),
            std::slice::from_ref(&all),
            &none,
            &scope
        ),
        Verdict::NotOurs(NotOurs::LocalDestination)
    );
    // A pod's flow to the node's own address (node-local DNS).
    assert_eq!(
        judge(&udp(POD, "10.244.1.1", POD), &[all], &none, &scope),
        Verdict::NotOurs(NotOurs::LocalDestination)
    );
    // Someone else's SNAT to an address the node does not hold (an egress gateway).
    assert_eq!(
        judge(
            &udp(POD, "203.0.113.10", "198.51.100.200"),
            &olds,
            &new,
            &scope
        ),
        Verdict::NotOurs(NotOurs::OthersSourceNat)
    );
    // Another zone.
    let mut zoned = udp(POD, "203.0.113.10", NODE);
    zoned.zone = 5;
    assert_eq!(
        judge(&zoned, &olds, &new, &scope),
        Verdict::NotOurs(NotOurs::OtherZone)
    );
}

#[test]
fn a_flow_decided_under_a_change_in_between_is_found_when_changes_pile_up() {
    // 203.0.113.0/24: masqueraded under A, kept under B, masqueraded under C. A flow
    // made under B (kept) disagrees with C although A and C agree.
    let a = policy("nonMasqueradeCIDRs: [10.0.0.0/8]\n");
    let b = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 203.0.113.0/24]\n");
    let c = policy("nonMasqueradeCIDRs: [10.0.0.0/8, 198.51.100.0/24]\n");
    let scope = node_scope();
    let made_under_b = udp(POD, "203.0.113.10", POD);
    assert_eq!(
        judge(&made_under_b, &[a.clone(), b], &c, &scope),
        Verdict::CarriesOldDecision
    );
    // A flow made under A or C (masqueraded) agrees; with A alone nothing changed there.
    let made_under_a = udp(POD, "203.0.113.10", NODE);
    assert_eq!(
        judge(&made_under_a, std::slice::from_ref(&a), &c, &scope),
        Verdict::Unchanged
    );
}

#[test]
fn the_changed_ranges_shortcut_agrees_with_deciding_every_entry() {
    let (old, new) = keep_203();
    let blocks = changed_destinations(&old, &new, Family::V4).unwrap();
    let mut shortcut = node_scope();
    shortcut.changed = Some(AddressRanges::new(&blocks, Family::V4));
    let everything = node_scope();
    for destination in [
        "203.0.113.10",
        "203.0.112.255",
        "203.0.114.0",
        "10.1.2.3",
        "8.8.8.8",
    ] {
        for reply in [POD, NODE] {
            let entry = udp(POD, destination, reply);
            assert_eq!(
                judge(&entry, std::slice::from_ref(&old), &new, &shortcut),
                judge(&entry, std::slice::from_ref(&old), &new, &everything),
                "{destination} reply to {reply}"
            );
        }
    }
}

const LISTING: &str = "\
udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40000 [ASSURED] mark=0 use=1
udp      17 29 src=10.244.1.2 dst=198.51.100.7 sport=40001 dport=53 src=198.51.100.7 dst=192.0.2.1 sport=53 dport=40001 mark=0 use=1
tcp      6 431999 ESTABLISHED src=10.244.1.2 dst=203.0.113.10 sport=40002 dport=80 src=203.0.113.10 dst=192.0.2.1 sport=80 dport=40002 [ASSURED] mark=0 use=1
ipv4     2 udp      17 29 src=10.244.1.3 dst=203.0.113.11 sport=40003 dport=9999 src=203.0.113.11 dst=10.244.1.3 sport=9999 dport=40003 mark=0 use=1
icmp     1 29 src=10.244.1.2 dst=203.0.113.10 type=8 code=0 id=7 src=203.0.113.10 dst=192.0.2.1 type=0 code=0 id=7 mark=0 use=1
udp      17 29 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=40000 mark=0 zone=5 use=1
conntrack v1.4.7 (conntrack-tools): 6 flow entries have been shown.
";

fn fake_node() -> Arc<FakeRunner> {
    let runner = FakeRunner::new();
    runner.set_local_prefixes(
        Family::V4,
        &["127.0.0.0/8", "192.0.2.1/32", "10.244.1.1/32"],
    );
    runner
}

#[test]
fn reconcile_deletes_udp_entries_and_counts_the_others() {
    let runner = fake_node();
    runner.set_conntrack("ipv4", LISTING);
    let (old, new) = keep_203();
    let shared: SharedRunner = runner.clone();
    let done = reconcile(
        std::slice::from_ref(&old),
        &new,
        ConntrackCleanup::Udp,
        Pass::Reconcile,
        &shared,
    )
    .unwrap();
    assert_eq!(done.deleted_udp, 1);
    assert_eq!(
        done.stale,
        vec![("tcp".to_string(), 1), ("icmp".to_string(), 1)]
    );
    assert_eq!((done.dumps, done.delete_datagrams), (1, 1));
    // The kernel filtered the other zone's entry out.
    assert_eq!(done.examined, 5);
    let calls = runner.calls();
    let commands: Vec<&str> = calls.iter().map(|c| c.command.as_str()).collect();
    assert_eq!(
        commands,
        ["netlink conntrack dump ipv4", "netlink conntrack delete 1"]
    );
    assert_eq!(
        calls[1].stdin.as_deref(),
        Some("udp 10.244.1.2:40000 -> 203.0.113.10:9999 zone 0 id 1")
    );
    let left: Vec<(u16, u16)> = runner
        .conntrack_entries()
        .iter()
        .map(|e| (e.original.source_port, e.zone))
        .collect();
    assert_eq!(
        left,
        [(40001, 0), (40002, 0), (40003, 0), (0, 0), (40000, 5)]
    );
    // A count-only pass deletes nothing and counts what is left.
    let counted = reconcile(
        std::slice::from_ref(&old),
        &new,
        ConntrackCleanup::Udp,
        Pass::CountOnly,
        &shared,
    )
    .unwrap();
    assert_eq!(counted.deleted_udp, 0);
    assert_eq!(counted.stale_total(), 2);
    let none = reconcile(
        std::slice::from_ref(&old),
        &new,
        ConntrackCleanup::None,
        Pass::Reconcile,
        &shared,
    )
    .unwrap();
    assert_eq!(none, Reconciled::default());
}

#[test]
fn regression_conntrack_deletions_ignore_zones() {
    // The same tuple in the default zone and in zone 5: only the default zone's entry is
    // deleted, and the delete names zone 0, also on a kernel that does not filter the
    // dump by zone.
    for kernel_filters in [true, false] {
        let runner = fake_node();
        if !kernel_filters {
            runner.without_kernel_conntrack_filters();
        }
        runner.set_conntrack("ipv4", LISTING);
        let (old, new) = keep_203();
        let shared: SharedRunner = runner.clone();
        let done = reconcile(
            &[old],
            &new,
            ConntrackCleanup::Udp,
            Pass::Reconcile,
            &shared,
        )
        .unwrap();
        assert_eq!(done.deleted_udp, 1, "kernel filters {kernel_filters}");
        assert_eq!(
            done.not_ours.other_zone,
            u64::from(!kernel_filters),
            "kernel filters {kernel_filters}"
        );
        assert!(
            runner
                .conntrack_entries()
                .iter()
                .any(|e| e.zone == 5 && e.original.source_port == 40000),
            "kernel filters {kernel_filters}: the zone 5 entry was deleted"
        );
    }
}

#[test]
fn a_family_whose_decisions_did_not_change_is_not_read() {
    let runner = fake_node();
    runner.set_conntrack("ipv4", LISTING);
    let old = policy_with("nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8']\n", true);
    let new = policy_with(
        "nonMasqueradeCIDRs: [10.0.0.0/8, 'fd00::/8', '2001:db8::/32']\n",
        true,
    );
    let shared: SharedRunner = runner.clone();
    let done = reconcile(
        &[old],
        &new,
        ConntrackCleanup::Udp,
        Pass::Reconcile,
        &shared,
    )
    .unwrap();
    assert_eq!(done.dumps, 1);
    let commands: Vec<String> = runner.calls().into_iter().map(|c| c.command).collect();
    assert_eq!(commands, ["netlink conntrack dump ipv6"]);
}

#[test]
fn nothing_is_deleted_when_the_local_addresses_cannot_be_read() {
    let runner = fake_node();
    runner.set_conntrack("ipv4", LISTING);
    runner.inject(
        "netlink local routes",
        crate::kernel::fake::Fault::Fails("EPERM"),
        None,
    );
    let (old, new) = keep_203();
    let shared: SharedRunner = runner.clone();
    let err = reconcile(
        &[old],
        &new,
        ConntrackCleanup::Udp,
        Pass::Reconcile,
        &shared,
    )
    .unwrap_err();
    assert!(err.to_string().contains("local addresses"), "{err}");
    assert_eq!(runner.conntrack_entries().len(), 6);
}

/// Entry `i` of a large generated table: UDP from pods to 203.0.113.0/24, masqueraded to
/// the node (every one carries the old decision of [`keep_203`]); every 50th is TCP.
fn generated(i: u64) -> ConntrackEntry {
    let mut entry = udp(POD, "203.0.113.10", NODE);
    entry.original.source = IpAddr::V4(std::net::Ipv4Addr::from(0x0af4_0000u32 | (i as u32 >> 16)));
    entry.original.source_port = (i & 0xffff) as u16;
    entry.reply.destination_port = entry.original.source_port;
    entry.id = i as u32;
    if i.is_multiple_of(50) {
        entry.protocol = IPPROTO_TCP;
    }
    entry
}

#[test]
fn regression_the_conntrack_table_is_held_in_memory() {
    // 200,000 entries, made one at a time as the dump reaches them: 196,000 UDP entries
    // to delete and 4,000 TCP ones to count. Collected, they alone would be 10 MB (30 MB
    // as `conntrack -L` text); the pass must hold a bounded chunk, deleting while the
    // dump goes on.
    const ENTRIES: u64 = 200_000;
    let runner = fake_node();
    runner.generate_conntrack(ENTRIES, generated);
    let (old, new) = keep_203();
    let shared: SharedRunner = runner.clone();
    let (done, peak) = peak_bytes(|| {
        reconcile(
            &[old],
            &new,
            ConntrackCleanup::Udp,
            Pass::Reconcile,
            &shared,
        )
        .unwrap()
    });
    assert_eq!(done.examined, ENTRIES);
    assert_eq!(done.deleted_udp, 196_000);
    assert_eq!(done.stale, vec![("tcp".to_string(), 4_000)]);
    let stats = runner.conntrack_stats();
    assert!(
        stats.fed_at_first_delete.is_some_and(|fed| fed < 1_000),
        "deletes wait for the whole dump: {stats:?}"
    );
    assert!(stats.largest_delete <= DELETE_CHUNK, "{stats:?}");
    eprintln!("peak {peak} bytes for {ENTRIES} entries");
    // The chunk of keys (512 x 48 bytes), the policy's explanations, small change.
    assert!(
        peak < 256 * 1024,
        "the pass held {peak} bytes at its peak for {ENTRIES} entries"
    );
}

// ---------------------------------------------------------------------------------------
// Issue 17: outputInterface and outputAddress change decisions too.

const UPLINK_B: &str = "198.51.100.1";
const SECONDARY: &str = "192.0.2.100";

/// A node with two uplinks: 203.0.113.0/24 routed out of eth1, 100.100.0.0/16 out of eth2.
fn multihomed_scope(route: &dyn Fn(IpAddr, IpAddr) -> Option<String>) -> Scope<'_> {
    let local: Vec<IpNet> = [
        "127.0.0.0/8",
        "192.0.2.1/32",
        "192.0.2.100/32",
        "198.51.100.1/32",
    ]
    .iter()
    .map(|p| p.parse().unwrap())
    .collect();
    Scope {
        local: AddressRanges::new(&local, Family::V4),
        changed: None,
        egress: EgressLookup::new(route),
    }
}

fn two_uplinks(_source: IpAddr, destination: IpAddr) -> Option<String> {
    let text = destination.to_string();
    if text.starts_with("203.0.113.") {
        Some("eth1".into())
    } else if text.starts_with("100.100.") {
        Some("eth2".into())
    } else {
        None
    }
}

#[test]
fn a_change_of_interfaces_re_decides_flows_by_where_they_leave() {
    let scope = multihomed_scope(&two_uplinks);
    let every = policy("nonMasqueradeCIDRs: []\n");
    let eth1 = policy("nonMasqueradeCIDRs: []\noutputInterface: eth1\n");
    let both = policy("nonMasqueradeCIDRs: []\noutputInterface: ['eth+']\n");
    let via_eth1 = udp(POD, "203.0.113.10", NODE);
    let via_eth2 = udp(POD, "100.100.0.10", UPLINK_B);
    let kept_via_eth2 = udp(POD, "100.100.0.10", POD);
    // Every interface -> eth1 only: the eth2 flow must lose its masquerade; eth1's stays.
    assert_eq!(
        judge(&via_eth2, std::slice::from_ref(&every), &eth1, &scope),
        Verdict::CarriesOldDecision
    );
    assert_eq!(
        judge(&via_eth1, std::slice::from_ref(&every), &eth1, &scope),
        Verdict::Unchanged
    );
    // eth1 -> eth+: the flow kept on eth2 must now be masqueraded.
    assert_eq!(
        judge(&kept_via_eth2, std::slice::from_ref(&eth1), &both, &scope),
        Verdict::CarriesOldDecision
    );
    assert_eq!(
        judge(&via_eth2, std::slice::from_ref(&eth1), &both, &scope),
        Verdict::Agrees
    );
    // Where the route cannot be found, the flow is left alone.
    let nowhere = udp(POD, "192.0.2.77", NODE);
    assert_eq!(
        judge(&nowhere, std::slice::from_ref(&every), &eth1, &scope),
        Verdict::Unchanged
    );
}

#[test]
fn a_change_of_the_snat_address_re_decides_the_translated_flows() {
    let scope = multihomed_scope(&two_uplinks);
    let masquerade = policy("nonMasqueradeCIDRs: []\n");
    let snat = policy("nonMasqueradeCIDRs: []\noutputAddress: 192.0.2.100\n");
    let floating = policy("nonMasqueradeCIDRs: []\noutputAddress: 203.0.113.77\n");
    let masqueraded = udp(POD, "203.0.113.10", NODE);
    let snatted = udp(POD, "203.0.113.10", SECONDARY);
    // MASQUERADE -> SNAT: the masqueraded flow carries the old translation.
    assert_eq!(
        judge(
            &masqueraded,
            std::slice::from_ref(&masquerade),
            &snat,
            &scope
        ),
        Verdict::CarriesOldDecision
    );
    assert_eq!(
        judge(&snatted, std::slice::from_ref(&masquerade), &snat, &scope),
        Verdict::Agrees
    );
    // SNAT -> MASQUERADE: the flow on the old address goes; one on the node's stays.
    assert_eq!(
        judge(&snatted, std::slice::from_ref(&snat), &masquerade, &scope),
        Verdict::CarriesOldDecision
    );
    assert_eq!(
        judge(
            &masqueraded,
            std::slice::from_ref(&snat),
            &masquerade,
            &scope
        ),
        Verdict::Agrees
    );
    // A floating address the node does not hold: a rewrite to it is the agent's.
    let to_floating = udp(POD, "203.0.113.10", "203.0.113.77");
    assert_eq!(
        judge(&to_floating, std::slice::from_ref(&floating), &snat, &scope),
        Verdict::CarriesOldDecision
    );
    // Someone else's SNAT to an address no decision names is never touched.
    let others = udp(POD, "203.0.113.10", "203.0.113.99");
    assert_eq!(
        judge(&others, std::slice::from_ref(&floating), &snat, &scope),
        Verdict::NotOurs(NotOurs::OthersSourceNat)
    );
}

/// Through the fake kernel: an interface change deletes exactly the UDP flow that now
/// leaves by an unlisted interface, asking the routing table once per destination.
#[test]
fn reconcile_asks_the_routing_table_when_interfaces_change() {
    let runner = FakeRunner::new();
    runner.set_local_prefixes(
        Family::V4,
        &["127.0.0.0/8", "192.0.2.1/32", "198.51.100.1/32"],
    );
    runner.add_route("203.0.113.0/24", "eth1");
    runner.add_route("100.100.0.0/16", "eth2");
    runner.add_conntrack(&[
        udp(POD, "203.0.113.10", NODE),
        udp(POD, "100.100.0.10", UPLINK_B),
    ]);
    let shared: SharedRunner = runner.clone();
    let old = policy("nonMasqueradeCIDRs: []\n");
    let new = policy("nonMasqueradeCIDRs: []\noutputInterface: eth1\n");
    let done = reconcile(
        std::slice::from_ref(&old),
        &new,
        ConntrackCleanup::Udp,
        Pass::Reconcile,
        &shared,
    )
    .unwrap();
    assert_eq!(done.deleted_udp, 1, "{done:?}");
}
