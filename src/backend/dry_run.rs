//! A backend that touches nothing: each sync logs what the wrapped backend would write.

use super::{Backend, SyncReport};
use crate::policy::Policy;

pub struct DryRunBackend {
    renderer: Box<dyn Backend>,
    last: Option<String>,
}

impl DryRunBackend {
    pub fn new(renderer: Box<dyn Backend>) -> Self {
        DryRunBackend {
            renderer,
            last: None,
        }
    }

    /// The payload of the most recent sync.
    pub fn last_payload(&self) -> Option<&str> {
        self.last.as_deref()
    }
}

impl Backend for DryRunBackend {
    fn describe(&self) -> String {
        format!("dry run of {}", self.renderer.describe())
    }

    fn kind(&self) -> &'static str {
        self.renderer.kind()
    }

    fn render(&self, policy: &Policy) -> String {
        self.renderer.render(policy)
    }

    fn diff(&mut self, _policy: &Policy) -> anyhow::Result<Vec<String>> {
        Ok(Vec::new())
    }

    fn sync(&mut self, policy: &Policy) -> anyhow::Result<SyncReport> {
        let payload = self.renderer.render(policy);
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
    use crate::backend::iptables::{ChainName, IptablesBackend};
    use crate::config::{Config, ParseOptions};
    use crate::policy::PolicySettings;

    #[test]
    fn dry_run_reports_what_it_would_write() {
        let mut backend = DryRunBackend::new(Box::new(IptablesBackend::for_rendering(
            ChainName::default(),
        )));
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
    }
}
