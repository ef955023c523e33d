//! The agent's config file: raw document -> validated [`Config`], with upstream's
//! defaults, key matching, value semantics and error texts.

mod document;
pub mod duration;
pub mod egress;
mod fast_path;
pub mod quote;
pub mod source;

use std::fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use document::{Located, SyntaxError, Value, parse_document_general};

/// How a document's text becomes a tree: [`read_document`], or the general path alone.
type DocumentReader = for<'a> fn(&'a str) -> Result<Option<Located<'a>>, SyntaxError>;

/// The document's tree; `Ok(None)` for an empty document. The common shape (a mapping of
/// lists of CIDR strings) is read by the fast path, everything else (and anything the
/// fast path is not sure of) by serde-saphyr.
fn read_document(text: &str) -> Result<Option<Located<'_>>, SyntaxError> {
    let Some(json) = document::prepare(text)? else {
        return Ok(None);
    };
    if let Some(tree) = fast_path::parse(text, json) {
        return Ok(Some(tree));
    }
    document::parse_yaml(text)
}
pub use document::{MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_VALUES, Position};
use duration::parse_go_duration;
use egress::{AddressRange, InterfacePattern, parse_address_range, parse_interface};

/// Where the ConfigMap is mounted in upstream's manifests.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/config/ip-masq-agent";

/// Files larger than this are refused before parsing. Even 50,000 IPv6 CIDRs fit in 2 MiB,
/// and a ConfigMap holds at most 1 MiB. The whole file is in memory while it is parsed,
/// and one scalar of it may be copied once more, so this bound is also what keeps a
/// hostile file's cost (file + copy + the bounded tree) under the pod's memory limit.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The shortest resync interval the agent honours: a shorter one is a busy loop of
/// `iptables-save` runs (upstream spins on 0s); it is raised to this with a warning.
pub const MIN_RESYNC_INTERVAL: Duration = Duration::from_millis(100);

/// Go's `int` on the platforms upstream ships for: cidrLimit cannot be larger.
const GO_INT_MAX: i128 = i64::MAX as i128;

const RFC1918: [&str; 3] = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"];
const OTHER_RESERVED: [&str; 8] = [
    "100.64.0.0/10",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.88.99.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "240.0.0.0/4",
];

/// Config keys as upstream spells them; matching is case-insensitive like Go's encoding/json.
pub const KNOWN_KEYS: [&str; 10] = [
    "nonMasqueradeCIDRs",
    "cidrLimit",
    "masqLinkLocal",
    "masqLinkLocalIPv6",
    "resyncInterval",
    "forceMasqueradeCIDRs",
    "masqueradeSourceCIDRs",
    "outputInterface",
    "outputAddress",
    "outputAddressIPv6",
];

/// The keys that hold CIDR lists, and how each is named in messages.
const NON_MASQ_KEY: &str = "nonMasqueradeCIDRs";
const FORCE_KEY: &str = "forceMasqueradeCIDRs";
const SOURCE_KEY: &str = "masqueradeSourceCIDRs";
const OUTPUT_INTERFACE_KEY: &str = "outputInterface";
const OUTPUT_ADDRESS_KEY: &str = "outputAddress";
const OUTPUT_ADDRESS_IPV6_KEY: &str = "outputAddressIPv6";

/// Settings that come from flags but change how the file is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ParseOptions {
    pub enable_ipv6: bool,
    pub nomasq_all_reserved_ranges: bool,
}

/// A validated config: every prefix parses, is aligned, and belongs to an enabled family.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Config {
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// Destinations masqueraded even inside a non-masquerade range (longest prefix wins).
    pub force_masquerade_cidrs: Vec<IpNet>,
    /// When set, only packets from these sources are masqueraded; None: every source.
    pub masquerade_source_cidrs: Option<Vec<IpNet>>,
    pub cidr_limit: usize,
    pub masq_link_local: bool,
    pub masq_link_local_ipv6: bool,
    pub resync_interval: Duration,
    /// `outputInterface`: only packets leaving through one of these are masqueraded;
    /// None: every interface (an empty list: none).
    pub output_interfaces: Option<Vec<InterfacePattern>>,
    /// `outputAddress`: masqueraded IPv4 packets get `SNAT --to-source` this instead of
    /// MASQUERADE.
    pub output_address: Option<AddressRange>,
    /// `outputAddressIPv6`: the same for IPv6.
    pub output_address_ipv6: Option<AddressRange>,
}

impl Config {
    pub fn defaults(options: ParseOptions) -> Config {
        let mut cidrs: Vec<&str> = RFC1918.to_vec();
        if options.nomasq_all_reserved_ranges {
            cidrs.extend(OTHER_RESERVED);
        }
        Config {
            non_masquerade_cidrs: cidrs.into_iter().filter_map(|c| c.parse().ok()).collect(),
            force_masquerade_cidrs: Vec::new(),
            masquerade_source_cidrs: None,
            cidr_limit: 64,
            masq_link_local: false,
            masq_link_local_ipv6: false,
            resync_interval: Duration::from_secs(60),
            output_interfaces: None,
            output_address: None,
            output_address_ipv6: None,
        }
    }
}

