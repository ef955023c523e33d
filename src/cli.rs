//! Command-line flags in Go's flag syntax, kept apart from the settings derived from them.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::agent::Settings;
use crate::backend::iptables::IptablesMode;
use crate::backend::{BackendChoice, ChainName};
use crate::config::source::ConfigPath;
use crate::config::{DEFAULT_CONFIG_PATH, ParseOptions};
use crate::conntrack::ConntrackCleanup;
use crate::observe::logging::LogFormat;
use crate::policy::{Masquerade, PolicySettings, ToPorts};

/// Go's strconv.ParseBool, which is what `--flag=value` accepts for booleans upstream.
fn go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(format!(
            "invalid boolean value {text:?} (use true or false)"
        )),
    }
}

/// A positive Go duration, e.g. `30s`.
fn positive_duration(text: &str) -> Result<std::time::Duration, String> {
    let parsed = crate::config::duration::parse_go_duration(text).map_err(|e| e.to_string())?;
    match u64::try_from(parsed.0) {
        Ok(nanos) if nanos > 0 => Ok(std::time::Duration::from_nanos(nanos)),
        _ => Err(format!("{text:?} must be a positive duration such as 30s")),
    }
}

fn metrics_address(text: &str) -> Result<String, String> {
    if text.is_empty() || text.parse::<std::net::SocketAddr>().is_ok() {
        Ok(text.to_string())
    } else {
        Err(format!(
            "{text:?} is not HOST:PORT (e.g. 127.0.0.1:9910), or empty to disable"
        ))
    }
}

/// Keeps the Kubernetes IP masquerade rules of a node in step with a ConfigMap.
#[derive(Debug, Parser)]
#[command(name = "ip-masq-agent", disable_version_flag = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub agent: AgentArgs,

    #[command(flatten)]
    pub klog: KlogArgs,

    /// Print the version and exit (`--version=raw` adds build details).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "true|raw")]
    pub version: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a config file and print its warnings; exit 1 if it would be rejected.
    Check {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
    },
    /// Print the exact rules the agent would apply for the config, without root.
    Render,
    /// Remove the agent's chain, every jump into it and its nft table (needs root).
    Cleanup,
    /// Say for each address whether pod traffic to it is masqueraded, and which rule decides.
    Explain {
        /// The packet's source (a pod address, or a client outside the cluster); shows
        /// whether it is in masqueradeSourceCIDRs' scope.
        #[arg(long = "from", value_name = "SRC")]
        from: Option<std::net::IpAddr>,
        /// The interface the packet leaves by; shows whether outputInterface lists it.
        #[arg(long = "out", value_name = "IFACE")]
        out: Option<String>,
        #[arg(required = true, value_name = "IP")]
        addresses: Vec<String>,
    },
    /// Compare the kernel's rules with the config; exit 1 with a diff if they differ (needs root).
    Status,
    /// Rewrite the OutBoundNAT exception list of a Windows CNI config in place.
    WindowsCni {
        /// The CNI config (.conf or .conflist) to rewrite.
        #[arg(long = "cni-conf", value_name = "PATH")]
        cni_conf: PathBuf,
    },
    /// Print the version.
    Version,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Config file (YAML or JSON), normally a ConfigMap key mounted as a directory volume.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH, global = true)]
    pub config: PathBuf,

    /// Merge every file named ip-masq* in this directory instead of reading --config
    /// (Azure ip-masq-agent-v2's layout).
    #[arg(long = "config-dir", global = true)]
    pub config_dir: Option<PathBuf>,

    /// Name of nat chain for iptables masquerade rules.
    #[arg(long = "masq-chain", default_value = "IP-MASQ-AGENT", global = true)]
    pub masq_chain: ChainName,

    /// Whether to disable masquerade for all IPv4 ranges reserved by RFCs.
    #[arg(long = "nomasq-all-reserved-ranges", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool, global = true)]
    pub nomasq_all_reserved_ranges: bool,

    /// Whether to enable IPv6.
    #[arg(long = "enable-ipv6", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool, global = true)]
    pub enable_ipv6: bool,

    /// Whether to add --random-fully to the masquerade rule (when iptables supports it).
    #[arg(long = "random-fully", num_args = 0..=1, require_equals = true, default_value = "true", default_missing_value = "true", value_parser = go_bool, global = true)]
    pub random_fully: bool,

    /// Port ranges for masqueraded tcp/udp/sctp source ports, e.g. 1024-29999,32768-65535.
    #[arg(long = "to-ports", default_value = "", global = true)]
    pub to_ports: ToPorts,

    /// Which iptables holds the rules: auto follows kubelet's choice, as Kubernetes' iptables-wrapper does.
    #[arg(long = "iptables-mode", value_enum, default_value_t = IptablesMode::Auto, global = true)]
    pub iptables_mode: IptablesMode,

    /// Which backend programs the kernel: iptables (upstream's layout) or nftables.
    #[arg(long, value_enum, default_value_t = BackendChoice::Iptables, global = true)]
    pub backend: BackendChoice,

    /// Address of the /metrics, /healthz and /readyz endpoint; empty disables it.
    #[arg(long = "metrics-address", default_value = "127.0.0.1:9910", value_parser = metrics_address, global = true)]
    pub metrics_address: String,

    /// Log format: text (severity, time, message, key=value fields) or json.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// On SIGTERM/SIGINT, remove everything the agent installed before exiting.
    #[arg(long = "cleanup-on-exit", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub cleanup_on_exit: bool,

    /// Log the rules each sync would write instead of writing them.
    #[arg(long = "dry-run", num_args = 0..=1, require_equals = true, default_value = "false", default_missing_value = "true", value_parser = go_bool)]
    pub dry_run: bool,

    /// After a config change, delete the conntrack entries of UDP flows whose decision
    /// changed, so their next packet follows the new rules (udp), or touch none (none).
    #[arg(long = "conntrack-cleanup", value_enum, default_value_t = ConntrackCleanup::Udp, global = true)]
    pub conntrack_cleanup: ConntrackCleanup,

    /// How long one iptables/nft run may take before it is killed and the sync counts as
    /// failed (never less than the xtables lock wait it is given).
    #[arg(long = "tool-timeout", default_value = "30s", value_parser = positive_duration, global = true)]
    pub tool_timeout: std::time::Duration,
}

