//! Config-file sync: mirrors the keys under a prefix as files in a directory.
//!
//! A key `P + "a/b.conf"` becomes the file `DIR/a/b.conf`. Files are replaced atomically
//! (temporary file in the same directory, then rename), deleted keys remove their file, and
//! a manifest (`DIR/.chorus-sync-manifest`) lists the files this mirror owns, so that a restart
//! removes the stale ones it wrote and never touches files it did not write. A command can run
//! (`sh -c CMD`) once changes have been quiet for a debounce delay.
//!
//! It does not watch the directory: edits made to the files by hand are overwritten by the
//! next change of their key and are not sent to the cluster.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Name of the manifest file kept in the mirrored directory.
pub const MANIFEST: &str = ".chorus-sync-manifest";
/// File names starting with this are reserved for the mirror's own use.
const RESERVED: &str = ".chorus-";

/// Why a key could not be mirrored.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The key does not map to a safe relative path; nothing was written.
    #[error("key {key:?} cannot be a file name: {reason}")]
    BadPath {
        /// The key.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A file operation failed; the file may be left as it was before.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SyncError + '_ {
    move |source| SyncError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One change fed to the mirror: a value, or `None` for a deletion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEvent {
    /// The full key (with the prefix).
    pub key: String,
    /// The new value, `None` when deleted.
    pub value: Option<Bytes>,
}

/// Maps a key to the relative path of its file, `Ok(None)` when the key is outside the prefix.
///
/// # Errors
/// [`SyncError::BadPath`] for empty names, `..`, `.`, absolute paths, empty components,
/// NUL bytes, backslashes and reserved names.
pub fn relative_path(prefix: &str, key: &str) -> Result<Option<PathBuf>, SyncError> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Ok(None);
    };
    let bad = |reason| SyncError::BadPath {
        key: key.to_string(),
        reason,
    };
    if rest.is_empty() {
        return Err(bad("empty file name"));
    }
    if rest.starts_with('/') {
        return Err(bad("absolute path"));
    }
    if rest.contains('\0') || rest.contains('\\') {
        return Err(bad("NUL or backslash in name"));
    }
    let mut path = PathBuf::new();
    for part in rest.split('/') {
        match part {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("`.` or `..` component")),
            p if p.starts_with(RESERVED) => return Err(bad("reserved name .chorus-*")),
            p => path.push(p),
        }
    }
    // Belt and braces: the parts above are plain names, so only Normal components remain.
    if !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(bad("not a plain relative path"));
    }
    Ok(Some(path))
}

/// The mirror of one prefix into one directory.
#[derive(Debug)]
pub struct SyncDir {
    root: PathBuf,
    prefix: String,
    owned: BTreeSet<PathBuf>,
}

impl SyncDir {
    /// Opens (creating when needed) the directory and reads its manifest.
    ///
    /// # Errors
    /// [`SyncError::Io`] when the directory cannot be created or the manifest read.
    pub fn open(root: impl Into<PathBuf>, prefix: impl Into<String>) -> Result<Self, SyncError> {
        let root = root.into();
        std::fs::create_dir_all(&root).map_err(io_err(&root))?;
        let manifest = root.join(MANIFEST);
        let owned = match std::fs::read_to_string(&manifest) {
            Ok(text) => text
                .lines()
                .filter(|l| !l.is_empty())
                .map(PathBuf::from)
                // Only plain relative paths are trusted from the manifest.
                .filter(|p| p.components().all(|c| matches!(c, Component::Normal(_))))
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(io_err(&manifest)(e)),
        };
        Ok(Self {
            root,
            prefix: prefix.into(),
            owned,
        })
    }

    /// Writes the full current state and removes owned files that are not in it.
    /// Returns how many files changed. Keys that cannot be files are skipped and logged.
    ///
    /// # Errors
    /// [`SyncError::Io`] when the manifest cannot be written.
    pub fn reconcile(
        &mut self,
        entries: impl IntoIterator<Item = (String, Bytes)>,
    ) -> Result<usize, SyncError> {
        let mut changed = 0;
        let mut wanted = BTreeSet::new();
        for (key, value) in entries {
            match relative_path(&self.prefix, &key) {
                Ok(Some(rel)) => {
                    wanted.insert(rel);
                    match self.write(&key, &value) {
                        Ok(true) => changed += 1,
                        Ok(false) => {}
                        Err(e) => tracing::warn!(error = %e, "sync-dir: cannot write"),
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "sync-dir: skipped"),
            }
        }
        let stale: Vec<PathBuf> = self.owned.difference(&wanted).cloned().collect();
        for rel in stale {
            match self.remove_rel(&rel) {
                Ok(true) => changed += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "sync-dir: cannot remove stale file"),
            }
        }
        self.save_manifest()?;
        Ok(changed)
    }

