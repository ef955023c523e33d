//! What outputInterface and outputAddress(IPv6) meet on this node. Neither is an error
//! when it names something the node does not have right now (a floating address comes and
//! goes, an interface appears later), but an operator must hear of it: SNAT to an address
//! the node does not hold sends packets whose replies never come back, and an interface
//! that does not exist masquerades nothing. Read-only; told at start-up, on change and in
//! `status`.

use std::net::IpAddr;

use crate::config::egress::{AddressRange, InterfacePattern};
use crate::kernel::SharedRunner;
use crate::policy::{Family, Policy};

/// Missing addresses a warning names; the rest are counted.
const MISSING_NAMED: usize = 4;

/// Addresses of a range checked one by one; a longer range is checked at its ends.
const CHECKED_ONE_BY_ONE: u128 = 256;

/// One family's SNAT address and whether the node holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressPresence {
    pub family: Family,
    pub range: AddressRange,
    /// Addresses of the range the node does not hold (empty: all present).
    pub missing: Vec<IpAddr>,
    /// Why presence could not be read, if it could not.
    pub unknown: Option<String>,
}

impl AddressPresence {
    pub fn present(&self) -> bool {
        self.missing.is_empty() && self.unknown.is_none()
    }
}

/// What the policy's egress keys meet on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressCheck {
    pub addresses: Vec<AddressPresence>,
    /// Each listed interface pattern with the node's interfaces it matches.
    pub interfaces: Option<Vec<(InterfacePattern, Vec<String>)>>,
}

/// Looks at the node's addresses (the kernel's local routes) and interface names.
pub fn check(policy: &Policy, runner: &SharedRunner) -> EgressCheck {
    let mut result = EgressCheck::default();
    for family in &policy.families {
        let Some(range) = family.snat_to else {
            continue;
        };
        let mut presence = AddressPresence {
            family: family.family,
            range,
            missing: Vec::new(),
            unknown: None,
        };
        match runner.local_prefixes(family.family) {
            Ok(local) => {
                presence.missing = addresses_of(&range)
                    .into_iter()
                    .filter(|address| !local.iter().any(|prefix| prefix.contains(address)))
                    .collect();
            }
            Err(err) => presence.unknown = Some(err.to_string()),
        }
        result.addresses.push(presence);
    }
    if let Some(listed) = &policy.out_interfaces {
        let names = runner.interface_names();
        result.interfaces = Some(
            listed
                .iter()
                .map(|pattern| {
                    let matched = names
                        .iter()
                        .filter(|name| pattern.matches(name))
                        .cloned()
                        .collect();
                    (pattern.clone(), matched)
                })
                .collect(),
        );
    }
    result
}