/// klog's flags, accepted so existing manifests keep working; only `--v` has an effect.
#[derive(Debug, Args)]
pub struct KlogArgs {
    /// Log verbosity: 0-1 info, 2-3 debug, 4+ trace.
    #[arg(long = "v", value_name = "LEVEL", default_value_t = 0, global = true)]
    pub verbosity: u8,
    #[arg(long, hide = true, global = true)]
    pub vmodule: Option<String>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub logtostderr: Option<bool>,
    #[arg(long, hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub alsologtostderr: Option<bool>,
    #[arg(long, hide = true, global = true)]
    pub stderrthreshold: Option<String>,
    #[arg(long = "log_dir", hide = true, global = true)]
    pub log_dir: Option<String>,
    #[arg(long = "log_file", hide = true, global = true)]
    pub log_file: Option<String>,
    #[arg(long = "log_file_max_size", hide = true, global = true)]
    pub log_file_max_size: Option<String>,
    #[arg(long = "log_backtrace_at", hide = true, global = true)]
    pub log_backtrace_at: Option<String>,
    #[arg(long = "log-flush-frequency", hide = true, global = true)]
    pub log_flush_frequency: Option<String>,
    #[arg(long = "skip_headers", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub skip_headers: Option<bool>,
    #[arg(long = "skip_log_headers", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub skip_log_headers: Option<bool>,
    #[arg(long = "one_output", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub one_output: Option<bool>,
    #[arg(long = "add_dir_header", hide = true, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = go_bool, global = true)]
    pub add_dir_header: Option<bool>,
}