/// Where a loaded config came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(PathBuf),
    /// No file at the path (or no `ip-masq*` file in the directory): upstream's defaults apply.
    Missing(PathBuf),
    /// `--config-dir`: the directory and the files merged from it.
    Dir(PathBuf, Vec<PathBuf>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedConfig {
    pub config: Config,
    pub source: ConfigSource,
    /// Things worth an operator's attention that do not make the file invalid.
    pub warnings: Vec<String>,
}

/// A rejected config file: names the file, the position, the key and the problem.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub position: Option<Position>,
    pub key: Option<String>,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", quote::path(&self.file))?;
        if let Some(position) = self.position {
            write!(f, ":{position}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.problem)
    }
}

/// What one file sets explicitly; `None` keeps the default (or another file's value).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileSettings {
    pub non_masquerade_cidrs: Option<Vec<IpNet>>,
    pub force_masquerade_cidrs: Option<Vec<IpNet>>,
    pub masquerade_source_cidrs: Option<Vec<IpNet>>,
    pub cidr_limit: Option<usize>,
    pub masq_link_local: Option<bool>,
    pub masq_link_local_ipv6: Option<bool>,
    pub resync_interval: Option<Duration>,
    pub output_interfaces: Option<Vec<InterfacePattern>>,
    pub output_address: Option<AddressRange>,
    pub output_address_ipv6: Option<AddressRange>,
}

fn limit_error(
    file: &Path,
    position: Option<Position>,
    key: &str,
    limit: usize,
    count: usize,
) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        position,
        key: Some(key.to_string()),
        problem: format!(
            "the daemon can only accept up to {limit} CIDRs (excluding link-local), but got {count} CIDRs (excluding link local)"
        ),
    }
}

impl FileSettings {
    /// The settings over upstream's defaults.
    pub fn over_defaults(&self, options: ParseOptions) -> Config {
        let defaults = Config::defaults(options);
        Config {
            non_masquerade_cidrs: self
                .non_masquerade_cidrs
                .clone()
                .unwrap_or(defaults.non_masquerade_cidrs),
            force_masquerade_cidrs: self.force_masquerade_cidrs.clone().unwrap_or_default(),
            masquerade_source_cidrs: self.masquerade_source_cidrs.clone(),
            cidr_limit: self.cidr_limit.unwrap_or(defaults.cidr_limit),
            masq_link_local: self.masq_link_local.unwrap_or(defaults.masq_link_local),
            masq_link_local_ipv6: self
                .masq_link_local_ipv6
                .unwrap_or(defaults.masq_link_local_ipv6),
            resync_interval: self.resync_interval.unwrap_or(defaults.resync_interval),
            output_interfaces: self.output_interfaces.clone(),
            output_address: self.output_address,
            output_address_ipv6: self.output_address_ipv6,
        }
    }
}

/// Reads a file with the agent's limits: regular files only (a FIFO would block the
/// agent on open), at most [`MAX_CONFIG_BYTES`], UTF-8. `Ok(None)` when it does not exist.
fn read_config_text(path: &Path) -> Result<Option<String>, ConfigError> {
    read_config_text_checked(path, &|| {})
}

/// Refuses what is not a regular file of at most [`MAX_CONFIG_BYTES`].
fn check_file_kind(meta: &std::fs::Metadata) -> Result<(), String> {
    if meta.is_dir() {
        return Err(
            "is a directory, expected a YAML or JSON file (mount the ConfigMap directory and point --config at the file in it)".into(),
        );
    }
    if !meta.is_file() {
        return Err(
            "is not a regular file (a FIFO, socket or device); expected a YAML or JSON file".into(),
        );
    }
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(format!(
            "file is {} bytes, larger than the {MAX_CONFIG_BYTES} bytes the agent reads; refusing to parse it",
            meta.len()
        ));
    }
    Ok(())
}

/// `read_config_text`, with `between_stat_and_open` run in the gap a swap could use (the
/// tests put a FIFO there, or remove the file).
fn read_config_text_checked(
    path: &Path,
    between_stat_and_open: &dyn Fn(),
) -> Result<Option<String>, ConfigError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |problem: String| ConfigError {
        file: path.to_path_buf(),
        position: None,
        key: None,
        problem,
    };
    // metadata() follows symlinks, so a dangling `..data` link reads as missing, like
    // Go's os.Stat. Checked before opening so that a device or FIFO is never opened.
    let meta = match std::fs::metadata(path) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(fail(format!("cannot read config file: {err}"))),
        Ok(meta) => meta,
    };
    check_file_kind(&meta).map_err(fail)?;
    between_stat_and_open();
    // The name can be swapped between the check and the open: O_NONBLOCK keeps a FIFO put
    // there from blocking the open (and the sync loop with it), O_NOCTTY a terminal from
    // becoming ours, and the descriptor itself is checked again below.
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
    {
        // Removed since the stat: as if it had never been there.
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(fail(format!("cannot read config file: {err}"))),
        Ok(file) => file,
    };
    let opened = file
        .metadata()
        .map_err(|e| fail(format!("cannot read config file: {e}")))?;
    check_file_kind(&opened).map_err(fail)?;
    let mut bytes = Vec::new();
    // The size can change between stat and read: the limit holds for the read too.
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| fail(format!("cannot read config file: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(fail(format!(
            "file is larger than the {MAX_CONFIG_BYTES} bytes the agent reads; refusing to parse it"
        )));
    }
    String::from_utf8(bytes).map(Some).map_err(|e| {
        fail(format!(
            "not UTF-8 text (invalid byte at offset {}); is this a binary file?",
            e.utf8_error().valid_up_to()
        ))
    })
}