/// The addresses of a range to look for: all of a short one, the ends of a long one.
fn addresses_of(range: &AddressRange) -> Vec<IpAddr> {
    let number = |address: IpAddr| match address {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => u128::from(v6),
    };
    let (first, last) = (number(range.first), number(range.last));
    if last - first >= CHECKED_ONE_BY_ONE {
        return vec![range.first, range.last];
    }
    (first..=last)
        .map(|n| match range.first {
            // An IPv4 range's numbers fit in 32 bits.
            IpAddr::V4(_) => IpAddr::V4((n as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(n.into()),
        })
        .collect()
}

impl EgressCheck {
    /// What an operator should be warned of; empty when all is present.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for address in &self.addresses {
            let key = key_of(address.family);
            if let Some(why) = &address.unknown {
                out.push(format!(
                    "cannot tell whether {key} {} is assigned on this node: {why}",
                    address.range
                ));
            } else if !address.missing.is_empty() {
                let mut missing: Vec<String> = address
                    .missing
                    .iter()
                    .take(MISSING_NAMED)
                    .map(ToString::to_string)
                    .collect();
                if address.missing.len() > MISSING_NAMED {
                    missing.push(format!("{} more", address.missing.len() - MISSING_NAMED));
                }
                out.push(format!(
                    "{key} {}: {} not assigned on this node; packets SNATed to it leave, but replies to it will not come back until it is (a floating address that is elsewhere now?)",
                    address.range,
                    if missing.len() == 1 {
                        format!("{} is", missing[0])
                    } else {
                        format!("{} are", missing.join(", "))
                    }
                ));
            }
        }
        for (pattern, matched) in self.interfaces.iter().flatten() {
            if matched.is_empty() {
                out.push(format!(
                    "outputInterface {pattern} matches no interface of this node (yet): nothing leaving by it is masqueraded until one appears"
                ));
            }
        }
        out
    }

    /// The lines `status` prints.
    pub fn lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        for address in &self.addresses {
            let key = key_of(address.family);
            if address.present() {
                out.push(format!("{key} {}: assigned on this node", address.range));
            }
        }
        if let Some(interfaces) = &self.interfaces {
            if interfaces.is_empty() {
                out.push("outputInterface is empty: nothing is masqueraded".to_string());
            }
            for (pattern, matched) in interfaces.iter().filter(|(_, m)| !m.is_empty()) {
                out.push(format!(
                    "outputInterface {pattern}: {} on this node",
                    matched.join(", ")
                ));
            }
        }
        out.extend(self.warnings());
        out
    }
}

fn key_of(family: Family) -> &'static str {
    match family {
        Family::V4 => "outputAddress",
        Family::V6 => "outputAddressIPv6",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ParseOptions, parse};
    use crate::kernel::fake::FakeRunner;
    use crate::policy::PolicySettings;
    use std::path::Path;

    fn policy(yaml: &str) -> Policy {
        let options = ParseOptions {
            enable_ipv6: true,
            ..ParseOptions::default()
        };
        let config = parse(yaml, Path::new("t"), options).unwrap().config;
        Policy::new(
            &config,
            &PolicySettings {
                enable_ipv6: true,
                ..PolicySettings::default()
            },
        )
    }

    #[test]
    fn absent_addresses_and_interfaces_are_said_and_present_ones_are_not_warned_of() {
        let runner = FakeRunner::new();
        runner.set_local_prefixes(Family::V4, &["192.0.2.1/32", "192.0.2.7/32", "127.0.0.0/8"]);
        runner.set_local_prefixes(Family::V6, &["2001:db8::7/128"]);
        runner.set_interfaces(&["lo", "eth0", "bond0", "bond1"]);
        let shared: SharedRunner = runner.clone();
        let found = check(
            &policy(
                "outputAddress: 192.0.2.7-192.0.2.8\noutputAddressIPv6: '2001:db8::7'\noutputInterface: [eth0, 'bond+', wg0]\n",
            ),
            &shared,
        );
        assert_eq!(
            found.addresses[0].missing,
            ["192.0.2.8".parse::<IpAddr>().unwrap()]
        );
        assert!(found.addresses[1].present());
        let warnings = found.warnings();
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0].starts_with("outputAddress 192.0.2.7-192.0.2.8: 192.0.2.8 is not assigned")
        );
        assert!(warnings[1].starts_with("outputInterface wg0 matches no interface"));
        let lines = found.lines();
        assert!(
            lines.contains(&"outputAddressIPv6 2001:db8::7: assigned on this node".to_string())
        );
        assert!(lines.contains(&"outputInterface bond+: bond0, bond1 on this node".to_string()));
        assert_eq!(check(&policy(""), &shared), EgressCheck::default());
    }

    #[test]
    fn a_long_range_is_checked_at_its_ends() {
        let range =
            crate::config::egress::parse_address_range("10.0.0.1-10.0.255.254", false).unwrap();
        assert_eq!(addresses_of(&range).len(), 2);
        let short = crate::config::egress::parse_address_range("10.0.0.1-10.0.0.4", false).unwrap();
        assert_eq!(addresses_of(&short).len(), 4);
    }
}