impl KlogArgs {
    /// The klog flags that were given but change nothing here, as `--name=value`.
    pub fn ignored(&self) -> Vec<String> {
        let mut ignored = Vec::new();
        let mut note = |name: &str, value: Option<String>| {
            if let Some(value) = value {
                ignored.push(format!("--{name}={value}"));
            }
        };
        note("vmodule", self.vmodule.clone());
        note("logtostderr", self.logtostderr.map(|b| b.to_string()));
        note(
            "alsologtostderr",
            self.alsologtostderr.map(|b| b.to_string()),
        );
        note("stderrthreshold", self.stderrthreshold.clone());
        note("log_dir", self.log_dir.clone());
        note("log_file", self.log_file.clone());
        note("log_file_max_size", self.log_file_max_size.clone());
        note("log_backtrace_at", self.log_backtrace_at.clone());
        note("log-flush-frequency", self.log_flush_frequency.clone());
        note("skip_headers", self.skip_headers.map(|b| b.to_string()));
        note(
            "skip_log_headers",
            self.skip_log_headers.map(|b| b.to_string()),
        );
        note("one_output", self.one_output.map(|b| b.to_string()));
        note("add_dir_header", self.add_dir_header.map(|b| b.to_string()));
        ignored
    }
}

/// Rewrites Go-style flags for clap: Go treats `-flag` and `--flag` alike.
pub fn normalize_go_flags<I: IntoIterator<Item = OsString>>(args: I) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut only_positionals = false;
    for (index, arg) in args.into_iter().enumerate() {
        let text = arg.to_string_lossy();
        if index == 0 || only_positionals {
            out.push(arg);
            continue;
        }
        if text == "--" {
            only_positionals = true;
            out.push(arg);
            continue;
        }
        if text == "-h" || text == "-help" || text == "--help" {
            out.push(OsString::from("--help"));
            continue;
        }
        let single_dash = text.starts_with('-') && !text.starts_with("--") && text.len() > 1;
        if single_dash && !text[1..].starts_with(|c: char| c.is_ascii_digit()) {
            out.push(OsString::from(format!("-{text}")));
        } else {
            out.push(arg);
        }
    }
    out
}

impl AgentArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            config: match &self.config_dir {
                Some(dir) => ConfigPath::Dir(dir.clone()),
                None => ConfigPath::File(self.config.clone()),
            },
            parse_options: ParseOptions {
                enable_ipv6: self.enable_ipv6,
                nomasq_all_reserved_ranges: self.nomasq_all_reserved_ranges,
            },
            policy_settings: PolicySettings {
                enable_ipv6: self.enable_ipv6,
                masquerade: Masquerade {
                    random_fully: self.random_fully,
                    to_ports: self.to_ports.clone(),
                },
            },
            chain: self.masq_chain.clone(),
            iptables_mode: self.iptables_mode,
            backend: self.backend,
            cleanup_on_exit: self.cleanup_on_exit,
            dry_run: self.dry_run,
            metrics_address: self.metrics_address.parse().ok(),
            tool_timeout: self.tool_timeout,
            conntrack_cleanup: self.conntrack_cleanup,
        }
    }
}

/// The process's own arguments, Go style.
pub fn parse() -> Result<Cli, clap::Error> {
    Cli::parse_go_style(std::env::args_os())
}

