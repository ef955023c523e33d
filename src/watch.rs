//! Wakes the agent when the config directory changes. Kubelet updates a ConfigMap
//! volume by renaming a new `..data` symlink into place, so a watch on the file itself
//! (an inode that is then replaced) would miss updates; the directory sees them all.

use std::path::Path;
use std::sync::mpsc::Sender;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::agent::Event;

/// Which directory entries matter: the config file (or, for `--config-dir`, every
/// `ip-masq*` file) and kubelet's `..data` swap. Anything else in the directory — a log
/// file next to the config, an editor's swap file — must not cause reloads.
#[derive(Clone, Debug)]
pub enum Interest {
    File(std::ffi::OsString),
    Prefix(&'static str),
}

impl Interest {
    pub fn matches(&self, name: &std::ffi::OsStr) -> bool {
        if name == "..data" || name == "..data_tmp" {
            return true;
        }
        match self {
            Interest::File(file) => name == file.as_os_str(),
            Interest::Prefix(prefix) => name.to_string_lossy().starts_with(prefix),
        }
    }
}

/// True for events that can mean new config content.
pub fn is_relevant(event: &notify::Event, interest: &Interest) -> bool {
    use notify::event::ModifyKind;
    // Our own reads show up as access (or access-time) events; reacting to them would loop.
    if matches!(
        event.kind,
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
    ) {
        return false;
    }
    event
        .paths
        .iter()
        .any(|path| path.file_name().is_some_and(|name| interest.matches(name)))
}

/// Sends `Event::Reload` for relevant changes in `dir`; keep the watcher alive to keep watching.
pub fn watch_config_dir(
    dir: &Path,
    interest: Interest,
    sender: Sender<Event>,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            Ok(event) if is_relevant(&event, &interest) => {
                let _ = sender.send(Event::Reload("config directory changed"));
            }
            Ok(_) => {}
            Err(err) => tracing::debug!("config watch error: {err}"),
        })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{AccessKind, CreateKind, MetadataKind, ModifyKind, RenameMode};
    use std::path::PathBuf;

    fn event(kind: EventKind, name: &str) -> notify::Event {
        notify::Event::new(kind).add_path(PathBuf::from("/etc/config").join(name))
    }

    #[test]
    fn only_the_config_and_the_data_swap_matter() {
        let interest = Interest::File("ip-masq-agent".into());
        let rename = EventKind::Modify(ModifyKind::Name(RenameMode::To));
        assert!(is_relevant(&event(rename, "..data"), &interest));
        assert!(is_relevant(
            &event(EventKind::Create(CreateKind::File), "ip-masq-agent"),
            &interest
        ));
        assert!(!is_relevant(
            &event(EventKind::Create(CreateKind::File), "agent.log"),
            &interest
        ));
        assert!(!is_relevant(
            &event(EventKind::Modify(ModifyKind::Any), ".ip-masq-agent.swp"),
            &interest
        ));
        assert!(!is_relevant(
            &event(EventKind::Access(AccessKind::Any), "ip-masq-agent"),
            &interest
        ));
        let atime = EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime));
        assert!(!is_relevant(&event(atime, "ip-masq-agent"), &interest));
        let dir = Interest::Prefix("ip-masq");
        assert!(is_relevant(
            &event(EventKind::Create(CreateKind::File), "ip-masq-extra"),
            &dir
        ));
        assert!(!is_relevant(
            &event(EventKind::Create(CreateKind::File), "other"),
            &dir
        ));
    }
}