/// Reads and validates the config at `path`; a missing file means defaults, as upstream.
pub fn load(path: &Path, options: ParseOptions) -> Result<LoadedConfig, ConfigError> {
    match read_config_text(path)? {
        None => Ok(LoadedConfig {
            config: Config::defaults(options),
            source: ConfigSource::Missing(path.to_path_buf()),
            warnings: Vec::new(),
        }),
        Some(text) => parse(&text, path, options),
    }
}

/// The last file text parsed and what came of it: a resync that reads the same bytes
/// again reuses the result instead of parsing (a 50,000-entry list takes tens of
/// milliseconds to parse; reading and comparing it, well under one).
#[derive(Default)]
pub struct ParseCache {
    last: Option<(
        PathBuf,
        ParseOptions,
        String,
        Result<LoadedConfig, ConfigError>,
    )>,
}

/// `load`, reusing the previous result when the file's text has not changed.
pub fn load_cached(
    path: &Path,
    options: ParseOptions,
    cache: &mut ParseCache,
) -> Result<LoadedConfig, ConfigError> {
    let Some(text) = read_config_text(path)? else {
        return load(path, options);
    };
    if let Some((p, o, t, result)) = &cache.last
        && p == path
        && *o == options
        && *t == text
    {
        return result.clone();
    }
    let result = parse(&text, path, options);
    cache.last = Some((path.to_path_buf(), options, text, result.clone()));
    result
}

/// Parses config text as if read from `file` (used for messages only).
pub fn parse(text: &str, file: &Path, options: ParseOptions) -> Result<LoadedConfig, ConfigError> {
    parse_with(text, file, options, read_document)
}

fn parse_with(
    text: &str,
    file: &Path,
    options: ParseOptions,
    read: DocumentReader,
) -> Result<LoadedConfig, ConfigError> {
    let (settings, warnings) = parse_settings_with(text, file, options, true, read)?;
    let config = settings.over_defaults(options);
    let destinations = config.non_masquerade_cidrs.len() + config.force_masquerade_cidrs.len();
    if settings.non_masquerade_cidrs.is_none() && destinations > config.cidr_limit {
        return Err(limit_error(
            file,
            None,
            "cidrLimit",
            config.cidr_limit,
            destinations,
        ));
    }
    Ok(LoadedConfig {
        config,
        source: ConfigSource::File(file.to_path_buf()),
        warnings,
    })
}

/// Parses one file into what it sets explicitly, validating every value it sets.
/// `alone`: the file is the whole config (`--config`), not one of a `--config-dir` set,
/// so the checks that need every key (the default list, the scope of each family) are
/// made here, where positions are known.
pub fn parse_settings(
    text: &str,
    file: &Path,
    options: ParseOptions,
    alone: bool,
) -> Result<(FileSettings, Vec<String>), ConfigError> {
    parse_settings_with(text, file, options, alone, read_document)
}

