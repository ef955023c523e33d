//! A backend that touches nothing: each sync logs what the wrapped backend would write.

use super::{Backend, BackendChoice, ChainName, SrcnatPlace, SyncError, SyncReport};
use crate::policy::Policy;

pub struct DryRunBackend {
    /// The backend set up for this host; only asked to describe itself.
    inner: Box<dyn Backend>,
    chain: ChainName,
    last: Option<String>,
}

impl DryRunBackend {
    pub fn new(inner: Box<dyn Backend>, chain: ChainName) -> Self {
        DryRunBackend {
            inner,
            chain,
            last: None,
        }
    }

    fn render(&self, policy: &Policy) -> String {
        let choice = match self.inner.kind() {
            "nftables" => BackendChoice::Nftables,
            _ => BackendChoice::Iptables,
        };
        super::render(choice, policy, &self.chain)
    }

    /// The payload of the most recent sync.
    pub fn last_payload(&self) -> Option<&str> {
        self.last.as_deref()
    }
}

impl Backend for DryRunBackend {
    fn describe(&self) -> String {
        format!("dry run of {}", self.inner.describe())
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    /// Where the wrapped backend would write: the survey only reads.
    fn srcnat_place(&self) -> Option<SrcnatPlace> {
        self.inner.srcnat_place()
    }

    fn diff(&mut self, _policy: &Policy) -> Result<Vec<String>, SyncError> {
        Ok(Vec::new())
    }

    fn sync(&mut self, policy: &Policy) -> Result<SyncReport, SyncError> {
        let payload = self.render(policy);
        if self.last.as_deref() != Some(payload.as_str()) {
            tracing::info!("dry run: would apply\n{payload}");
        }
        let rules = payload.lines().filter(|l| l.starts_with("-A ")).count();
        let wrote = self.last.as_deref() != Some(payload.as_str());
        self.last = Some(payload);
        Ok(SyncReport {
            processes: 0,
            rules,
            wrote,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::iptables::{IptablesBackend, IptablesMode};
    use crate::config::{Config, ParseOptions};
    use crate::kernel::fake::FakeRunner;
    use crate::policy::PolicySettings;

    #[test]
    fn dry_run_reports_what_it_would_write_and_runs_nothing() {
        let runner = FakeRunner::new();
        let inner = IptablesBackend::new(
            ChainName::default(),
            IptablesMode::Nft,
            false,
            runner.clone(),
        )
        .unwrap();
        let mut backend = DryRunBackend::new(Box::new(inner), ChainName::default());
        let policy = Policy::new(
            &Config::defaults(ParseOptions::default()),
            &PolicySettings::default(),
        );
        let report = backend.sync(&policy).unwrap();
        assert_eq!(report.processes, 0);
        // Jump, link-local, three RFC 1918 prefixes, masquerade.
        assert_eq!(report.rules, 6);
        assert!(
            backend
                .last_payload()
                .unwrap()
                .contains(":IP-MASQ-AGENT - [0:0]")
        );
        assert_eq!(runner.calls(), vec![], "a dry run starts no tool");
    }
}
