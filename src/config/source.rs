//! Where the config comes from: one file (kubelet's ConfigMap key, `--config`) or a
//! directory whose `ip-masq*` files are merged (`--config-dir`); how to load it, which
//! directory to watch, which names in it mean the config may have changed, and what
//! identifies the files without reading them ([`Identity`]).

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::{
    ConfigError, ConfigSource, LoadedConfig, ParseCache, ParseOptions, load, load_cached, load_dir,
};

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

impl ConfigPath {
    /// Whether `loaded` (just returned by [`ConfigPath::load_cached`] with `cache`) came
    /// from nothing, as a writer that truncates before it writes leaves a file for a
    /// moment: no file, or a file that is empty or only whitespace; for a directory, a
    /// file of the set that is zero bytes, or one `previous` read with content that is
    /// gone (one file truncated changes the merge as much as all of them).
    pub fn is_blank(
        &self,
        loaded: &LoadedConfig,
        cache: &ParseCache,
        previous: Option<&LoadedConfig>,
    ) -> bool {
        match &loaded.source {
            ConfigSource::Missing(_) => true,
            // The text the cache holds is the text of that read (see load_cached).
            ConfigSource::File(path) => cache
                .last
                .as_ref()
                .is_some_and(|(file, _, text, _)| file == path && text.trim().is_empty()),
            ConfigSource::Dir(_, files) => {
                let empty = |file: &Path| std::fs::metadata(file).is_ok_and(|meta| meta.len() == 0);
                let gone = match previous.map(|p| &p.source) {
                    Some(ConfigSource::Dir(_, before)) => {
                        before.iter().any(|file| !files.contains(file))
                    }
                    _ => false,
                };
                gone || files.iter().any(|file| empty(file))
            }
        }
    }

    /// What identifies the bytes `load` would read, without reading them: for the file
    /// (each `ip-masq*` file of a directory) every symlink followed on the way (kubelet's
    /// key link and `..data`) and the file itself, each by device, inode, mode, size and
    /// change and modification times to the nanosecond; the directories passed through by
    /// device and inode; for `--config-dir` also the directory's times and the names in it.
    /// None when it cannot be told: a missing or dangling file, a symlink loop, an error.
    pub fn identity(&self) -> Option<Identity> {
        let mut identity = Identity::default();
        match self {
            ConfigPath::File(file) => follow(file, &mut identity.stamps)?,
            ConfigPath::Dir(dir) => {
                follow(dir, &mut identity.stamps)?;
                let mut names: Vec<OsString> = std::fs::read_dir(dir)
                    .ok()?
                    .map(|entry| entry.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .ok()?;
                names.retain(|name| name.to_string_lossy().starts_with(DIR_FILE_PREFIX));
                names.sort();
                for name in &names {
                    follow(&dir.join(name), &mut identity.stamps)?;
                }
                identity.names = names;
            }
        }
        Some(identity)
    }
}

/// See [`ConfigPath::identity`]. Two equal identities taken at different times mean the
/// same bytes, unless a change fell in the clock tick of the earlier one: see
/// [`Identity::settled_before`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    stamps: Vec<Stamp>,
    names: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    mode: u32,
    size: u64,
    /// Seconds and nanoseconds since the epoch.
    ctime: (i64, i64),
    mtime: (i64, i64),
    /// A directory passed through: only device and inode are kept (its times move with
    /// any entry in it).
    passed: bool,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata, passed: bool) -> Stamp {
        if passed {
            return Stamp {
                dev: meta.dev(),
                ino: meta.ino(),
                mode: 0,
                size: 0,
                ctime: (0, 0),
                mtime: (0, 0),
                passed,
            };
        }
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            mode: meta.mode(),
            size: meta.size(),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            passed,
        }
    }
}

/// How far a file's times must lie behind the moment it was read for them to prove the
/// bytes: the kernel stamps changes with a clock that advances in ticks (up to 10 ms),
/// and some filesystems keep whole seconds (two on FAT), so a write of the same size in
/// the same tick as the read leaves every stamp as it was.
pub const SAME_TICK_MARGIN: Duration = Duration::from_secs(2);