fn parse_settings_with(
    text: &str,
    file: &Path,
    options: ParseOptions,
    alone: bool,
    read: DocumentReader,
) -> Result<(FileSettings, Vec<String>), ConfigError> {
    let error = |position: Option<Position>, key: Option<&str>, problem: String| ConfigError {
        file: file.to_path_buf(),
        position,
        key: key.map(str::to_owned),
        problem,
    };
    let document = read(text).map_err(|e| {
        error(
            e.position,
            None,
            format!("not valid YAML or JSON: {}", e.message),
        )
    })?;
    let mut settings = FileSettings::default();
    let mut warnings = Vec::new();
    let Some(document) = document else {
        return Ok((settings, warnings));
    };
    let Value::Map(entries) = document.value else {
        return Err(error(
            document.position,
            None,
            format!(
                "expected a mapping of config keys ({}), got {}",
                KNOWN_KEYS.join(", "),
                document.value.describe()
            ),
        ));
    };

    // The CIDR lists, validated once every key is read (cidrLimit may come after them).
    let mut list_nodes: Vec<(&'static str, Vec<Located>, Option<Position>)> = Vec::new();
    for (key_node, mut value) in in_upstreams_order(entries) {
        let key_text = match &key_node.value {
            Value::Str(s) => s.to_string(),
            other => other.describe(),
        };
        let Some(key) = match_key(&key_text) else {
            warnings.push(format!(
                "{}unknown key {} is ignored; did you mean {:?}?",
                place_of(file, key_node.position),
                quote::quoted(&key_text),
                closest_key(&key_text)
            ));
            continue;
        };
        if matches!(key, NON_MASQ_KEY | FORCE_KEY | SOURCE_KEY)
            && let Value::List(items) = &mut value.value
        {
            // Taken, not copied: a list near the value bound is most of the tree.
            list_nodes.retain(|(k, _, _)| *k != key);
            list_nodes.push((key, std::mem::take(items), value.position));
            continue;
        }
        let type_error = |expected: &str| {
            error(
                value.position,
                Some(key),
                format!(
                    "expected {expected}, got {} {}",
                    value.value.json_type(),
                    value.value.describe()
                ),
            )
        };
        // As in Go's encoding/json, null leaves a scalar untouched and empties a list.
        match (key, &value.value) {
            (NON_MASQ_KEY | FORCE_KEY | SOURCE_KEY, Value::Null) => {
                list_nodes.retain(|(k, _, _)| *k != key);
                list_nodes.push((key, Vec::new(), value.position));
            }
            (NON_MASQ_KEY | FORCE_KEY | SOURCE_KEY, _) => {
                return Err(type_error(
                    "a list of CIDR strings such as [\"10.0.0.0/8\"]",
                ));
            }
            // PR #103's outputInterface is one name; a list of them is this agent's. An
            // empty string is unset there (Go's zero value), and so it is here.
            (OUTPUT_INTERFACE_KEY, Value::Str(text)) if text.is_empty() => {
                settings.output_interfaces = None;
            }
            (OUTPUT_INTERFACE_KEY, Value::Str(text)) => {
                let pattern = parse_interface(text)
                    .map_err(|problem| error(value.position, Some(key), problem))?;
                settings.output_interfaces = Some(vec![pattern]);
            }
            (OUTPUT_INTERFACE_KEY, Value::List(items)) => {
                let mut patterns = Vec::with_capacity(items.len());
                for (index, item) in items.iter().enumerate() {
                    let item_key = format!("{key}[{index}]");
                    let Value::Str(text) = &item.value else {
                        return Err(error(
                            item.position,
                            Some(&item_key),
                            format!(
                                "expected an interface name such as \"eth0\" or \"bond+\", got {} {}",
                                item.value.json_type(),
                                item.value.describe()
                            ),
                        ));
                    };
                    let pattern = parse_interface(text)
                        .map_err(|problem| error(item.position, Some(&item_key), problem))?;
                    if !patterns.contains(&pattern) {
                        patterns.push(pattern);
                    }
                }
                // In a --config-dir set another file may list some: the merge says.
                if patterns.is_empty() && alone {
                    warnings.push(format!(
                        "{}{OUTPUT_INTERFACE_KEY} is empty: no packet is masqueraded, whatever interface it leaves by (remove the key to masquerade on every interface)",
                        place_of(file, value.position)
                    ));
                }
                settings.output_interfaces = Some(patterns);
            }
            (OUTPUT_INTERFACE_KEY, Value::Null) => {}
            (OUTPUT_INTERFACE_KEY, _) => {
                return Err(type_error(
                    "an interface name such as \"eth0\" or \"bond+\", or a list of them",
                ));
            }
            (OUTPUT_ADDRESS_KEY, Value::Str(text)) if text.is_empty() => {
                settings.output_address = None;
            }
            (OUTPUT_ADDRESS_IPV6_KEY, Value::Str(text)) if text.is_empty() => {
                settings.output_address_ipv6 = None;
            }
            (OUTPUT_ADDRESS_KEY | OUTPUT_ADDRESS_IPV6_KEY, Value::Str(text)) => {
                let ipv6 = key == OUTPUT_ADDRESS_IPV6_KEY;
                if ipv6 && !options.enable_ipv6 {
                    return Err(error(
                        value.position,
                        Some(key),
                        format!(
                            "ipv6 is not enabled, but {key} {} is set. Enable ipv6 using --enable-ipv6 agent flag",
                            quote::quoted(text)
                        ),
                    ));
                }
                let range = parse_address_range(text, ipv6)
                    .map_err(|problem| error(value.position, Some(key), problem))?;
                if ipv6 {
                    settings.output_address_ipv6 = Some(range);
                } else {
                    settings.output_address = Some(range);
                }
            }
            (OUTPUT_ADDRESS_KEY | OUTPUT_ADDRESS_IPV6_KEY, Value::Null) => {}
            (OUTPUT_ADDRESS_KEY, _) => {
                return Err(type_error(
                    "an IPv4 address or range such as \"192.0.2.10\" or \"192.0.2.10-192.0.2.20\"",
                ));
            }
            (OUTPUT_ADDRESS_IPV6_KEY, _) => {
                return Err(type_error(
                    "an IPv6 address or range such as \"2001:db8::10\" or \"2001:db8::10-2001:db8::20\"",
                ));
            }
            // Upstream's Duration.UnmarshalJSON receives `null` and rejects it.
            ("resyncInterval", Value::Null) => {
                return Err(error(
                    value.position,
                    Some(key),
                    "expected a duration string such as \"60s\" or \"1m30s\", got null; upstream rejects null too (remove the key to keep the default 60s)".into(),
                ));
            }
            (_, Value::Null) => {}
            ("cidrLimit", Value::Int(n)) => {
                settings.cidr_limit = Some(
                    cidr_limit(*n).map_err(|problem| error(value.position, Some(key), problem))?,
                );
            }
            // A YAML 1.1 float such as `1e3` reaches upstream's int as JSON `1000`: a whole
            // float is a whole number there.
            ("cidrLimit", Value::Float(f)) if f.is_finite() && f.fract() == 0.0 => {
                let whole = *f as i128;
                settings.cidr_limit = Some(
                    cidr_limit(whole)
                        .map_err(|problem| error(value.position, Some(key), problem))?,
                );
            }
            ("cidrLimit", _) => return Err(type_error("a whole number")),
            ("masqLinkLocal", Value::Bool(b)) => settings.masq_link_local = Some(*b),
            ("masqLinkLocalIPv6", Value::Bool(b)) => settings.masq_link_local_ipv6 = Some(*b),
            ("masqLinkLocal" | "masqLinkLocalIPv6", _) => {
                return Err(type_error("a boolean (true/false, yes/no, on/off)"));
            }
            ("resyncInterval", Value::Str(text)) => {
                let parsed = parse_go_duration(text)
                    .map_err(|e| error(value.position, Some(key), format!("{e}")))?;
                if parsed.0 <= 0 {
                    return Err(error(
                        value.position,
                        Some(key),
                        format!(
                            "{} must be a positive duration such as \"60s\" or \"1m30s\" (upstream busy-loops on this value)",
                            quote::quoted(text)
                        ),
                    ));
                }
                let mut interval = Duration::from_nanos(parsed.0.unsigned_abs());
                if interval < MIN_RESYNC_INTERVAL {
                    warnings.push(format!(
                        "{}resyncInterval {} is shorter than {}ms; using {}ms (a shorter interval is a busy loop)",
                        place_of(file, value.position),
                        quote::quoted(text),
                        MIN_RESYNC_INTERVAL.as_millis(),
                        MIN_RESYNC_INTERVAL.as_millis(),
                    ));
                    interval = MIN_RESYNC_INTERVAL;
                }
                settings.resync_interval = Some(interval);
            }
            ("resyncInterval", _) => {
                return Err(type_error("a duration string such as \"60s\" or \"1m30s\""));
            }
            _ => {}
        }
    }

    let limit = settings
        .cidr_limit
        .unwrap_or(Config::defaults(options).cidr_limit);
    // Every forced prefix with its place, to name both places of a conflict.
    let mut forced: Vec<(usize, IpNet, Option<Position>)> = Vec::new();
    let mut source_position = None;
    let mut destinations = 0;
    for (key, items, list_position) in &list_nodes {
        if *key != SOURCE_KEY {
            destinations += items.len();
            if destinations > limit {
                return Err(limit_error(file, *list_position, key, limit, destinations));
            }
        }
        let item_key = |index: usize| format!("{key}[{index}]");
        let mut cidrs = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let Value::Str(text) = &item.value else {
                return Err(error(
                    item.position,
                    Some(&item_key(index)),
                    format!(
                        "expected a CIDR string such as \"10.0.0.0/8\", got {} {}",
                        item.value.json_type(),
                        item.value.describe()
                    ),
                ));
            };
            let cidr = validate_cidr(text, options.enable_ipv6)
                .map_err(|problem| error(item.position, Some(&item_key(index)), problem))?;
            if *key == FORCE_KEY {
                forced.push((index, cidr, item.position));
            }
            cidrs.push(cidr);
        }
        match *key {
            NON_MASQ_KEY => settings.non_masquerade_cidrs = Some(cidrs),
            FORCE_KEY => settings.force_masquerade_cidrs = Some(cidrs),
            _ => {
                if cidrs.is_empty() {
                    warnings.push(format!(
                        "{}{SOURCE_KEY} is empty: no source is masqueraded (remove the key to masquerade every source)",
                        place_of(file, *list_position)
                    ));
                }
                source_position = *list_position;
                settings.masquerade_source_cidrs = Some(cidrs);
            }
        }
    }
    // The same prefix asked to be kept and masqueraded: longest-prefix match cannot choose.
    // The first place of each kept prefix, hashed (a 50,000-entry list must not cost
    // 50,000 x 50,000 comparisons), and only when something is forced.
    let mut kept_at: std::collections::HashMap<IpNet, (usize, Option<Position>)> =
        std::collections::HashMap::new();
    if let (false, Some(kept), Some((_, items, _))) = (
        forced.is_empty(),
        &settings.non_masquerade_cidrs,
        list_nodes.iter().find(|(key, _, _)| *key == NON_MASQ_KEY),
    ) {
        for (index, (cidr, item)) in kept.iter().zip(items).enumerate() {
            kept_at.entry(*cidr).or_insert((index, item.position));
        }
    }
    for (index, cidr, position) in &forced {
        if let Some((other_index, other_position)) = kept_at.get(cidr) {
            let there = other_position
                .map(|p| format!(" at {p}"))
                .unwrap_or_default();
            return Err(error(
                *position,
                Some(&format!("{FORCE_KEY}[{index}]")),
                format!(
                    "CIDR \"{cidr}\" is also in {NON_MASQ_KEY}[{other_index}]{there}; {ONE_LIST_ONLY}"
                ),
            ));
        }
    }
    if alone {
        // The file is the whole config: the default list applies when it sets none.
        if settings.non_masquerade_cidrs.is_none() {
            let defaults = Config::defaults(options).non_masquerade_cidrs;
            if let Some((index, cidr, position)) =
                forced.iter().find(|(_, cidr, _)| defaults.contains(cidr))
            {
                return Err(error(
                    *position,
                    Some(&format!("{FORCE_KEY}[{index}]")),
                    in_default_list(cidr, &defaults),
                ));
            }
        }
        if let Some(sources) = &settings.masquerade_source_cidrs {
            for problem in scope_gaps(sources, options) {
                warnings.push(format!("{}{problem}", place_of(file, source_position)));
            }
        }
    }
    Ok((settings, warnings))
}

