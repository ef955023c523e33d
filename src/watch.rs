//! Wakes the agent when the config directory changes. Kubelet updates a ConfigMap
//! volume by renaming a new `..data` symlink into place, so a watch on the file itself
//! (an inode that is then replaced) would miss updates; the directory sees them all.

use std::path::Path;
use std::sync::mpsc::Sender;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

use crate::agent::Event;

/// Sends `Event::Reload` for every change in `dir`; keep the watcher alive to keep watching.
pub fn watch_config_dir(dir: &Path, sender: Sender<Event>) -> notify::Result<RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |result: notify::Result<notify::Event>| {
        match result {
            // Our own reads show up as access events; reacting to them would loop.
            Ok(event) if matches!(event.kind, EventKind::Access(_)) => {}
            Ok(_) => {
                let _ = sender.send(Event::Reload("config directory changed"));
            }
            Err(err) => tracing::debug!("config watch error: {err}"),
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}