/// Symlinks followed before giving up, as the kernel's limit.
const MAX_SYMLINKS: usize = 40;

impl Identity {
    /// Whether every time in it lies more than [`SAME_TICK_MARGIN`] before `read_started`
    /// (taken before the identity and the read): only then does an unchanged identity
    /// later prove unchanged bytes (git's "racily clean" entries, the same problem).
    pub fn settled_before(&self, read_started: SystemTime) -> bool {
        let Some(limit) = read_started.checked_sub(SAME_TICK_MARGIN) else {
            return false;
        };
        let Ok(limit) = limit.duration_since(SystemTime::UNIX_EPOCH) else {
            return false;
        };
        let before = |(secs, nanos): (i64, i64)| {
            let (Ok(secs), Ok(nanos)) = (u64::try_from(secs), u32::try_from(nanos)) else {
                return false;
            };
            Duration::new(secs, nanos.min(999_999_999)) < limit
        };
        self.stamps
            .iter()
            .filter(|stamp| !stamp.passed)
            .all(|stamp| before(stamp.ctime) && before(stamp.mtime))
    }
}

/// Resolves `path` one component at a time as the kernel would, pushing a stamp for each
/// directory passed, each symlink followed and the final file. None when a component is
/// missing or unreadable, or after [`MAX_SYMLINKS`] symlinks.
fn follow(path: &Path, stamps: &mut Vec<Stamp>) -> Option<()> {
    let mut at = std::path::absolute(path).ok()?;
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_components(&at, &mut pending);
    at = PathBuf::from("/");
    let mut symlinks = 0;
    while let Some(name) = pending.pop_front() {
        if name == ".." {
            at.pop();
            continue;
        }
        let next = at.join(&name);
        let meta = std::fs::symlink_metadata(&next).ok()?;
        if meta.file_type().is_symlink() {
            symlinks += 1;
            if symlinks > MAX_SYMLINKS {
                return None;
            }
            stamps.push(Stamp::of(&meta, false));
            let target = std::fs::read_link(&next).ok()?;
            if target.is_absolute() {
                at = PathBuf::from("/");
            }
            let mut rest: VecDeque<OsString> = VecDeque::new();
            push_components(&target, &mut rest);
            rest.extend(pending);
            pending = rest;
        } else {
            stamps.push(Stamp::of(&meta, !pending.is_empty()));
            at = next;
        }
    }
    Some(())
}

