//! Conntrack entries for tests and benchmarks: made by hand inside a namespace (one
//! `conntrack -R` process for any number of them) and listed back with their ids, so a
//! test can tell an entry that was kept from one that was deleted and made again.
//! conntrack-tools is the tests' tool only; the agent reads conntrack over netlink.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::{Netns, TempDir};

/// One flow's entry as `conntrack -I` makes it: both tuples, zone, protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Flow {
    pub protocol: &'static str,
    pub source: IpAddr,
    pub destination: IpAddr,
    pub source_port: u16,
    pub destination_port: u16,
    pub reply_source: IpAddr,
    pub reply_destination: IpAddr,
    pub reply_source_port: u16,
    pub reply_destination_port: u16,
    pub zone: u16,
}

fn address(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|_| panic!("{text:?} is not an address"))
}

impl Flow {
    /// A UDP flow without NAT: replies come from the destination, go to the source.
    pub fn udp(source: &str, source_port: u16, destination: &str, destination_port: u16) -> Flow {
        let (source, destination) = (address(source), address(destination));
        Flow {
            protocol: "udp",
            source,
            destination,
            source_port,
            destination_port,
            reply_source: destination,
            reply_destination: source,
            reply_source_port: destination_port,
            reply_destination_port: source_port,
            zone: 0,
        }
    }

    /// The same flow over TCP (made ESTABLISHED).
    pub fn tcp(mut self) -> Flow {
        self.protocol = "tcp";
        self
    }

    /// Its source rewritten to `address:port` (MASQUERADE or SNAT).
    pub fn source_natted(mut self, address_text: &str, port: u16) -> Flow {
        self.reply_destination = address(address_text);
        self.reply_destination_port = port;
        self
    }

    /// Its destination rewritten to `address:port` (a Service, a NodePort).
    pub fn destination_natted(mut self, address_text: &str, port: u16) -> Flow {
        self.reply_source = address(address_text);
        self.reply_source_port = port;
        self
    }

    pub fn in_zone(mut self, zone: u16) -> Flow {
        self.zone = zone;
        self
    }

    /// The `conntrack -I` arguments that make this entry, living `timeout` seconds.
    pub fn insert_arguments(&self, timeout: u32) -> String {
        let mut line = format!(
            "-I -p {} -s {} -d {} --sport {} --dport {} -r {} -q {} --reply-port-src {} --reply-port-dst {} -t {timeout}",
            self.protocol,
            self.source,
            self.destination,
            self.source_port,
            self.destination_port,
            self.reply_source,
            self.reply_destination,
            self.reply_source_port,
            self.reply_destination_port,
        );
        if self.protocol == "tcp" {
            line.push_str(" --state ESTABLISHED -u ASSURED");
        }
        if self.zone != 0 {
            let _ = write!(line, " -w {}", self.zone);
        }
        line
    }

    /// What [`listed`] shows for this entry: its tuples and zone.
    pub fn key(&self) -> String {
        format!(
            "{} src={} dst={} sport={} dport={} src={} dst={} sport={} dport={} zone={}",
            self.protocol,
            self.source,
            self.destination,
            self.source_port,
            self.destination_port,
            self.reply_source,
            self.reply_destination,
            self.reply_source_port,
            self.reply_destination_port,
            self.zone
        )
    }
}

/// Makes the entries of `flows` in `ns`, living `timeout` seconds, with one process.
pub fn insert(ns: &Netns, flows: &[Flow], timeout: u32) {
    if flows.is_empty() {
        return;
    }
    let dir = TempDir::new("ct");
    let file = dir.path.join("entries");
    let mut text = String::with_capacity(flows.len() * 160);
    for flow in flows {
        text.push_str(&flow.insert_arguments(timeout));
        text.push('\n');
    }
    std::fs::write(&file, text).expect("write the conntrack load file");
    ns.sh(&["conntrack", "-R", file.to_str().expect("utf-8 path")]);
}

/// An entry as `conntrack -L -o id` lists it: the key [`Flow::key`] gives, and its id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listed {
    pub key: String,
    pub id: u64,
}

/// The key and id of a `conntrack -L -o id` line; None for other lines.
pub fn parse_listed(line: &str) -> Option<Listed> {
    let mut words = line.split_whitespace();
    let protocol = words.next()?;
    let mut fields: Vec<&str> = Vec::new();
    let (mut zone, mut id) = ("0", None);
    for word in words {
        match word.split_once('=') {
            Some(("src" | "dst" | "sport" | "dport", _)) => fields.push(word),
            Some(("zone", value)) => zone = value,
            Some(("id", value)) => id = value.parse().ok(),
            _ => {}
        }
    }
    if fields.len() != 8 {
        return None;
    }
    Some(Listed {
        key: format!("{protocol} {} zone={zone}", fields.join(" ")),
        id: id?,
    })
}

/// Every TCP and UDP entry of `ns`, both families, sorted.
pub fn listed(ns: &Netns) -> Vec<Listed> {
    let mut all = Vec::new();
    for family in ["ipv4", "ipv6"] {
        let out = ns.output(&["conntrack", "-L", "-f", family, "-o", "id"]);
        all.extend(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(parse_listed),
        );
    }
    all.sort();
    all
}

/// How many entries `ns` holds (all protocols and families).
pub fn count(ns: &Netns) -> u64 {
    ns.sh(&["cat", "/proc/sys/net/netfilter/nf_conntrack_count"])
        .trim()
        .parse()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_line_gives_the_key_a_flow_makes() {
        let flow = Flow::udp("10.244.1.2", 40000, "203.0.113.10", 9999)
            .source_natted("192.0.2.1", 61000)
            .in_zone(5);
        let line = "udp      17 599 src=10.244.1.2 dst=203.0.113.10 sport=40000 dport=9999 [UNREPLIED] src=203.0.113.10 dst=192.0.2.1 sport=9999 dport=61000 mark=0 zone=5 use=1 id=1010618441";
        let listed = parse_listed(line).unwrap();
        assert_eq!(listed.key, flow.key());
        assert_eq!(listed.id, 1_010_618_441);
        let tcp = "tcp      6 599 ESTABLISHED src=fd00:244::2 dst=2001:db8:99::10 sport=1 dport=80 src=2001:db8:99::10 dst=fd00:244::2 sport=80 dport=1 [ASSURED] mark=0 use=1 id=7";
        assert_eq!(
            parse_listed(tcp).unwrap().key,
            Flow::udp("fd00:244::2", 1, "2001:db8:99::10", 80)
                .tcp()
                .key()
        );
        assert_eq!(
            parse_listed("conntrack v1.4.7 (conntrack-tools): 1 flow entries"),
            None
        );
        assert!(flow.insert_arguments(600).ends_with("-t 600 -w 5"));
    }
}
