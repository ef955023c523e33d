//! `nft monitor` in a namespace, recording every ruleset change (nft's and
//! iptables-nft's alike) to a file: how a test proves what a sync wrote, or that it
//! wrote nothing.

use std::process::{Child, Stdio};
use std::time::Duration;

use crate::eventually;
use crate::netns::{Netns, TempDir};

pub struct NftMonitor {
    child: Child,
    log: std::path::PathBuf,
    _dir: TempDir,
}

impl NftMonitor {
    /// Starts monitoring and returns once the monitor provably sees changes (a marker
    /// table it adds and deletes has shown up).
    pub fn start(ns: &Netns) -> NftMonitor {
        let dir = TempDir::new("monitor");
        let log = dir.path.join("monitor.log");
        let child = ns
            .command("nft")
            .args(["monitor"])
            .stdout(std::fs::File::create(&log).expect("monitor log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("nft monitor");
        let monitor = NftMonitor {
            child,
            log,
            _dir: dir,
        };
        let mut attempt = 0;
        let listening = eventually(Duration::from_secs(3), || {
            attempt += 1;
            let marker = format!("ima-monitor-{attempt}");
            ns.sh(&[
                "nft",
                &format!("add table inet {marker}; delete table inet {marker}"),
            ]);
            std::thread::sleep(Duration::from_millis(20));
            std::fs::read_to_string(&monitor.log)
                .unwrap_or_default()
                .contains("ima-monitor-")
        });
        assert!(listening, "nft monitor never started listening");
        monitor
    }

    /// Everything recorded so far, without the start-up markers.
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|line| !line.contains("ima-monitor-"))
            .map(|line| format!("{line}\n"))
            .collect()
    }

    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        let _ = std::fs::File::create(&self.log);
    }
}

impl Drop for NftMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
