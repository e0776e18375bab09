//! [`SyncDir`]: the files of one prefix in one directory, and the manifest of those it owns.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use super::SyncError;
use super::paths::{ancestors, is_plain, relative_path};
use super::rootdir::RootDir;
use super::stats::{SyncStats, bump};

/// Name of the manifest file kept in the mirrored directory.
pub const MANIFEST: &str = ".chorus-sync-manifest";

/// What to do with owned files whose key a snapshot does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absent {
    /// Remove them: the snapshot is the cluster's state.
    Remove,
    /// Keep them: the node may not have heard of the key yet.
    Keep,
}

/// The mirror of one prefix into one directory.
#[derive(Debug)]
pub struct SyncDir {
    pub(super) root: RootDir,
    pub(super) prefix: String,
    /// The value of every key under the prefix that can be a file, by relative path.
    wanted: BTreeMap<String, Bytes>,
    /// The files this mirror wrote and has not removed (the manifest).
    owned: BTreeSet<String>,
    pub(super) stats: Arc<SyncStats>,
}

impl SyncDir {
    /// Opens (creating when needed) the directory, reads its manifest and removes temporary
    /// files a crash left behind.
    ///
    /// # Errors
    /// [`SyncError::Io`] when the directory cannot be created or the manifest read.
    pub fn open(
        root: impl Into<PathBuf>,
        prefix: impl Into<String>,
        stats: Arc<SyncStats>,
    ) -> Result<Self, SyncError> {
        let path = root.into();
        let root = RootDir::open(&path).map_err(|source| SyncError::Io {
            path: path.clone(),
            source,
        })?;
        let owned: BTreeSet<String> = match root.read(MANIFEST) {
            Ok(text) => String::from_utf8_lossy(&text.unwrap_or_default())
                .lines()
                // Only plain relative paths are trusted from the manifest.
                .filter(|l| is_plain(l))
                .map(str::to_owned)
                .collect(),
            Err(source) => {
                return Err(SyncError::Io {
                    path: root.display(MANIFEST),
                    source,
                });
            }
        };
        let dirs: BTreeSet<&str> = owned.iter().flat_map(|rel| ancestors(rel)).collect();
        let stale = root.remove_stale_temporaries(dirs);
        if stale > 0 {
            tracing::info!(dir = %path.display(), stale, "sync-dir: removed temporary files left by a crash");
        }
        Ok(Self {
            root,
            prefix: prefix.into(),
            wanted: BTreeMap::new(),
            owned,
            stats,
        })
    }

