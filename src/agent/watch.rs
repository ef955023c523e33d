//! Calls back when entries of interest in a directory change. It knows nothing of the
//! agent: the caller says which names matter and what to do.

use std::ffi::OsStr;
use std::path::Path;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};

/// True for events on a name of interest that can mean new content.
pub fn is_relevant(event: &notify::Event, is_of_interest: &impl Fn(&OsStr) -> bool) -> bool {
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
        .any(|path| path.file_name().is_some_and(is_of_interest))
}

/// Calls `on_change` with the names of interest for each relevant change in `dir`; keep
/// the watcher alive to keep watching.
pub fn watch_dir(
    dir: &Path,
    is_of_interest: impl Fn(&OsStr) -> bool + Send + 'static,
    on_change: impl Fn(&[&OsStr]) + Send + 'static,
) -> notify::Result<RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |result: notify::Result<notify::Event>| match result {
            Ok(event) if is_relevant(&event, &is_of_interest) => {
                let names: Vec<&OsStr> = event
                    .paths
                    .iter()
                    .filter_map(|path| path.file_name())
                    .filter(|name| is_of_interest(name))
                    .collect();
                on_change(&names);
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
    fn only_changes_to_names_of_interest_matter() {
        let interest = |name: &OsStr| name == "ip-masq-agent" || name == "..data";
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
            &event(EventKind::Access(AccessKind::Any), "ip-masq-agent"),
            &interest
        ));
        let atime = EventKind::Modify(ModifyKind::Metadata(MetadataKind::AccessTime));
        assert!(!is_relevant(&event(atime, "ip-masq-agent"), &interest));
    }
}
