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

/// Reads every table whose nat rules may act on srcnat before the agent's: `nft -t list
/// ruleset` (native tables; `-t` leaves out set elements, so a large set costs nothing),
/// and `iptables-save -t nat` of both flavours for each family in `families` — except
/// what `fresh` already holds (the backend's own flavour, as its sync just read it), a
/// legacy table the kernel does not have (`legacy_nat_present`; naming one would create
/// it) and an iptables-nft table the ruleset does not list.
fn read_srcnat(
    runner: &SharedRunner,
    place: SrcnatPlace,
    families: &[Family],
    fresh: &[(Family, &str)],
    legacy_nat_present: impl Fn(Family) -> bool,
) -> precedence::Listings {
    let mut listings = precedence::Listings::default();
    if runner.exists("nft") {
        match runner.run(&Program::new("nft"), &["-t", "list", "ruleset"], None, None) {
            Ok(ruleset) => {
                listings.read.push("nft ruleset".into());
                listings.ruleset = Some(ruleset);
            }
            Err(err) => listings
                .notes
                .push(format!("native nft tables not surveyed: {err}")),
        }
    }
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
            let present = match (flavour, &listings.ruleset) {
                (iptables::Flavour::Legacy, _) => legacy_nat_present(family),
                (iptables::Flavour::Nft, Some(ruleset)) => {
                    let name = match family {
                        Family::V4 => "table ip nat {",
                        Family::V6 => "table ip6 nat {",
                    };
                    ruleset.lines().any(|line| line == name)
                }
                (iptables::Flavour::Nft, None) => true,
            };
            if !present {
                continue;
            }
            let Some(tools) = iptables::resolve_tools(family, flavour, runner) else {
                continue;
            };
            match runner.run(&tools.save, &["-t", "nat"], None, None) {
                // iptables-nft cannot print a table holding native nft rules: the nft
                // ruleset shows it instead (and is read as such when this is not listed).
                Ok(text) if iptables::is_incompatible_listing(&text) => {
                    if listings.ruleset.is_some() {
                        listings.read.push(format!(
                            "{label} through nft (iptables-nft cannot print it: it holds native nft rules)"
                        ));
                    } else {
                        listings.notes.push(format!(
                            "{label} not surveyed: iptables-nft cannot print it (native nft rules) and nft could not be read"
                        ));
                    }
                }
                Ok(text) => {
                    saved.text = crate::kernel::words::join_quoted_newlines(&text).into_owned();
                    listings.read.push(label);
                    listings.saved.push(saved);
                }
                Err(err) => listings.notes.push(format!("{label} not surveyed: {err}")),
            }
        }
    }
    listings
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
                let listings = read_srcnat(&self.runner, place, &families, &fresh, |family| {
                    iptables::may_hold_nat_table(iptables::Flavour::Legacy, family, &self.runner)
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