    /// Whether some wanted key lies below `rel` (so `rel` is a directory).
    fn has_descendant(&self, rel: &str) -> bool {
        let below = format!("{rel}/");
        self.wanted
            .range(below.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&below))
    }

    /// Whether some owned file lies below `rel`.
    fn owns_below(&self, rel: &str) -> bool {
        let below = format!("{rel}/");
        self.owned
            .range(below.clone()..)
            .next()
            .is_some_and(|k| k.starts_with(&below))
    }

    /// The value `rel`'s file must hold, or `None` when `rel` must not be a file.
    fn file_value(&self, rel: &str) -> Option<&Bytes> {
        self.wanted.get(rel).filter(|_| !self.has_descendant(rel))
    }

    fn failed(&self, rel: &str, what: &str, e: &std::io::Error) {
        bump(&self.stats.errors);
        tracing::warn!(path = %self.root.display(rel).display(), error = %e, "sync-dir: cannot {what}");
    }

    /// Removes the owned file `rel`; whether one was removed.
    fn remove_owned(&mut self, rel: &str) -> bool {
        match self.root.remove(rel) {
            Ok(removed) => {
                self.owned.remove(rel);
                if removed {
                    bump(&self.stats.files_removed);
                }
                removed
            }
            Err(e) => {
                self.failed(rel, "remove", &e);
                // Something else is there now (a directory, a symlink in the way): not ours.
                self.owned.remove(rel);
                false
            }
        }
    }

    /// Makes the file `rel` hold `value` unless it already does; whether it was written.
    fn write_owned(&mut self, rel: &str, value: &Bytes) -> bool {
        if self.owned.contains(rel) && self.root.holds(rel, value).unwrap_or(false) {
            return false;
        }
        match self.root.write(rel, value) {
            Ok(()) => {
                self.owned.insert(rel.to_owned());
                bump(&self.stats.files_written);
                true
            }
            Err(e) => {
                self.failed(rel, "write", &e);
                false
            }
        }
    }

    /// Replaces the whole state with `entries` and makes the files match it; owned files of
    /// absent keys are removed or kept as `absent` says. Returns how many files changed.
    ///
    /// # Errors
    /// [`SyncError::Io`] when the manifest cannot be written.
    pub fn reconcile(
        &mut self,
        entries: impl IntoIterator<Item = (String, Bytes)>,
        absent: Absent,
    ) -> Result<usize, SyncError> {
        self.wanted.clear();
        for (key, value) in entries {
            match relative_path(&self.prefix, &key) {
                Ok(Some(rel)) => {
                    self.wanted.insert(rel, value);
                }
                Ok(None) => {}
                Err(e) => {
                    bump(&self.stats.bad_keys);
                    tracing::warn!(error = %e, "sync-dir: skipped");
                }
            }
        }
        let mut changed = 0;
        let mut kept = 0;
        for rel in self.owned.clone() {
            if self.file_value(&rel).is_some() {
                continue;
            }
            // A key absent from the state may be one the node has not heard of yet; a file
            // that is in the way of a wanted one goes in any case.
            let in_the_way = self.wanted.contains_key(&rel)
                || self.has_descendant(&rel)
                || ancestors(&rel).any(|a| self.file_value(a).is_some());
            if absent == Absent::Keep && !in_the_way {
                kept += 1;
                continue;
            }
            if self.remove_owned(&rel) {
                changed += 1;
            }
        }
        let files: Vec<(String, Bytes)> = self
            .wanted
            .iter()
            .filter(|(rel, _)| !self.has_descendant(rel))
            .map(|(rel, v)| (rel.clone(), v.clone()))
            .collect();
        for (rel, value) in files {
            if self.write_owned(&rel, &value) {
                changed += 1;
            }
        }
        self.stats.kept_unconfirmed.store(kept, Ordering::Relaxed);
        self.count_shadowed();
        if kept > 0 {
            tracing::warn!(
                dir = %self.root.path().display(),
                kept,
                "sync-dir: not in sync with a peer yet; kept files whose keys this node does not hold"
            );
        }
        self.save_manifest()?;
        Ok(changed)
    }

    fn count_shadowed(&self) {
        let shadowed = self
            .wanted
            .keys()
            .filter(|rel| self.has_descendant(rel))
            .count();
        self.stats
            .shadowed_keys
            .store(shadowed as u64, Ordering::Relaxed);
    }

    /// Applies one change; returns whether a file changed on disk.
    ///
    /// # Errors
    /// [`SyncError::BadPath`] when the key is not a safe name; [`SyncError::Io`] when the
    /// manifest cannot be written (failed file operations are logged and counted).
    pub fn apply(&mut self, key: &str, value: Option<&Bytes>) -> Result<bool, SyncError> {
        let rel = match relative_path(&self.prefix, key) {
            Ok(Some(rel)) => rel,
            Ok(None) => return Ok(false),
            Err(e) => {
                bump(&self.stats.bad_keys);
                return Err(e);
            }
        };
        match value {
            Some(v) => self.wanted.insert(rel.clone(), v.clone()),
            None => self.wanted.remove(&rel),
        };
        // Whether a path is a file depends on which keys exist at or below it, so only `rel`
        // and its ancestors can change. Removals first (shallowest first), so that a file
        // gives way to a directory, then the one path of the chain that must be a file.
        let chain: Vec<String> = ancestors(&rel)
            .map(str::to_owned)
            .chain([rel.clone()])
            .collect();
        let mut changed = false;
        for path in &chain {
            if self.owned.contains(path) && self.file_value(path).is_none() {
                changed |= self.remove_owned(path);
            }
        }
        if self.file_value(&rel).is_some() && self.owns_below(&rel) {
            // Files kept below a path that is now a file (their keys were absent at start).
            let below = format!("{rel}/");
            let stale: Vec<String> = self
                .owned
                .range(below.clone()..)
                .take_while(|k| k.starts_with(&below))
                .cloned()
                .collect();
            for path in stale {
                changed |= self.remove_owned(&path);
            }
        }
        for path in chain.iter().rev() {
            if let Some(value) = self.file_value(path).cloned() {
                changed |= self.write_owned(path, &value);
            }
        }
        self.count_shadowed();
        if changed {
            self.save_manifest()?;
        }
        Ok(changed)
    }

    fn save_manifest(&self) -> Result<(), SyncError> {
        let mut text = String::new();
        for rel in &self.owned {
            text.push_str(rel);
            text.push('\n');
        }
        self.root
            .write(MANIFEST, text.as_bytes())
            .map_err(|source| {
                bump(&self.stats.errors);
                SyncError::Io {
                    path: self.root.display(MANIFEST),
                    source,
                }
            })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::super::test_support::{figure, open, put, read};
    use super::*;

    /// Every file (with its content) and directory under `root`, manifest excluded.
    fn tree(root: &Path) -> BTreeMap<String, Option<String>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<String>>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let rel = path
                    .strip_prefix(root)
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .to_owned();
                if rel == MANIFEST {
                    continue;
                }
                if path.is_dir() {
                    out.insert(rel, None);
                    walk(root, &path, out);
                } else {
                    out.insert(rel, Some(std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    #[test]
    fn apply_writes_changes_and_removes() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mut dir = open(tmp.path());
        assert!(put(&mut dir, "app/a/b.conf", "one"));
        assert_eq!(read(tmp.path(), "a/b.conf").as_deref(), Some("one"));
        assert!(
            !put(&mut dir, "app/a/b.conf", "one"),
            "same value is no change"
        );
        assert!(put(&mut dir, "app/a/b.conf", "two"));
        assert_eq!(read(tmp.path(), "a/b.conf").as_deref(), Some("two"));
        assert!(!put(&mut dir, "other/x", "x"));
        // A name of its own, so an unrelated file next to the temp dir cannot fail the check.
        let escape = format!(
            "{}-escape",
            tmp.path().file_name().unwrap().to_string_lossy()
        );
        assert!(
            dir.apply(&format!("app/../{escape}"), Some(&Bytes::from("x")))
                .is_err()
        );
        assert!(!tmp.path().parent().unwrap().join(&escape).exists());
        assert!(dir.apply("app/a/b.conf", None).unwrap());
        assert!(read(tmp.path(), "a/b.conf").is_none());
        assert!(
            !tmp.path().join("a").exists(),
            "empty parent directory pruned"
        );
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![MANIFEST.to_string()]);
    }

    #[test]
    fn reconcile_removes_only_stale_owned_files_and_only_when_told() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        std::fs::write(tmp.path().join("user.txt"), "mine").unwrap();
        {
            let mut dir = open(tmp.path());
            put(&mut dir, "app/keep", "k");
            put(&mut dir, "app/stale", "s");
        }
        let state = || {
            vec![
                ("app/keep".to_string(), Bytes::from_static(b"k2")),
                ("app/new".to_string(), Bytes::from_static(b"n")),
            ]
        };
        // Restart unconfirmed: the state is written, the owned file it lacks is kept.
        let stats = Arc::new(SyncStats::default());
        let mut dir = SyncDir::open(tmp.path(), "app/", Arc::clone(&stats)).unwrap();
        assert_eq!(dir.reconcile(state(), Absent::Keep).unwrap(), 2);
        assert_eq!(read(tmp.path(), "stale").as_deref(), Some("s"));
        assert_eq!(figure(&stats, "kept_unconfirmed"), 1);
        // Confirmed: now it goes.
        assert_eq!(dir.reconcile(state(), Absent::Remove).unwrap(), 1);
        assert_eq!(read(tmp.path(), "keep").as_deref(), Some("k2"));
        assert_eq!(read(tmp.path(), "new").as_deref(), Some("n"));
        assert!(read(tmp.path(), "stale").is_none());
        assert_eq!(read(tmp.path(), "user.txt").as_deref(), Some("mine"));
        assert_eq!(figure(&stats, "kept_unconfirmed"), 0);
        let owned: Vec<&str> = dir.owned.iter().map(String::as_str).collect();
        assert_eq!(owned, ["keep", "new"]);
        // A manifest naming a path outside the directory is not trusted.
        std::fs::write(
            tmp.path().join(MANIFEST),
            "../user.txt\n/etc/passwd\nkeep\n",
        )
        .unwrap();
        let dir = open(tmp.path());
        assert_eq!(dir.owned.iter().collect::<Vec<_>>(), ["keep"]);
    }

    /// What the directory must hold for a set of keys: the keys with nothing below them.
    fn expected(keys: &BTreeMap<&str, &str>) -> BTreeMap<String, Option<String>> {
        let mut out = BTreeMap::new();
        for (key, value) in keys {
            let deeper = keys.keys().any(|k| k.starts_with(&format!("{key}/")));
            if !deeper {
                out.insert((*key).to_owned(), Some((*value).to_owned()));
            }
            for dir in ancestors(key) {
                out.insert(dir.to_owned(), None);
            }
        }
        out
    }

    fn permutations(items: &[&'static str]) -> Vec<Vec<&'static str>> {
        if items.len() <= 1 {
            return vec![items.to_vec()];
        }
        let mut out = Vec::new();
        for (i, first) in items.iter().enumerate() {
            let mut rest = items.to_vec();
            rest.remove(i);
            for mut tail in permutations(&rest) {
                tail.insert(0, first);
                out.push(tail);
            }
        }
        out
    }

    #[test]
    fn a_key_that_is_also_a_prefix_gives_the_same_files_in_any_order() {
        let keys = ["a", "a/b", "a/b/c", "d"];
        let value = |k: &str| format!("value of {k}");
        for order in permutations(&keys) {
            let tmp = chorus_testkit::temp_dir("sync-test");
            let mut dir = open(tmp.path());
            let mut present = BTreeMap::new();
            let values: Vec<String> = keys.iter().map(|k| value(k)).collect();
            for key in &order {
                put(&mut dir, &format!("app/{key}"), &value(key));
                let i = keys.iter().position(|k| k == key).unwrap();
                present.insert(*key, values[i].as_str());
                assert_eq!(
                    tree(tmp.path()),
                    expected(&present),
                    "after putting {order:?} up to {key}"
                );
            }
            // The deepest key wins; the others wait.
            assert_eq!(read(tmp.path(), "a/b/c"), Some(value("a/b/c")));
            assert_eq!(figure(&dir.stats, "shadowed_keys"), 2);
            // Deleting in the reverse order brings each shadowed key back as a file.
            for key in order.iter().rev() {
                dir.apply(&format!("app/{key}"), None).unwrap();
                present.remove(key);
                assert_eq!(
                    tree(tmp.path()),
                    expected(&present),
                    "after deleting {key} ({order:?})"
                );
            }
            assert!(tree(tmp.path()).is_empty());
        }
        // Every deletion order after one insertion order, and a fresh reconcile agrees.
        for order in permutations(&keys) {
            let tmp = chorus_testkit::temp_dir("sync-test");
            let mut dir = open(tmp.path());
            let values: Vec<String> = keys.iter().map(|k| value(k)).collect();
            let mut present: BTreeMap<&str, &str> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            for key in keys {
                put(&mut dir, &format!("app/{key}"), &value(key));
            }
            for key in &order {
                dir.apply(&format!("app/{key}"), None).unwrap();
                present.remove(key);
                assert_eq!(
                    tree(tmp.path()),
                    expected(&present),
                    "after deleting {order:?} up to {key}"
                );
                let fresh = chorus_testkit::temp_dir("sync-test");
                let entries = present
                    .iter()
                    .map(|(k, v)| (format!("app/{k}"), Bytes::from((*v).to_owned())));
                open(fresh.path())
                    .reconcile(entries, Absent::Remove)
                    .unwrap();
                assert_eq!(
                    tree(fresh.path()),
                    tree(tmp.path()),
                    "reconcile disagrees ({order:?})"
                );
            }
        }
    }

    #[test]
    fn symlinks_planted_in_the_directory_are_never_followed() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let outside = chorus_testkit::temp_dir("sync-test");
        std::fs::write(outside.path().join("secret"), "untouched").unwrap();
        let mirror = tmp.path().join("mirror");
        let stats = Arc::new(SyncStats::default());
        let mut dir = SyncDir::open(&mirror, "app/", Arc::clone(&stats)).unwrap();
        // A directory replaced by a link to elsewhere.
        std::os::unix::fs::symlink(outside.path(), mirror.join("evil")).unwrap();
        assert!(!put(&mut dir, "app/evil/planted", "x"));
        assert!(
            !outside.path().join("planted").exists(),
            "wrote through a symlinked directory"
        );
        // A file replaced by a link to a file elsewhere: neither written nor read through.
        std::os::unix::fs::symlink(outside.path().join("secret"), mirror.join("f")).unwrap();
        assert!(!put(&mut dir, "app/f", "overwritten"));
        assert_eq!(read(outside.path(), "secret").as_deref(), Some("untouched"));
        assert_eq!(figure(&stats, "errors"), 2);
        // An owned file whose directory is swapped for a link: the removal stays inside.
        assert!(put(&mut dir, "app/d/secret", "mine"));
        std::fs::remove_dir_all(mirror.join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), mirror.join("d")).unwrap();
        dir.apply("app/d/secret", None).unwrap();
        assert_eq!(read(outside.path(), "secret").as_deref(), Some("untouched"));
        assert!(
            std::fs::symlink_metadata(mirror.join("d"))
                .unwrap()
                .is_symlink()
        );
        // The manifest itself is not read through a link either.
        drop(dir);
        std::fs::remove_file(mirror.join(MANIFEST)).unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), mirror.join(MANIFEST)).unwrap();
        assert!(SyncDir::open(&mirror, "app/", Arc::default()).is_err());
    }

    #[test]
    fn a_rewrite_keeps_the_file_mode() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mut dir = open(tmp.path());
        put(&mut dir, "app/conf", "one");
        let path = tmp.path().join("conf");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        put(&mut dir, "app/conf", "two");
        assert_eq!(read(tmp.path(), "conf").as_deref(), Some("two"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640);
    }

    #[test]
    fn a_255_byte_name_is_written() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mut dir = open(tmp.path());
        let name = "n".repeat(255);
        assert!(put(&mut dir, &format!("app/sub/{name}"), "long"));
        assert_eq!(
            read(tmp.path(), &format!("sub/{name}")).as_deref(),
            Some("long")
        );
        // The manifest records it and a restart reads it back.
        assert!(open(tmp.path()).owned.contains(&format!("sub/{name}")));
    }

    #[test]
    fn temporaries_left_by_a_crash_are_removed_at_open() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mut dir = open(tmp.path());
        put(&mut dir, "app/sub/x", "x");
        drop(dir);
        std::fs::write(tmp.path().join(".chorus-tmp-0123456789abcdef"), "half").unwrap();
        std::fs::write(tmp.path().join("sub/.chorus-tmp-0123456789abcdef"), "half").unwrap();
        let _dir = open(tmp.path());
        assert!(
            tree(tmp.path())
                .keys()
                .all(|name| !name.contains(".chorus-tmp-"))
        );
    }
}