/// Why one prefix cannot be in both destination lists.
const ONE_LIST_ONLY: &str = "a prefix can be in only one of the two lists (the longest matching prefix decides, and these are equally long)";

/// A forced prefix that is in the default nonMasqueradeCIDRs list, which applies because
/// no file sets the list: the same conflict as when both lists are written out.
fn in_default_list(cidr: &IpNet, defaults: &[IpNet]) -> String {
    let list: Vec<String> = defaults.iter().map(ToString::to_string).collect();
    format!(
        "CIDR \"{cidr}\" is also in the DEFAULT {NON_MASQ_KEY} list ({}), which applies because {NON_MASQ_KEY} is not set; {ONE_LIST_ONLY}; set {NON_MASQ_KEY} explicitly without it",
        list.join(", ")
    )
}

/// A source scope that names no prefix of a managed family masquerades nothing of that
/// family: each family is scoped separately, so `[10.244.0.0/16]` with --enable-ipv6
/// turns IPv6 masquerading off. One warning per family; none for an empty list (which
/// has its own warning) or a family the agent does not manage.
fn scope_gaps(sources: &[IpNet], options: ParseOptions) -> Vec<String> {
    if sources.is_empty() {
        return Vec::new();
    }
    let mut gaps = Vec::new();
    let families = [
        (
            "IPv4",
            true,
            sources.iter().any(|s| matches!(s, IpNet::V4(_))),
            "10.244.0.0/16",
            "",
        ),
        (
            "IPv6",
            options.enable_ipv6,
            sources.iter().any(|s| matches!(s, IpNet::V6(_))),
            "fd00:10:244::/56",
            " (--enable-ipv6 is set)",
        ),
    ];
    for (family, managed, listed, example, why) in families {
        if managed && !listed {
            gaps.push(format!(
                "{SOURCE_KEY} lists no {family} prefix, so no {family} source is masqueraded{why}: each family is scoped separately; add the {family} pod range (e.g. {example}) or remove the key to masquerade every source"
            ));
        }
    }
    gaps
}

