//! The NAT rules of others that act before the agent's on the srcnat hook: read (the
//! other iptables flavour, native nft tables, and what the backend's own sync read),
//! classified against the policy ([`precedence`]), reported, never changed. Above the
//! backends: it asks them where their rules sit and uses their ownership rules.

pub mod precedence;

use crate::backend::{
    Backend, ChainName, NFTABLES_PRIORITY, SRCNAT, SrcnatPlace, iptables, nftables,
};
use crate::kernel::{Program, SharedRunner};
use crate::policy::{Family, Policy};

/// Where the agent's rules sit (`place`; `chain`: its nat chain for the iptables
/// backend) and how to recognise them.
pub(crate) fn srcnat_ours(place: SrcnatPlace, chain: Option<&ChainName>) -> precedence::Ours {
    let (xtables, priority) = match place {
        SrcnatPlace::Iptables(flavour) => (Some(flavour.as_str()), SRCNAT),
        SrcnatPlace::Nftables => (None, NFTABLES_PRIORITY),
    };
    precedence::Ours {
        xtables,
        priority,
        nft_table: ("inet", nftables::TABLE),
        chain: chain.map(ToString::to_string),
        is_agent_jump: iptables::is_agent_jump_spec,
    }
}

/// The most native nft chains one survey lists (base chains on srcnat and the chains
/// they reach); a survey that stops there says so.
pub const MAX_SURVEYED_NFT_CHAINS: usize = 64;

/// Reads every table whose nat rules may act on srcnat before the agent's, each in a way
/// whose cost does not grow with what is not on that path (a kube-proxy nat table of
/// 10,000 Services made `iptables-nft-save` peak at 100 MB and `nft list ruleset` at
/// 300 MB): iptables-nft's POSTROUTING and the chains it reaches, listed one by one;
/// iptables-legacy saved whole (its tools load the whole table however asked); and the
/// native nft chains on the srcnat hook (found by one netlink chain dump) with the
/// chains they reach, listed one by one. Left out: what `fresh` already holds (the
/// backend's own flavour, as its sync just read it), a legacy table the kernel does not
/// have (`legacy_nat_present`; naming one would create it), an iptables-nft table that
/// does not exist, and the agent's own nft table.
fn read_srcnat(
    runner: &SharedRunner,
    place: SrcnatPlace,
    chain: &ChainName,
    families: &[Family],
    fresh: &[(Family, &str)],
    legacy_nat_present: impl Fn(Family) -> bool,
) -> precedence::Listings {
    let mut listings = precedence::Listings::default();
    for flavour in [iptables::Flavour::Nft, iptables::Flavour::Legacy] {
        for &family in families {
            let mut saved = precedence::SavedNat {
                flavour: flavour.as_str(),
                family,
                text: String::new(),
            };
            let label = format!("{} nat ({family})", saved.tool());
            let own = fresh
                .iter()
                .find(|(f, _)| *f == family)
                .filter(|_| place == SrcnatPlace::Iptables(flavour));
            if let Some((_, text)) = own {
                saved.text = text.to_string();
                listings.read.push(label);
                listings.saved.push(saved);
                continue;
            }
            let present = match flavour {
                iptables::Flavour::Legacy => legacy_nat_present(family),
                iptables::Flavour::Nft => runner.nft_table_exists(family, "nat").unwrap_or(true),
            };
            if !present {
                continue;
            }
            let Some(tools) = iptables::resolve_tools(family, flavour, runner) else {
                continue;
            };
            let whole = flavour == iptables::Flavour::Legacy;
            match iptables::read_nat_table(flavour, family, &tools, chain, whole, runner) {
                // Chains iptables-nft cannot list (native nft rules): the nft part below
                // reads that table's POSTROUTING path instead.
                Ok(read) if !read.unlisted.is_empty() => listings.read.push(format!(
                    "{label} through nft (iptables-nft cannot list {}: native nft rules)",
                    read.unlisted.join(", ")
                )),
                Ok(read) => {
                    if read.left_out > 0 {
                        listings.notes.push(format!(
                            "{label}: {} chains reached from POSTROUTING were read and {} more left out; NAT rules in those are not surveyed",
                            iptables::MAX_LISTED_CHAINS,
                            read.left_out
                        ));
                    }
                    saved.text = read.text;
                    listings.read.push(label);
                    listings.saved.push(saved);
                }
                Err(err) => listings.notes.push(format!("{label} not surveyed: {err}")),
            }
        }
    }
    let covered: Vec<Family> = listings
        .saved
        .iter()
        .filter(|s| s.flavour == iptables::Flavour::Nft.as_str())
        .map(|s| s.family)
        .collect();
    read_native_srcnat(runner, place, &covered, &mut listings);
    listings
}