/// The names and `..` of `path`, in order (the root and `.` say nothing).
fn push_components(path: &Path, out: &mut VecDeque<OsString>) {
    for component in path.components() {
        match component {
            Component::Normal(name) => out.push_back(name.to_os_string()),
            Component::ParentDir => out.push_back("..".into()),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
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
    use std::os::unix::fs::symlink;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ima-source-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Kubelet's layout: `key -> ..data/key`, `..data -> ..TIMESTAMP`, the file inside.
    fn kubelet_volume(dir: &Path, generation: u32, text: &str) {
        let stamp = format!("..gen{generation}");
        std::fs::create_dir(dir.join(&stamp)).unwrap();
        std::fs::write(dir.join(&stamp).join("ip-masq-agent"), text).unwrap();
        symlink(&stamp, dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        if !dir.join("ip-masq-agent").exists() {
            symlink("..data/ip-masq-agent", dir.join("ip-masq-agent")).unwrap();
        }
    }

    #[test]
    fn the_identity_follows_kubelets_links_and_moves_with_every_change() {
        let dir = temp_dir("identity");
        kubelet_volume(&dir, 1, "nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let source = ConfigPath::File(dir.join("ip-masq-agent"));
        let first = source.identity().expect("an identity");
        // The key link, `..data`, the file: three full stamps.
        assert_eq!(first.stamps.iter().filter(|s| !s.passed).count(), 3);
        assert_eq!(source.identity(), Some(first.clone()));
        // A ConfigMap update with the very same size and text: other inodes.
        kubelet_volume(&dir, 2, "nonMasqueradeCIDRs: [10.0.0.0/8]\n");
        let second = source.identity().unwrap();
        assert_ne!(second, first);
        // An edit in place behind the links (no event in the watched directory).
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(
            dir.join("..gen2").join("ip-masq-agent"),
            "nonMasqueradeCIDRs: [10.0.0.0/9]\n",
        )
        .unwrap();
        assert_ne!(source.identity().unwrap(), second);
        // Gone: no identity, only a read tells.
        std::fs::remove_file(dir.join("ip-masq-agent")).unwrap();
        assert_eq!(source.identity(), None);
        symlink("ip-masq-agent", dir.join("ip-masq-agent")).unwrap();
        assert_eq!(source.identity(), None, "a loop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directorys_identity_moves_with_its_files_and_names() {
        let dir = temp_dir("identity-dir");
        std::fs::write(dir.join("ip-masq-a"), "masqLinkLocal: true\n").unwrap();
        std::fs::write(dir.join("other"), "x").unwrap();
        let source = ConfigPath::Dir(dir.clone());
        let first = source.identity().unwrap();
        assert_eq!(first.names, [OsString::from("ip-masq-a")]);
        std::fs::write(dir.join("other"), "y").unwrap();
        // Another file's contents are not the config's (the directory's times do not
        // change on a write to a file in it).
        assert_eq!(source.identity(), Some(first.clone()));
        std::fs::write(dir.join("ip-masq-b"), "").unwrap();
        assert_ne!(source.identity(), Some(first));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn blank_means_missing_empty_or_whitespace() {
        let dir = temp_dir("blank");
        let file = dir.join("ip-masq-agent");
        let source = ConfigPath::File(file.clone());
        let options = ParseOptions::default();
        let mut cache = ParseCache::default();
        let blank = |text: Option<&str>, cache: &mut ParseCache| {
            match text {
                Some(text) => std::fs::write(&file, text).unwrap(),
                None => {
                    let _ = std::fs::remove_file(&file);
                }
            }
            let loaded = source.load_cached(options, cache).unwrap();
            source.is_blank(&loaded, cache, None)
        };
        assert!(blank(None, &mut cache));
        assert!(blank(Some(""), &mut cache));
        assert!(blank(Some(" \n\n"), &mut cache));
        assert!(!blank(Some("resyncInterval: 60s\n"), &mut cache));
        assert!(!blank(Some("# the defaults\n"), &mut cache));
        assert!(!blank(Some("{}"), &mut cache));
        let merged = ConfigPath::Dir(dir.clone());
        let loaded = merged.load(options).unwrap();
        assert!(!merged.is_blank(&loaded, &cache, None), "a file of 3 bytes");
        std::fs::write(&file, "").unwrap();
        let truncated = merged.load(options).unwrap();
        assert!(merged.is_blank(&truncated, &cache, Some(&loaded)));
        // Found by the hostile review: one file of a set truncated (or removed) beside
        // another that still holds a config counts too: the merge changes as much.
        std::fs::write(&file, "resyncInterval: 60s\n").unwrap();
        std::fs::write(dir.join("ip-masq-other"), "masqLinkLocal: true\n").unwrap();
        let both = merged.load(options).unwrap();
        std::fs::write(&file, "").unwrap();
        let one_empty = merged.load(options).unwrap();
        assert!(merged.is_blank(&one_empty, &cache, Some(&both)));
        std::fs::remove_file(&file).unwrap();
        let one_gone = merged.load(options).unwrap();
        assert!(merged.is_blank(&one_gone, &cache, Some(&both)));
        assert!(!merged.is_blank(&one_gone, &cache, Some(&one_gone)));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_identity_proves_nothing_until_its_times_lie_a_margin_behind_the_read() {
        let dir = temp_dir("settled");
        std::fs::write(dir.join("ip-masq-agent"), "").unwrap();
        let identity = ConfigPath::File(dir.join("ip-masq-agent"))
            .identity()
            .unwrap();
        let now = SystemTime::now();
        assert!(!identity.settled_before(now), "written just now");
        assert!(!identity.settled_before(now + SAME_TICK_MARGIN - Duration::from_millis(50)));
        assert!(identity.settled_before(now + SAME_TICK_MARGIN + Duration::from_millis(50)));
        assert!(!identity.settled_before(SystemTime::UNIX_EPOCH));
        let _ = std::fs::remove_dir_all(&dir);
    }

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