/// The keys of a mapping in the order upstream applies them: it reads a file as YAML
/// into a map (of a key written twice, the last stays), writes that as JSON (Go writes a
/// map's keys sorted, byte-wise), and lets encoding/json apply the keys in that order,
/// matching field names case-insensitively. So of two spellings of one key the byte-wise
/// greater wins (`nonmasqueradecidrs` over `nonMasqueradeCIDRs`), wherever each stands.
fn in_upstreams_order<'a>(
    entries: Vec<(Located<'a>, Located<'a>)>,
) -> Vec<(Located<'a>, Located<'a>)> {
    let text = |key: &Located| match &key.value {
        Value::Str(s) => s.to_string(),
        other => other.describe(),
    };
    let mut last: Vec<(String, Located<'a>, Located<'a>)> = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        let spelled = text(&key);
        last.retain(|(other, _, _)| *other != spelled);
        last.push((spelled, key, value));
    }
    last.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    last.into_iter()
        .map(|(_, key, value)| (key, value))
        .collect()
}

/// `file:line:column: ` (or `file: `) to start a warning with.
fn place_of(file: &Path, position: Option<Position>) -> String {
    match position {
        Some(position) => format!("{}:{position}: ", quote::path(file)),
        None => format!("{}: ", quote::path(file)),
    }
}

/// A cidrLimit as upstream's Go `int` field takes it.
fn cidr_limit(value: i128) -> Result<usize, String> {
    if value > GO_INT_MAX {
        return Err(format!(
            "must be at most {GO_INT_MAX} (upstream's int), got {value}"
        ));
    }
    usize::try_from(value).map_err(|_| format!("must be a whole number from 0 up, got {value}"))
}

