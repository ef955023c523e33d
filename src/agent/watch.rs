//! Calls back when entries of interest in a directory change, and keeps doing so when the
//! directory itself is removed and made again (a volume remount, or `--config` inside
//! kubelet's `..data`, which every ConfigMap update replaces): the parent is watched for
//! the directory's name, and [`ConfigWatch::ensure_armed`] (called by the loop before each
//! read) re-arms a watch that was lost or that no longer watches the directory at the
//! path. It knows nothing of the agent: the caller says which names matter and what to do.
//!
//! [`WatchProof`] tells the loop whether the watch has seen nothing since a moment: armed
//! throughout, no change of interest, no lost events (a queue overflow), no error.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// Why the watched directory may hold new content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Entries of interest in the directory changed (their names).
    Entries(Vec<OsString>),
    /// The directory itself was removed, renamed or made again (its name in the parent):
    /// the watch on it may be gone; it is re-armed before the next read.
    Directory(OsString),
    /// The kernel's event queue overflowed: any change may have been lost.
    Overflow,
}

/// What an event means for the directory `dir` (absolute, as watched) and the entries of
/// interest in it; None when it cannot mean new content.
pub fn classify(
    event: &notify::Event,
    dir: &Path,
    is_of_interest: &impl Fn(&OsStr) -> bool,
) -> Option<Change> {
    use notify::event::ModifyKind;
    // notify reports an overflow (IN_Q_OVERFLOW) with the Rescan flag and no paths.
    if event.need_rescan() {
        return Some(Change::Overflow);
    }
    // Our own reads show up as access (or access-time) events; reacting to them would loop.
    if matches!(
        event.kind,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
    ) {
        return None;
    }
    if event.paths.iter().any(|path| path == dir) {
        return Some(Change::Directory(
            dir.file_name().unwrap_or(dir.as_os_str()).to_os_string(),
        ));
    }
    let names: Vec<OsString> = event
        .paths
        .iter()
        .filter(|path| path.parent() == Some(dir))
        .filter_map(|path| path.file_name())
        .filter(|name| is_of_interest(name))
        .map(OsStr::to_os_string)
        .collect();
    (!names.is_empty()).then_some(Change::Entries(names))
}

/// Shared between the watch's callback (on notify's thread) and the loop.
#[derive(Debug, Default)]
struct WatchState {
    /// False once the watch may have stopped watching the directory at the path; set
    /// before arming, so a loss reported while arming is never overwritten.
    armed: AtomicBool,
    /// Counts every change, overflow, loss and error the watch reported.
    changes: AtomicU64,
}

/// The watch's state at one moment: if a later proof is armed with the same count, the
/// watch has seen nothing of interest in between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchProof {
    pub armed: bool,
    pub changes: u64,
}

/// A directory's identity: its device and inode.
type DirId = (u64, u64);

pub fn dir_id(path: &Path) -> Option<DirId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The watch on the config's directory and on its parent.
pub struct ConfigWatch {
    watcher: RecommendedWatcher,
    dir: PathBuf,
    parent: Option<PathBuf>,
    state: Arc<WatchState>,
    /// The directory (and parent) the watch was armed on; None while not armed.
    armed_on: Option<(DirId, Option<DirId>)>,
    /// Whether the directory being missing has been logged (once, until it is back).
    missing_logged: bool,
}