    /// Applies one change; returns whether a file changed on disk.
    ///
    /// # Errors
    /// [`SyncError`] when the key is not a safe name or the file operation fails.
    pub fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<bool, SyncError> {
        let changed = match value {
            Some(v) => self.write(key, v)?,
            None => match relative_path(&self.prefix, key)? {
                Some(rel) => self.remove_rel(&rel)?,
                None => false,
            },
        };
        if changed {
            self.save_manifest()?;
        }
        Ok(changed)
    }

    /// Writes one key's file atomically unless it already holds `value`.
    fn write(&mut self, key: &str, value: &[u8]) -> Result<bool, SyncError> {
        let Some(rel) = relative_path(&self.prefix, key)? else {
            return Ok(false);
        };
        let path = self.root.join(&rel);
        if self.owned.contains(&rel) && std::fs::read(&path).is_ok_and(|old| old == value) {
            return Ok(false);
        }
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        atomic_write(&dir, &path, value)?;
        self.owned.insert(rel);
        Ok(true)
    }

    /// Removes one file (if present) and its parent directories left empty.
    fn remove_rel(&mut self, rel: &Path) -> Result<bool, SyncError> {
        let path = self.root.join(rel);
        self.owned.remove(rel);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_err(&path)(e)),
        };
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == self.root || !d.starts_with(&self.root) || std::fs::remove_dir(d).is_err() {
                break;
            }
            dir = d.parent();
        }
        Ok(removed)
    }

    fn save_manifest(&self) -> Result<(), SyncError> {
        let mut text = String::new();
        for rel in &self.owned {
            if let Some(s) = rel.to_str() {
                text.push_str(s);
                text.push('\n');
            }
        }
        atomic_write(&self.root, &self.root.join(MANIFEST), text.as_bytes())
    }
}

/// Writes `path` by a temporary file in `dir` and a rename, so readers see old or new, never half.
fn atomic_write(dir: &Path, path: &Path, data: &[u8]) -> Result<(), SyncError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        "{RESERVED}tmp-{name}-{:016x}",
        rand::random::<u64>()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(data)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(SyncError::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    Ok(())
}

/// Runs the hook through `sh -c`, waiting for it, and logs how it ended.
async fn run_hook(cmd: &str, root: &Path, prefix: &str) {
    tracing::info!(command = cmd, "sync-dir: running on-change hook");
    let status = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CHORUS_SYNC_DIR", root)
        .env("CHORUS_PREFIX", prefix)
        .stdin(std::process::Stdio::null())
        .status()
        .await;
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => tracing::warn!(command = cmd, status = %s, "sync-dir: hook failed"),
        Err(e) => tracing::warn!(command = cmd, error = %e, "sync-dir: cannot run hook"),
    }
}