/// Reads every file in `dir` whose name starts with `ip-masq` (Azure ip-masq-agent-v2's
/// layout) and merges them: CIDRs in file-name then list order without duplicates,
/// booleans OR-ed, the largest cidrLimit, the shortest resyncInterval. One bad file
/// rejects the whole set. No files means the defaults.
pub fn load_dir(dir: &Path, options: ParseOptions) -> Result<LoadedConfig, ConfigError> {
    let unreadable = |err: std::io::Error| ConfigError {
        file: dir.to_path_buf(),
        position: None,
        key: None,
        problem: format!("cannot list the config directory: {err}"),
    };
    // Names as the bytes they are: a name that is not UTF-8 is read like any other (a
    // lossy copy of it would name no file and be skipped without a word).
    let mut names: Vec<std::ffi::OsString> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name())
        .filter(|name| {
            use std::os::unix::ffi::OsStrExt;
            name.as_bytes()
                .starts_with(source::DIR_FILE_PREFIX.as_bytes())
        })
        .collect();
    names.sort();
    let mut files = Vec::new();
    let mut warnings = Vec::new();
    for name in &names {
        let path = dir.join(name);
        if let Some(text) = read_config_text(&path)? {
            let (settings, file_warnings) = parse_settings(&text, &path, options, false)?;
            warnings.extend(file_warnings);
            files.push((path, settings));
        }
    }
    if files.is_empty() {
        return Ok(LoadedConfig {
            config: Config::defaults(options),
            source: ConfigSource::Missing(dir.to_path_buf()),
            warnings,
        });
    }
    // A prefix forced in one file and kept in another: no longest match decides it.
    for (path, settings) in &files {
        for forced in settings.force_masquerade_cidrs.iter().flatten() {
            if let Some((other, _)) = files.iter().find(|(_, other)| {
                other
                    .non_masquerade_cidrs
                    .as_ref()
                    .is_some_and(|kept| kept.contains(forced))
            }) {
                return Err(ConfigError {
                    file: path.clone(),
                    position: None,
                    key: Some(FORCE_KEY.to_string()),
                    problem: format!(
                        "CIDR \"{forced}\" is also in {NON_MASQ_KEY} of {}; a prefix can be in only one of the two lists",
                        quote::path(other)
                    ),
                });
            }
        }
    }
    // One SNAT address per family: two files that disagree have no merge.
    type AddressOf = fn(&FileSettings) -> Option<AddressRange>;
    let keys: [(&str, AddressOf); 2] = [
        (OUTPUT_ADDRESS_KEY, |s| s.output_address),
        (OUTPUT_ADDRESS_IPV6_KEY, |s| s.output_address_ipv6),
    ];
    for (key, of) in keys {
        let mut first: Option<(&Path, AddressRange)> = None;
        for (path, settings) in &files {
            let Some(range) = of(settings) else { continue };
            match first {
                Some((earlier, chosen)) if chosen != range => {
                    return Err(ConfigError {
                        file: path.clone(),
                        position: None,
                        key: Some(key.to_string()),
                        problem: format!(
                            "{key} is {range} here but {chosen} in {}; set it in one file only",
                            quote::path(earlier)
                        ),
                    });
                }
                Some(_) => {}
                None => first = Some((path, range)),
            }
        }
    }
    let (merged, conflicts) = merge_files(&files);
    warnings.extend(conflicts);
    if merged.output_interfaces.as_ref().is_some_and(Vec::is_empty) {
        warnings.push(format!(
            "{}: {OUTPUT_INTERFACE_KEY} is empty in every file that sets it: no packet is masqueraded, whatever interface it leaves by",
            quote::path(dir)
        ));
    }
    // No file sets the list, so the default one applies: a forced prefix in it is the
    // same conflict as one written in both lists.
    if merged.non_masquerade_cidrs.is_none() {
        let defaults = Config::defaults(options).non_masquerade_cidrs;
        for (path, settings) in &files {
            let list = settings.force_masquerade_cidrs.iter().flatten();
            if let Some((index, cidr)) = list.enumerate().find(|(_, c)| defaults.contains(c)) {
                return Err(ConfigError {
                    file: path.clone(),
                    position: None,
                    key: Some(format!("{FORCE_KEY}[{index}]")),
                    problem: in_default_list(cidr, &defaults),
                });
            }
        }
    }
    let config = merged.over_defaults(options);
    if let Some(sources) = &config.masquerade_source_cidrs {
        for problem in scope_gaps(sources, options) {
            warnings.push(format!("{}: {problem}", quote::path(dir)));
        }
    }
    let destinations = config.non_masquerade_cidrs.len() + config.force_masquerade_cidrs.len();
    if destinations > config.cidr_limit {
        return Err(limit_error(
            dir,
            None,
            "nonMasqueradeCIDRs",
            config.cidr_limit,
            destinations,
        ));
    }
    Ok(LoadedConfig {
        config,
        source: ConfigSource::Dir(
            dir.to_path_buf(),
            files.into_iter().map(|(p, _)| p).collect(),
        ),
        warnings,
    })
}

/// Merges per-file settings; returns the merge and warnings about conflicts between files.
pub fn merge_files(files: &[(PathBuf, FileSettings)]) -> (FileSettings, Vec<String>) {
    let mut merged = FileSettings::default();
    let mut warnings = Vec::new();
    let mut owners: Vec<(IpNet, &Path)> = Vec::new();
    let mut bool_owner: [Option<(bool, &Path)>; 2] = [None, None];
    for (path, settings) in files {
        if let Some(cidrs) = &settings.non_masquerade_cidrs {
            let list = merged.non_masquerade_cidrs.get_or_insert_with(Vec::new);
            for cidr in cidrs {
                for (other, other_path) in &owners {
                    if other_path != path
                        && other != cidr
                        && (other.contains(cidr) || cidr.contains(other))
                    {
                        let (inner, inner_path, outer, outer_path) = if other.contains(cidr) {
                            (cidr, path.as_path(), other, *other_path)
                        } else {
                            (other, *other_path, cidr, path.as_path())
                        };
                        warnings.push(format!(
                            "{} lists {inner}, which is inside {outer} from {}",
                            quote::path(inner_path),
                            quote::path(outer_path)
                        ));
                    }
                }
                if !list.contains(cidr) {
                    list.push(*cidr);
                    owners.push((*cidr, path));
                }
            }
        }
        for (slot, (name, value)) in [
            ("masqLinkLocal", settings.masq_link_local),
            ("masqLinkLocalIPv6", settings.masq_link_local_ipv6),
        ]
        .into_iter()
        .enumerate()
        {
            let Some(value) = value else { continue };
            if let Some((earlier, earlier_path)) = bool_owner[slot]
                && earlier != value
            {
                warnings.push(format!(
                    "{name} is {earlier} in {} but {value} in {}; using true",
                    quote::path(earlier_path),
                    quote::path(path)
                ));
            }
            bool_owner[slot].get_or_insert((value, path));
        }
        for (list, more) in [
            (
                &mut merged.force_masquerade_cidrs,
                &settings.force_masquerade_cidrs,
            ),
            (
                &mut merged.masquerade_source_cidrs,
                &settings.masquerade_source_cidrs,
            ),
        ] {
            if let Some(more) = more {
                let joined = list.get_or_insert_with(Vec::new);
                for cidr in more {
                    if !joined.contains(cidr) {
                        joined.push(*cidr);
                    }
                }
            }
        }
        if let Some(more) = &settings.output_interfaces {
            let joined = merged.output_interfaces.get_or_insert_with(Vec::new);
            for pattern in more {
                if !joined.contains(pattern) {
                    joined.push(pattern.clone());
                }
            }
        }
        // Two files naming different addresses are refused before merging (load_dir).
        merged.output_address = merged.output_address.or(settings.output_address);
        merged.output_address_ipv6 = merged.output_address_ipv6.or(settings.output_address_ipv6);
        merged.masq_link_local = or_option(merged.masq_link_local, settings.masq_link_local);
        merged.masq_link_local_ipv6 =
            or_option(merged.masq_link_local_ipv6, settings.masq_link_local_ipv6);
        merged.cidr_limit = max_option(merged.cidr_limit, settings.cidr_limit);
        merged.resync_interval = match (merged.resync_interval, settings.resync_interval) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    (merged, warnings)
}

fn or_option(a: Option<bool>, b: Option<bool>) -> Option<bool> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a || b),
        (a, b) => a.or(b),
    }
}