impl ConfigWatch {
    /// Watches `dir` for changes to names of interest, calling `on_change`. Fails only
    /// when no watch can be made at all (no inotify instance); a directory that does not
    /// exist yet is watched once it does.
    pub fn start(
        dir: &Path,
        is_of_interest: impl Fn(&OsStr) -> bool + Send + 'static,
        on_change: impl Fn(Change) + Send + 'static,
    ) -> notify::Result<ConfigWatch> {
        let dir = std::path::absolute(dir).map_err(notify::Error::io)?;
        let parent = dir.parent().map(Path::to_path_buf);
        let state = Arc::new(WatchState::default());
        let seen = state.clone();
        let watched = dir.clone();
        let watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
            let change = match result {
                Ok(event) => classify(&event, &watched, &is_of_interest),
                Err(err) => {
                    // Events may have been lost with it: read again, re-arm.
                    tracing::warn!(
                        "config watch error: {err}; reading the config again and re-arming the watch"
                    );
                    seen.armed.store(false, Ordering::SeqCst);
                    Some(Change::Overflow)
                }
            };
            let Some(change) = change else { return };
            match &change {
                Change::Overflow => tracing::warn!(
                    "the config watch's event queue overflowed (inotify); reading the config again"
                ),
                Change::Directory(_) => {
                    seen.armed.store(false, Ordering::SeqCst);
                    tracing::debug!(
                        "config directory {} removed, renamed or made again; re-arming its watch",
                        watched.display()
                    );
                }
                Change::Entries(_) => {}
            }
            seen.changes.fetch_add(1, Ordering::SeqCst);
            on_change(change);
        })?;
        let mut watch = ConfigWatch {
            watcher,
            dir,
            parent,
            state,
            armed_on: None,
            missing_logged: false,
        };
        watch.arm();
        Ok(watch)
    }

    /// The directory watched (absolute).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn proof(&self) -> WatchProof {
        WatchProof {
            armed: self.state.armed.load(Ordering::SeqCst),
            changes: self.state.changes.load(Ordering::SeqCst),
        }
    }

    /// Re-arms the watch when it was lost, or when the directory (or its parent) at the
    /// path is another one than the watch was armed on (a remount makes no event). A
    /// stat or two when all is well. True if it re-armed the watch.
    pub fn ensure_armed(&mut self) -> bool {
        let now = (dir_id(&self.dir), self.parent.as_deref().and_then(dir_id));
        let intact = self.state.armed.load(Ordering::SeqCst)
            && self
                .armed_on
                .is_some_and(|(dir, parent)| now == (Some(dir), parent));
        if intact || now.0.is_none() && self.armed_on.is_none() && self.missing_logged {
            return false;
        }
        let was_armed = self.armed_on.is_some();
        if !self.arm() {
            return false;
        }
        if was_armed || self.missing_logged {
            tracing::info!(
                "watching the config directory again: {} (it was removed, replaced or remounted)",
                self.dir.display()
            );
        }
        self.missing_logged = false;
        true
    }

    /// (Re-)arms both watches; true if the directory is watched now.
    fn arm(&mut self) -> bool {
        let _ = self.watcher.unwatch(&self.dir);
        if let Some(parent) = &self.parent {
            let _ = self.watcher.unwatch(parent);
        }
        // Counted as a change: what happened while the watch was down is unknown.
        self.state.changes.fetch_add(1, Ordering::SeqCst);
        self.state.armed.store(true, Ordering::SeqCst);
        self.armed_on = None;
        let parent_id = match &self.parent {
            // The parent tells when the directory comes back; without it, the resync does.
            Some(parent) => match self.watcher.watch(parent, RecursiveMode::NonRecursive) {
                Ok(()) => dir_id(parent),
                Err(err) => {
                    tracing::debug!("cannot watch {}: {err}", parent.display());
                    None
                }
            },
            None => None,
        };
        let dir_id_before = dir_id(&self.dir);
        match (
            dir_id_before,
            self.watcher.watch(&self.dir, RecursiveMode::NonRecursive),
        ) {
            (Some(id), Ok(())) => {
                self.armed_on = Some((id, parent_id));
                true
            }
            (_, result) => {
                self.state.armed.store(false, Ordering::SeqCst);
                if !self.missing_logged {
                    let why = match result {
                        Err(err) if !matches!(err.kind, notify::ErrorKind::PathNotFound) => {
                            err.to_string()
                        }
                        _ => "it does not exist".into(),
                    };
                    tracing::warn!(
                        "cannot watch the config directory {} ({why}); changes are picked up when it is back{} and every resyncInterval",
                        self.dir.display(),
                        if parent_id.is_some() {
                            " (its parent is watched)"
                        } else {
                            ""
                        }
                    );
                    self.missing_logged = true;
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, MetadataKind, ModifyKind, RemoveKind, RenameMode};
    use std::time::{Duration, Instant};

    fn event(kind: EventKind, path: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from(path))
    }

    fn interest(name: &OsStr) -> bool {
        name == "ip-masq-agent" || name == "..data"
    }

    #[test]
    fn only_changes_to_names_of_interest_matter() {
        let dir = Path::new("/etc/config");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(
            classify(&event(rename, "/etc/config/..data"), dir, &interest),
            Some(Change::Entries(vec!["..data".into()]))
        );
        let create = EventKind::Create(CreateKind::File);
        assert!(classify(&event(create, "/etc/config/ip-masq-agent"), dir, &interest).is_some());
        assert_eq!(
            classify(&event(create, "/etc/config/agent.log"), dir, &interest),
            None
        );
        let access = EventKind::Access(AccessKind::Any);
        assert_eq!(
            classify(&event(access, "/etc/config/ip-masq-agent"), dir, &interest),
            None
        );
        let atime = EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime));
        assert_eq!(
            classify(&event(atime, "/etc/config/ip-masq-agent"), dir, &interest),
            None
        );
        // The parent's other entries, even with a name of interest, are not the config.
        assert_eq!(
            classify(&event(create, "/etc/ip-masq-agent"), dir, &interest),
            None
        );
    }

    /// Issue 16 #4: notify reports an inotify queue overflow as an event with the Rescan
    /// flag and no paths, which was dropped.
    #[test]
    fn regression_an_overflow_is_dropped() {
        let overflow = notify::Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(
            classify(&overflow, Path::new("/etc/config"), &interest),
            Some(Change::Overflow)
        );
    }

    #[test]
    fn the_directory_itself_going_or_coming_is_a_change() {
        let dir = Path::new("/etc/config");
        for kind in [
            EventKind::Remove(RemoveKind::Folder),
            EventKind::Create(CreateKind::Folder),
            EventKind::Modify(ModifyKind::Name(RenameMode::From)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
        ] {
            assert_eq!(
                classify(&event(kind, "/etc/config"), dir, &interest),
                Some(Change::Directory("config".into())),
                "{kind:?}"
            );
        }
        // `--config` inside `..data`: the swap of `..data` in the parent is the directory.
        let data = Path::new("/etc/config/..data");
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert_eq!(
            classify(&event(rename, "/etc/config/..data"), data, &interest),
            Some(Change::Directory("..data".into()))
        );
    }

    /// Whether a change of entries arrives within 5 s (other changes are skipped).
    fn entries_arrive(changes: &std::sync::mpsc::Receiver<Change>) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Ok(Change::Entries(_)) = changes.recv_timeout(left) {
                return true;
            }
        }
        false
    }

    fn wait_for(mut check: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if check() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// The real inotify: a directory removed and made again is watched again after
    /// `ensure_armed`, and the proof moves with every change.
    #[test]
    fn a_directory_made_again_is_watched_again() {
        let base = std::env::temp_dir().join(format!("ima-watch-{}", std::process::id()));
        let dir = base.join("config");
        std::fs::create_dir_all(&dir).unwrap();
        let (sender, changes) = std::sync::mpsc::channel();
        let mut watch = ConfigWatch::start(
            &dir,
            |name| name == "ip-masq-agent",
            move |change| {
                let _ = sender.send(change);
            },
        )
        .unwrap();
        let quiet = watch.proof();
        assert!(quiet.armed);
        assert!(!watch.ensure_armed(), "nothing to do");
        assert_eq!(watch.proof(), quiet);
        std::fs::write(dir.join("ip-masq-agent"), "a").unwrap();
        assert!(entries_arrive(&changes));
        assert_ne!(watch.proof().changes, quiet.changes);

        std::fs::remove_dir_all(&dir).unwrap();
        assert!(wait_for(|| !watch.proof().armed));
        std::fs::create_dir(&dir).unwrap();
        assert!(wait_for(|| changes
            .try_iter()
            .any(|c| c == Change::Directory("config".into()))));
        assert!(watch.ensure_armed());
        assert!(watch.proof().armed);
        std::fs::write(dir.join("ip-masq-agent"), "b").unwrap();
        assert!(
            entries_arrive(&changes),
            "the watch made again sees nothing"
        );
        drop(watch);
        let _ = std::fs::remove_dir_all(&base);
    }
}
