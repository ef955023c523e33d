//! Where the config comes from: one file (kubelet's ConfigMap key, `--config`) or a
//! directory whose `ip-masq*` files are merged (`--config-dir`); how to load it, which
//! directory to watch, and which names in it mean the config may have changed.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use super::{ConfigError, LoadedConfig, ParseCache, ParseOptions, load, load_cached, load_dir};

/// The prefix of the files `--config-dir` merges (Azure ip-masq-agent-v2's layout).
pub const DIR_FILE_PREFIX: &str = "ip-masq";

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigPath {
    File(PathBuf),
    Dir(PathBuf),
}

impl ConfigPath {
    pub fn load(&self, options: ParseOptions) -> Result<LoadedConfig, ConfigError> {
        match self {
            ConfigPath::File(file) => load(file, options),
            ConfigPath::Dir(dir) => load_dir(dir, options),
        }
    }

    /// `load`, skipping the parse when a file's text is what was parsed last time.
    pub fn load_cached(
        &self,
        options: ParseOptions,
        cache: &mut ParseCache,
    ) -> Result<LoadedConfig, ConfigError> {
        match self {
            ConfigPath::File(file) => load_cached(file, options, cache),
            ConfigPath::Dir(dir) => load_dir(dir, options),
        }
    }

    pub fn path(&self) -> &Path {
        match self {
            ConfigPath::File(path) | ConfigPath::Dir(path) => path,
        }
    }

    /// The directory whose changes mean the config may have changed. Kubelet updates a
    /// ConfigMap volume by renaming a new `..data` symlink into place, so a watch on the
    /// file itself (an inode that is then replaced) would miss updates.
    pub fn watched_dir(&self) -> PathBuf {
        match self {
            ConfigPath::Dir(dir) => dir.clone(),
            ConfigPath::File(file) => file
                .parent()
                .filter(|dir| !dir.as_os_str().is_empty())
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        }
    }

    /// Whether a change to the entry `name` of the watched directory can mean new config:
    /// the config file (for a directory, every `ip-masq*` file) and kubelet's `..data`
    /// swap (`..data_tmp` announces it). Anything else there (a log next to the config,
    /// an editor's swap file) must not cause reloads.
    pub fn is_of_interest(&self, name: &OsStr) -> bool {
        if is_commit(name) || name == "..data_tmp" {
            return true;
        }
        match self {
            ConfigPath::File(file) => match file.file_name() {
                Some(own) => name == own,
                None => name.to_string_lossy().starts_with(DIR_FILE_PREFIX),
            },
            ConfigPath::Dir(_) => name.to_string_lossy().starts_with(DIR_FILE_PREFIX),
        }
    }
}

/// Kubelet's atomic writer renames `..data_tmp` over `..data`: that rename is the single
/// commit of a ConfigMap update, after which every key reads the new content.
pub fn is_commit(name: &OsStr) -> bool {
    name == "..data"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_config_and_the_data_swap_are_of_interest() {
        let file = ConfigPath::File("/etc/config/ip-masq-agent".into());
        assert_eq!(file.watched_dir(), PathBuf::from("/etc/config"));
        for name in ["ip-masq-agent", "..data", "..data_tmp"] {
            assert!(file.is_of_interest(OsStr::new(name)), "{name}");
        }
        assert!(is_commit(OsStr::new("..data")) && !is_commit(OsStr::new("..data_tmp")));
        for name in ["agent.log", ".ip-masq-agent.swp", "ip-masq-extra"] {
            assert!(!file.is_of_interest(OsStr::new(name)), "{name}");
        }
        let dir = ConfigPath::Dir("/etc/config".into());
        assert_eq!(dir.watched_dir(), PathBuf::from("/etc/config"));
        assert!(dir.is_of_interest(OsStr::new("ip-masq-extra")));
        assert!(!dir.is_of_interest(OsStr::new("other")));
        assert_eq!(
            ConfigPath::File("ip-masq-agent".into()).watched_dir(),
            PathBuf::from(".")
        );
    }
}