/// The native nft part of [`read_srcnat`]: the base chains of type nat on postrouting
/// and the chains they jump or go to, breadth first, at most
/// [`MAX_SURVEYED_NFT_CHAINS`]. iptables-nft's own POSTROUTING is left out for the
/// families its listing covers.
fn read_native_srcnat(
    runner: &SharedRunner,
    place: SrcnatPlace,
    covered: &[Family],
    listings: &mut precedence::Listings,
) {
    let bases = match runner.nft_nat_postrouting_chains() {
        Ok(bases) => bases,
        Err(err) => {
            listings
                .notes
                .push(format!("native nft tables not surveyed: {err}"));
            return;
        }
    };
    let covered_by_iptables = |family: &str, table: &str, chain: &str| {
        let family = match family {
            "ip" => Family::V4,
            "ip6" => Family::V6,
            _ => return false,
        };
        table == "nat" && chain == "POSTROUTING" && covered.contains(&family)
    };
    let mut queue: std::collections::VecDeque<(&'static str, String, String)> = bases
        .into_iter()
        // The agent's own table is read only where it is a leftover (iptables backend).
        .filter(|base| {
            place != SrcnatPlace::Nftables
                || (base.family, base.table.as_str()) != ("inet", nftables::TABLE)
        })
        .filter(|base| !covered_by_iptables(base.family, &base.table, &base.chain))
        .map(|base| (base.family, base.table, base.chain))
        .collect();
    if queue.is_empty() {
        listings.read.push("nft srcnat chains (none)".into());
        listings.ruleset = Some(String::new());
        return;
    }
    if !runner.exists("nft") {
        listings.notes.push(format!(
            "native nft chains on srcnat not surveyed ({}): nft is not installed",
            queue
                .iter()
                .map(|(family, table, chain)| format!("{family} {table} {chain}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        return;
    }
    let mut seen: Vec<(&'static str, String, String)> = queue.iter().cloned().collect();
    let mut text = String::new();
    let mut listed = 0;
    let mut read_ok = 0;
    let mut left_out = 0;
    while let Some((family, table, chain)) = queue.pop_front() {
        if listed >= MAX_SURVEYED_NFT_CHAINS {
            left_out += 1;
            continue;
        }
        listed += 1;
        let args = [
            "-t",
            "list",
            "chain",
            family,
            table.as_str(),
            chain.as_str(),
        ];
        match runner.run(&Program::new("nft"), &args, None, None) {
            Ok(listing) => {
                read_ok += 1;
                for target in precedence::nft_jump_targets(&listing) {
                    let next = (family, table.clone(), target);
                    if !seen.contains(&next) {
                        seen.push(next.clone());
                        queue.push_back(next);
                    }
                }
                text.push_str(&listing);
                if !listing.ends_with('\n') {
                    text.push('\n');
                }
            }
            Err(err) => listings.notes.push(format!(
                "nft chain {family} {table} {chain} not surveyed: {err}"
            )),
        }
    }
    if left_out > 0 {
        listings.notes.push(format!(
            "the survey listed {MAX_SURVEYED_NFT_CHAINS} native nft chains on the srcnat path and left out {left_out} more"
        ));
    }
    listings.read.push(format!("nft srcnat chains ({read_ok})"));
    listings.ruleset = Some(text);
}

/// How the set of rules acting before the agent's changed since the last survey.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SrcnatChange {
    pub survey: precedence::Survey,
    /// Rules that were not listed the last time (all of them at the first survey).
    pub appeared: Vec<precedence::Preceding>,
    pub gone: Vec<precedence::Preceding>,
    /// Notes (what could not be read) that are new.
    pub new_notes: Vec<String>,
}

/// Keeps the survey of NAT rules acting before the agent's (see [`precedence`]) current
/// at no extra cost on an idle resync: a full survey (other iptables flavour, native nft
/// tables) runs when asked (start-up, config change); otherwise only what the backend's
/// sync read anyway is classified again, and only when it changed.
pub struct SrcnatWatch {
    runner: SharedRunner,
    /// What the last full survey read.
    listings: Option<precedence::Listings>,
    /// A hash of what the backend's sync had read at the last classification.
    fresh: Option<u64>,
    /// The policy of the last classification (what a rule can override depends on it).
    classified_for: Option<Policy>,
    last: Option<precedence::Survey>,
}

impl SrcnatWatch {
    pub fn new(runner: SharedRunner) -> SrcnatWatch {
        SrcnatWatch {
            runner,
            listings: None,
            fresh: None,
            classified_for: None,
            last: None,
        }
    }

    /// Surveys again (everything when `full`, else only what `backend`'s last sync read)
    /// and returns what changed; None when nothing did or `backend` writes nowhere.
    pub fn update(
        &mut self,
        backend: &dyn Backend,
        policy: &Policy,
        full: bool,
    ) -> Option<SrcnatChange> {
        let place = backend.srcnat_place()?;
        // A table the backend could not read whole (a chain on its POSTROUTING path holds
        // native nft rules) is left out of what it hands over: only a full survey, through
        // nft, sees changes there, so every update is a full one while that lasts.
        let full = full || !backend.read_notes().is_empty();
        let fresh = backend.last_read_nat();
        let hash = fingerprint(&fresh);
        let listings = match self.listings.as_mut() {
            Some(listings) if !full => {
                if self.fresh == Some(hash) && self.classified_for.as_ref() == Some(policy) {
                    return None;
                }
                for (family, text) in &fresh {
                    let flavour = match place {
                        SrcnatPlace::Iptables(flavour) => flavour.as_str(),
                        SrcnatPlace::Nftables => continue,
                    };
                    match listings
                        .saved
                        .iter_mut()
                        .find(|s| s.flavour == flavour && s.family == *family)
                    {
                        Some(saved) => saved.text = text.to_string(),
                        None => listings.saved.push(precedence::SavedNat {
                            flavour,
                            family: *family,
                            text: text.to_string(),
                        }),
                    }
                }
                listings.clone()
            }
            _ => {
                let families: Vec<Family> = policy.families.iter().map(|f| f.family).collect();
                let chain = backend.agent_chain().cloned().unwrap_or_default();
                let listings =
                    read_srcnat(&self.runner, place, &chain, &families, &fresh, |family| {
                        iptables::may_hold_nat_table(
                            iptables::Flavour::Legacy,
                            family,
                            &self.runner,
                        )
                    });
                self.listings = Some(listings.clone());
                listings
            }
        };
        self.fresh = Some(hash);
        self.classified_for = Some(policy.clone());
        let survey = precedence::classify(
            &listings,
            &srcnat_ours(place, backend.agent_chain()),
            policy,
        );
        let previous = self.last.replace(survey.clone());
        let before: &[precedence::Preceding] = previous.as_ref().map_or(&[], |s| &s.rules);
        let absent = |rule: &precedence::Preceding, among: &[precedence::Preceding]| {
            !among.iter().any(|other| other.key() == rule.key())
        };
        let appeared: Vec<_> = survey
            .rules
            .iter()
            .filter(|r| absent(r, before))
            .cloned()
            .collect();
        let gone: Vec<_> = before
            .iter()
            .filter(|r| absent(r, &survey.rules))
            .cloned()
            .collect();
        let new_notes: Vec<String> = survey
            .notes
            .iter()
            .filter(|n| previous.as_ref().is_none_or(|p| !p.notes.contains(n)))
            .cloned()
            .collect();
        let same = previous
            .as_ref()
            .is_some_and(|p| p.omitted == survey.omitted)
            && appeared.is_empty()
            && gone.is_empty()
            && new_notes.is_empty();
        (!same).then_some(SrcnatChange {
            survey,
            appeared,
            gone,
            new_notes,
        })
    }
}

/// A hash of saved nat tables that ignores what changes without a rule changing: the
/// timestamp comments and the chain policies' packet counters.
pub(crate) fn fingerprint(saved: &[(Family, &str)]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for (family, text) in saved {
        family.hash(&mut hasher);
        for line in text.lines().filter(|line| !line.starts_with('#')) {
            let line = match line.rsplit_once(" [") {
                Some((declaration, _)) if line.starts_with(':') => declaration,
                _ => line,
            };
            line.hash(&mut hasher);
        }
    }
    hasher.finish()
}

/// One full survey for `backend` (after its `diff` or `sync`, whose reads it reuses).
pub fn survey_srcnat(
    backend: &dyn Backend,
    policy: &Policy,
    runner: &SharedRunner,
) -> Option<precedence::Survey> {
    SrcnatWatch::new(runner.clone())
        .update(backend, policy, true)
        .map(|change| change.survey)
}