fn max_option(a: Option<usize>, b: Option<usize>) -> Option<usize> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Go's encoding/json rule: an exact match wins, otherwise a case-insensitive one.
fn match_key(key: &str) -> Option<&'static str> {
    KNOWN_KEYS
        .iter()
        .find(|k| **k == key)
        .or_else(|| KNOWN_KEYS.iter().find(|k| k.eq_ignore_ascii_case(key)))
        .copied()
}

fn closest_key(key: &str) -> &'static str {
    let lower = key.to_ascii_lowercase();
    KNOWN_KEYS
        .iter()
        .min_by_key(|k| {
            let known = k.to_ascii_lowercase();
            // A truncated or extended spelling ("resync", "nonMasqueradeCIDR") is the likeliest slip.
            let related = known.contains(&lower) || lower.contains(&known);
            (!related, edit_distance(&lower, &known))
        })
        .copied()
        .unwrap_or(KNOWN_KEYS[0])
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

/// Go's `net.ParseCIDR` plus upstream's alignment and family checks, with upstream's texts.
pub fn validate_cidr(text: &str, enable_ipv6: bool) -> Result<IpNet, String> {
    // Upstream prints the value quoted, then raw (Go's net.ParseError): the raw copy is
    // kept for ordinary values, and quoted too for one that could forge a log line.
    let unparsable = || {
        format!(
            "CIDR {} could not be parsed, invalid CIDR address: {}",
            quote::quoted(text),
            quote::raw_or_quoted(text)
        )
    };
    let slash = text
        .bytes()
        .position(|b| b == b'/')
        .ok_or_else(unparsable)?;
    let (addr_text, len_text) = (&text[..slash], &text[slash + 1..]);
    let addr: IpAddr = addr_text.parse().map_err(|_| unparsable())?;
    // Go's dtoi: decimal digits only, leading zeros allowed.
    if len_text.is_empty() || len_text.len() > 3 || !len_text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(unparsable());
    }
    let prefix_len: u8 = len_text.parse().map_err(|_| unparsable())?;
    let net = IpNet::new(addr, prefix_len).map_err(|_| unparsable())?;
    if net.network() != addr {
        return Err(format!(
            "CIDR {} is not aligned to a CIDR block, ip: \"{addr}\" network: \"{}\"",
            quote::quoted(text),
            net.trunc()
        ));
    }
    if let IpAddr::V6(v6) = addr {
        if let Some(v4) = v6.to_ipv4_mapped() {
            let v4_len = prefix_len.saturating_sub(96);
            return Err(format!(
                "CIDR {} is an IPv4-mapped IPv6 prefix, which iptables cannot load; write it as {v4}/{v4_len}",
                quote::quoted(text)
            ));
        }
        if !enable_ipv6 {
            return Err(format!(
                "ipv6 is not enabled, but ipv6 cidr {} provided. Enable ipv6 using --enable-ipv6 agent flag",
                quote::raw_or_quoted(text)
            ));
        }
    }
    Ok(net)
}

/// The fast path against the general one, for the agreement property and the fuzz
/// target: both must read every document the same way.
#[doc(hidden)]
pub mod agreement {
    use super::*;

    /// `parse` with the general path alone.
    pub fn parse_general_only(
        text: &str,
        file: &Path,
        options: ParseOptions,
    ) -> Result<LoadedConfig, ConfigError> {
        parse_with(text, file, options, parse_document_general)
    }

    /// Whether the fast path took `text` (it may leave any document to the general path).
    pub fn fast_path_reads(text: &str) -> bool {
        fast_path::parse(text, document::looks_like_json(text)).is_some()
    }

    /// Checks that both paths read `text` the same: the same tree (values and positions)
    /// where the fast path reads it, and the same config, warnings or error for each
    /// set of flags. `Err` describes the first difference.
    pub fn check(text: &str) -> Result<(), String> {
        let fast = read_document(text);
        let general = parse_document_general(text);
        if fast_path_reads(text) && fast != general {
            return Err(format!(
                "the trees differ for {text:?}:\nfast:    {fast:?}\ngeneral: {general:?}"
            ));
        }
        for options in [
            ParseOptions::default(),
            ParseOptions {
                enable_ipv6: true,
                nomasq_all_reserved_ranges: true,
            },
        ] {
            let file = Path::new("/etc/config/ip-masq-agent");
            let fast = parse(text, file, options);
            let general = parse_general_only(text, file, options);
            if fast != general {
                return Err(format!(
                    "the results differ for {text:?} with {options:?}:\nfast:    {fast:?}\ngeneral: {general:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