/// Applies events as they come and runs `hook` once they have been quiet for `debounce`.
/// Returns when the channel closes (after a last pending hook run).
///
/// `initial_changes` says whether the initial reconcile changed anything (the hook then
/// runs after the debounce too).
pub async fn run(
    mut dir: SyncDir,
    mut events: mpsc::Receiver<SyncEvent>,
    hook: Option<String>,
    debounce: Duration,
    initial_changes: bool,
) {
    let mut pending = initial_changes;
    let mut deadline = Instant::now() + debounce;
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(ev) => match dir.apply(&ev.key, ev.value.as_deref()) {
                    Ok(true) => {
                        tracing::debug!(key = ev.key, "sync-dir: file updated");
                        pending = true;
                        deadline = Instant::now() + debounce;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "sync-dir: change not mirrored"),
                },
                None => break,
            },
            () = tokio::time::sleep_until(deadline), if pending => {
                pending = false;
                if let Some(cmd) = &hook {
                    run_hook(cmd, &dir.root, &dir.prefix).await;
                }
            }
        }
    }
    if pending && let Some(cmd) = &hook {
        run_hook(cmd, &dir.root, &dir.prefix).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);
    impl TempDir {
        fn new() -> Self {
            let p = std::env::temp_dir()
                .join(format!("chorus-sync-test-{:016x}", rand::random::<u64>()));
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn read(root: &Path, rel: &str) -> Option<String> {
        std::fs::read_to_string(root.join(rel)).ok()
    }

    #[test]
    fn paths_are_checked() {
        let ok = |k| relative_path("app/", k).unwrap();
        assert_eq!(ok("app/a/b.conf"), Some(PathBuf::from("a/b.conf")));
        assert_eq!(ok("other/x"), None);
        for bad in [
            "app/",
            "app//x",
            "app/../etc/passwd",
            "app/a/../../x",
            "app/./x",
            "app/a/",
            "app/.chorus-sync-manifest",
            "app/a\\b",
            "app/a\0b",
        ] {
            assert!(relative_path("app/", bad).is_err(), "{bad:?} accepted");
        }
        // An empty prefix and a key starting with '/' would be absolute.
        assert!(relative_path("", "/etc/passwd").is_err());
    }

    #[test]
    fn apply_writes_changes_and_removes() {
        let tmp = TempDir::new();
        let mut dir = SyncDir::open(&tmp.0, "app/").unwrap();
        assert!(dir.apply("app/a/b.conf", Some(b"one")).unwrap());
        assert_eq!(read(&tmp.0, "a/b.conf").as_deref(), Some("one"));
        assert!(
            !dir.apply("app/a/b.conf", Some(b"one")).unwrap(),
            "same value is no change"
        );
        assert!(dir.apply("app/a/b.conf", Some(b"two")).unwrap());
        assert_eq!(read(&tmp.0, "a/b.conf").as_deref(), Some("two"));
        assert!(!dir.apply("other/x", Some(b"x")).unwrap());
        // A name of its own, so an unrelated file next to the temp dir cannot fail the check.
        let escape = format!("{}-escape", tmp.0.file_name().unwrap().to_string_lossy());
        assert!(dir.apply(&format!("app/../{escape}"), Some(b"x")).is_err());
        assert!(!tmp.0.parent().unwrap().join(&escape).exists());
        assert!(dir.apply("app/a/b.conf", None).unwrap());
        assert!(read(&tmp.0, "a/b.conf").is_none());
        assert!(!tmp.0.join("a").exists(), "empty parent directory pruned");
        // No temporary files left behind.
        let names: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![MANIFEST.to_string()]);
    }

    #[test]
    fn reconcile_removes_only_stale_owned_files() {
        let tmp = TempDir::new();
        std::fs::write(tmp.0.join("user.txt"), "mine").unwrap();
        {
            let mut dir = SyncDir::open(&tmp.0, "app/").unwrap();
            dir.apply("app/keep", Some(b"k")).unwrap();
            dir.apply("app/stale", Some(b"s")).unwrap();
        }
        // Restart: the state now only holds app/keep (changed) and app/new.
        let mut dir = SyncDir::open(&tmp.0, "app/").unwrap();
        let changed = dir
            .reconcile(vec![
                ("app/keep".to_string(), Bytes::from_static(b"k2")),
                ("app/new".to_string(), Bytes::from_static(b"n")),
            ])
            .unwrap();
        assert_eq!(changed, 3);
        assert_eq!(read(&tmp.0, "keep").as_deref(), Some("k2"));
        assert_eq!(read(&tmp.0, "new").as_deref(), Some("n"));
        assert!(read(&tmp.0, "stale").is_none());
        assert_eq!(read(&tmp.0, "user.txt").as_deref(), Some("mine"));
        let owned: Vec<_> = dir
            .owned
            .iter()
            .map(|p| p.to_str().unwrap().to_string())
            .collect();
        assert_eq!(owned, vec!["keep", "new"]);
    }

    #[tokio::test]
    async fn hook_runs_once_after_changes_settle() {
        let tmp = TempDir::new();
        let marker = tmp.0.join("hook-count");
        let mirror = tmp.0.join("mirror");
        let dir = SyncDir::open(&mirror, "app/").unwrap();
        let (tx, rx) = mpsc::channel(16);
        let hook = format!("echo \"$CHORUS_PREFIX\" >> '{}'", marker.display());
        let debounce = Duration::from_millis(300);
        let task = tokio::spawn(run(dir, rx, Some(hook), debounce, false));
        // A burst of changes closer together than the debounce delay.
        for i in 0..5 {
            tx.send(SyncEvent {
                key: format!("app/k{i}"),
                value: Some(Bytes::from(format!("v{i}"))),
            })
            .await
            .unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert!(!marker.exists(), "hook ran before the changes settled");
        assert_eq!(
            read(&mirror, "k4").as_deref(),
            Some("v4"),
            "files are written at once"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(std::time::Instant::now() < deadline, "hook never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // An event that changes nothing does not run the hook again.
        tx.send(SyncEvent {
            key: "app/k0".into(),
            value: Some(Bytes::from("v0")),
        })
        .await
        .unwrap();
        tokio::time::sleep(debounce * 2).await;
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1);
        // A deletion, then the stream ends: the pending hook still runs.
        tx.send(SyncEvent {
            key: "app/k1".into(),
            value: None,
        })
        .await
        .unwrap();
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
        let runs = std::fs::read_to_string(&marker).unwrap();
        assert_eq!(
            runs, "app/\napp/\n",
            "one run per settled burst, with the prefix in env"
        );
        assert!(read(&mirror, "k1").is_none());
    }
}