impl Cli {
    /// Parses Go-style arguments (`-flag=v`, `--flag v`, `--bool`, `--bool=false`).
    pub fn parse_go_style<I: IntoIterator<Item = OsString>>(args: I) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(normalize_go_flags(args))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::parse_go_style(
            std::iter::once("ip-masq-agent")
                .chain(args.iter().copied())
                .map(OsString::from),
        )
    }

    #[test]
    fn defaults_match_upstream() {
        let s = parse(&[]).unwrap().agent.settings();
        assert_eq!(s.chain.as_str(), "IP-MASQ-AGENT");
        assert_eq!(
            s.config,
            ConfigPath::File(PathBuf::from("/etc/config/ip-masq-agent"))
        );
        assert!(!s.parse_options.enable_ipv6);
        assert!(!s.parse_options.nomasq_all_reserved_ranges);
        assert!(s.policy_settings.masquerade.random_fully);
        assert!(s.policy_settings.masquerade.to_ports.0.is_empty());
        assert_eq!(s.iptables_mode, IptablesMode::Auto);
        assert_eq!(s.backend, BackendChoice::Iptables);
        assert_eq!(
            parse(&["--backend=nftables"]).unwrap().agent.backend,
            BackendChoice::Nftables
        );
        assert_eq!(
            parse(&["render", "--backend", "auto"])
                .unwrap()
                .agent
                .backend,
            BackendChoice::Auto
        );
    }

    #[test]
    fn go_flag_spellings_are_accepted() {
        let cli = parse(&[
            "-masq-chain=CUSTOM",
            "--enable-ipv6",
            "-nomasq-all-reserved-ranges=true",
            "--random-fully=false",
            "--to-ports",
            "1024-29999,32768-65535",
            "-v=4",
        ])
        .unwrap();
        let s = cli.agent.settings();
        assert_eq!(s.chain.as_str(), "CUSTOM");
        assert!(s.parse_options.enable_ipv6);
        assert!(s.parse_options.nomasq_all_reserved_ranges);
        assert!(!s.policy_settings.masquerade.random_fully);
        assert_eq!(
            s.policy_settings.masquerade.to_ports.to_string(),
            "1024-29999,32768-65535"
        );
        assert_eq!(cli.klog.verbosity, 4);
        assert_eq!(
            parse(&["--masq-chain", "OTHER"])
                .unwrap()
                .agent
                .masq_chain
                .as_str(),
            "OTHER"
        );
        assert_eq!(parse(&["--v", "2"]).unwrap().klog.verbosity, 2);
        assert!(parse(&["--enable-ipv6=1"]).unwrap().agent.enable_ipv6);
    }

    #[test]
    fn klog_flags_are_accepted_and_reported() {
        let cli = parse(&[
            "--logtostderr",
            "--alsologtostderr=false",
            "--stderrthreshold=INFO",
            "--log_dir=/tmp",
            "--vmodule=x=2",
            "--skip_headers",
            "--one_output=true",
            "--log_file=/tmp/x",
        ])
        .unwrap();
        let ignored = cli.klog.ignored();
        assert!(
            ignored.contains(&"--logtostderr=true".to_string()),
            "{ignored:?}"
        );
        assert!(
            ignored.contains(&"--log_dir=/tmp".to_string()),
            "{ignored:?}"
        );
        assert_eq!(ignored.len(), 8);
    }

    #[test]
    fn bad_flags_are_rejected() {
        assert!(parse(&["--masq-chain=WAY-TOO-LONG-CHAIN-NAME-FOR-IPTABLES"]).is_err());
        assert!(parse(&["--masq-chain=has space"]).is_err());
        assert!(parse(&["--to-ports=70000"]).is_err());
        assert!(parse(&["--enable-ipv6=maybe"]).is_err());
        assert!(parse(&["--no-such-flag"]).is_err());
        assert!(parse(&["--iptables-mode=iptables"]).is_err());
        // Go's boolean flags never take a separate value.
        assert!(parse(&["--enable-ipv6", "false"]).is_err());
    }

    #[test]
    fn version_flag_and_subcommands_parse() {
        assert_eq!(
            parse(&["--version"]).unwrap().version.as_deref(),
            Some("true")
        );
        assert_eq!(
            parse(&["-version=raw"]).unwrap().version.as_deref(),
            Some("raw")
        );
        assert!(matches!(
            parse(&["check", "/tmp/x"]).unwrap().command,
            Some(Command::Check { .. })
        ));
        assert!(matches!(
            parse(&["render", "--enable-ipv6"]).unwrap().command,
            Some(Command::Render)
        ));
    }
}
