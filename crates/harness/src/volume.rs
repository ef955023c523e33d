//! A ConfigMap volume as kubelet's atomic writer lays it out.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::TempDir;

/// The ConfigMap key the agent reads (`<volume>/ip-masq-agent`).
pub const CONFIG_KEY: &str = "ip-masq-agent";

/// A ConfigMap volume laid out the way kubelet's atomic writer does it.
pub struct ConfigMapVolume {
    pub dir: TempDir,
    generation: u32,
    current: Option<String>,
}

impl ConfigMapVolume {
    pub fn new(content: &str) -> ConfigMapVolume {
        let mut volume = ConfigMapVolume {
            dir: TempDir::new("cm"),
            generation: 0,
            current: None,
        };
        volume.update(content);
        symlink(
            format!("..data/{CONFIG_KEY}"),
            volume.dir.path.join(CONFIG_KEY),
        )
        .expect("key symlink");
        volume
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path.join(CONFIG_KEY)
    }

    /// New timestamped directory, `..data_tmp` symlink renamed over `..data`, old directory removed.
    /// Returns the instant just before the rename.
    pub fn update(&mut self, content: &str) -> Instant {
        self.update_with(|dir| std::fs::write(dir.join(CONFIG_KEY), content).expect("write config"))
    }

    /// Like `update`, but `fill` decides what the new directory holds (nothing, a
    /// directory, a symlink loop, an unreadable file, ...). Returns the instant just
    /// before the rename, when the new content becomes visible.
    pub fn update_with(&mut self, fill: impl FnOnce(&Path)) -> Instant {
        self.generation += 1;
        let name = format!(
            "..2026_11_23_04_30_{:02}.{:09}",
            self.generation % 60,
            self.generation
        );
        let new_dir = self.dir.path.join(&name);
        std::fs::create_dir(&new_dir).expect("mkdir ts");
        fill(&new_dir);
        let tmp = self.dir.path.join("..data_tmp");
        symlink(&name, &tmp).expect("data_tmp symlink");
        let renamed = Instant::now();
        std::fs::rename(&tmp, self.dir.path.join("..data")).expect("swap ..data");
        if let Some(old) = self.current.replace(name) {
            std::fs::remove_dir_all(self.dir.path.join(old)).expect("remove old ts dir");
        }
        renamed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_swap_data_and_remove_the_old_directory() {
        let mut volume = ConfigMapVolume::new("first");
        assert_eq!(std::fs::read_to_string(volume.path()).unwrap(), "first");
        volume.update("second");
        assert_eq!(std::fs::read_to_string(volume.path()).unwrap(), "second");
        let mut entries: Vec<String> = std::fs::read_dir(&volume.dir.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            ["..2026_11_23_04_30_02.000000002", "..data", CONFIG_KEY]
        );
        volume.update_with(|_| {});
        assert!(!volume.path().exists());
    }
}
