//! Config-file sync: mirrors the keys under a prefix as files in a directory.
//!
//! A key `P + "a/b.conf"` becomes the file `DIR/a/b.conf`. Files are replaced atomically (see
//! [`rootdir`]), deleted keys remove their file, and a manifest (`DIR/.chorus-sync-manifest`)
//! lists the files this mirror owns, so that it only ever removes files it wrote. A command can
//! run (`sh -c CMD`) once changes have been quiet for a debounce delay.
//!
//! Rules (docs/cli.md says the same to users):
//! - **Files and directories.** When one key is a path prefix of another (`a` and `a/b`), the
//!   deeper key wins: `a/b` is the file `DIR/a/b`, and `a` is not mirrored while any key under
//!   `a/` exists (counted in `sync_dir_shadowed_keys`). When the last key under `a/` goes,
//!   `DIR/a` becomes the file of key `a`. The files on disk depend only on which keys exist,
//!   never on the order in which they arrived.
//! - **Start.** The mirror writes what the node holds at once, but removes an owned file whose
//!   key is absent only once the node is in sync with a live peer: a node that heard no peer,
//!   or whose wait for sync timed out, may simply not have received the key yet. Files kept for
//!   that reason are removed (if still absent) as soon as it is in sync with a peer.
//! - **Never silently stopped.** A watch that falls behind the node's change log resumes from a
//!   fresh read of the prefix; the hook has a timeout after which its process group is killed;
//!   every failure is logged and counted ([`SyncStats`], in `/v1/stats` and `/metrics`).
//!
//! It does not watch the directory: edits made to the files by hand are overwritten by the
//! next change of their key and are not sent to the cluster.

mod rootdir;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chorus::{MemberState, Node};
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::rootdir::RootDir;

/// Name of the manifest file kept in the mirrored directory.
pub const MANIFEST: &str = ".chorus-sync-manifest";
/// File names starting with this are reserved for the mirror's own use.
const RESERVED: &str = ".chorus-";
/// Longest file name Linux file systems take (`NAME_MAX`), in bytes.
const NAME_MAX: usize = 255;
/// How often a mirror that kept files waiting for sync checks again.
const SYNC_POLL: Duration = Duration::from_millis(250);

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
    /// A file operation failed; the file is left as it was before.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Counters of a mirror; [`SyncStats::counters`] names them.
#[derive(Debug, Default)]
pub struct SyncStats {
    files_written: AtomicU64,
    files_removed: AtomicU64,
    errors: AtomicU64,
    bad_keys: AtomicU64,
    shadowed_keys: AtomicU64,
    kept_unconfirmed: AtomicU64,
    resyncs: AtomicU64,
    hook_runs: AtomicU64,
    hook_failures: AtomicU64,
    hook_timeouts: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Whether a figure of [`SyncStats`] only grows or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Counts events since the agent started.
    Counter,
    /// The current number of something.
    Gauge,
}

impl SyncStats {
    /// Every figure by its name in `/v1/stats` (under `sync_dir`) and `/metrics`
    /// (`chorus_sync_dir_NAME`).
    pub fn figures(&self) -> Vec<(&'static str, Kind, u64)> {
        let Self {
            files_written,
            files_removed,
            errors,
            bad_keys,
            shadowed_keys,
            kept_unconfirmed,
            resyncs,
            hook_runs,
            hook_failures,
            hook_timeouts,
        } = self;
        use Kind::{Counter, Gauge};
        [
            ("files_written", Counter, files_written),
            ("files_removed", Counter, files_removed),
            ("errors", Counter, errors),
            ("bad_keys", Counter, bad_keys),
            ("shadowed_keys", Gauge, shadowed_keys),
            ("kept_unconfirmed", Gauge, kept_unconfirmed),
            ("resyncs", Counter, resyncs),
            ("hook_runs", Counter, hook_runs),
            ("hook_failures", Counter, hook_failures),
            ("hook_timeouts", Counter, hook_timeouts),
        ]
        .into_iter()
        .map(|(name, kind, v)| (name, kind, v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// What to do with owned files whose key a snapshot does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Absent {
    /// Remove them: the snapshot is the cluster's state.
    Remove,
    /// Keep them: the node may not have heard of the key yet.
    Keep,
}

/// One input of the mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncInput {
    /// A key changed: a value, or `None` for a deletion, at a local revision of the node.
    Change {
        /// The full key (with the prefix).
        key: String,
        /// The new value, `None` when deleted.
        value: Option<Bytes>,
        /// The node's local revision of the change.
        revision: u64,
    },
    /// Every live key under the prefix, read when the node's revision was at least
    /// `revision`: changes at or below it are already in it and are skipped.
    Snapshot {
        /// `(full key, value)` pairs.
        entries: Vec<(String, Bytes)>,
        /// The node's revision read just before the entries.
        revision: u64,
        /// What to do with owned files absent from `entries`.
        absent: Absent,
    },
}

/// Maps a key to the relative path of its file (`/`-separated), `Ok(None)` when the key is
/// outside the prefix.
///
/// # Errors
/// [`SyncError::BadPath`] for empty names, `..`, `.`, absolute paths, empty components,
/// NUL bytes, backslashes, reserved names and components longer than 255 bytes.
pub fn relative_path(prefix: &str, key: &str) -> Result<Option<String>, SyncError> {
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
    for part in rest.split('/') {
        match part {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("`.` or `..` component")),
            p if p.starts_with(RESERVED) => return Err(bad("reserved name .chorus-*")),
            p if p.len() > NAME_MAX => return Err(bad("a path component longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(Some(rest.to_owned()))
}

/// Whether `rel` is a plain relative path as [`relative_path`] makes them (for the manifest,
/// which is read back from disk).
fn is_plain(rel: &str) -> bool {
    relative_path("", rel).is_ok_and(|p| p.is_some())
}

/// The ancestors of `rel`, shallowest first (`a/b/c` gives `a`, `a/b`).
fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    rel.match_indices('/').map(|(i, _)| &rel[..i])
}

/// The mirror of one prefix into one directory.
#[derive(Debug)]
pub struct SyncDir {
    root: RootDir,
    prefix: String,
    /// The value of every key under the prefix that can be a file, by relative path.
    wanted: BTreeMap<String, Bytes>,
    /// The files this mirror wrote and has not removed (the manifest).
    owned: BTreeSet<String>,
    stats: Arc<SyncStats>,
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

/// The `--on-change` command and its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Run through `sh -c`; `None` for no command.
    pub command: Option<String>,
    /// How long changes must be quiet before it runs.
    pub debounce: Duration,
    /// How long it may run before its process group is killed.
    pub timeout: Duration,
}

/// Runs the hook through `sh -c` in a process group of its own, waits for it (at most
/// `timeout`, then kills the group) and logs and counts how it ended.
async fn run_hook(cmd: &str, timeout: Duration, root: &Path, prefix: &str, stats: &SyncStats) {
    tracing::info!(command = cmd, "sync-dir: running on-change hook");
    let spawned = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .env("CHORUS_SYNC_DIR", root)
        .env("CHORUS_PREFIX", prefix)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            bump(&stats.hook_failures);
            tracing::warn!(command = cmd, error = %e, "sync-dir: cannot run hook");
            return;
        }
    };
    bump(&stats.hook_runs);
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => {}
        Ok(Ok(status)) => {
            bump(&stats.hook_failures);
            tracing::warn!(command = cmd, %status, "sync-dir: hook failed");
        }
        Ok(Err(e)) => {
            bump(&stats.hook_failures);
            tracing::warn!(command = cmd, error = %e, "sync-dir: cannot wait for hook");
        }
        Err(_) => {
            bump(&stats.hook_timeouts);
            tracing::warn!(
                command = cmd,
                ?timeout,
                "sync-dir: hook still running after its timeout; killing its process group \
                 (set --on-change-timeout-ms)"
            );
            // The group was made for the hook (process_group(0)), so its id is the shell's pid.
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
        }
    }
}

/// Applies inputs as they come and runs the hook once they have been quiet for its debounce.
/// Returns when the channel closes (after a last pending hook run).
pub async fn run(mut dir: SyncDir, mut inputs: mpsc::Receiver<SyncInput>, hook: Hook) {
    let mut pending = false;
    let mut deadline = Instant::now() + hook.debounce;
    let mut floor = 0;
    loop {
        tokio::select! {
            input = inputs.recv() => {
                let changed = match input {
                    None => break,
                    Some(SyncInput::Change { revision, .. }) if revision <= floor => continue,
                    Some(SyncInput::Change { key, value, .. }) => {
                        match dir.apply(&key, value.as_ref()) {
                            Ok(changed) => changed,
                            Err(e) => {
                                tracing::warn!(error = %e, "sync-dir: change not mirrored");
                                false
                            }
                        }
                    }
                    Some(SyncInput::Snapshot { entries, revision, absent }) => {
                        floor = revision;
                        match dir.reconcile(entries, absent) {
                            Ok(changed) => {
                                tracing::info!(dir = %dir.root.path().display(), changed, ?absent, "sync-dir: state written");
                                changed > 0
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "sync-dir: state not fully written");
                                true
                            }
                        }
                    }
                };
                if changed {
                    pending = true;
                    deadline = Instant::now() + hook.debounce;
                }
            }
            () = tokio::time::sleep_until(deadline), if pending => {
                pending = false;
                if let Some(cmd) = &hook.command {
                    run_hook(cmd, hook.timeout, dir.root.path(), &dir.prefix, &dir.stats).await;
                }
            }
        }
    }
    if pending && let Some(cmd) = &hook.command {
        run_hook(cmd, hook.timeout, dir.root.path(), &dir.prefix, &dir.stats).await;
    }
}

/// Whether the node's store matched a live peer's: only then is a key it lacks really gone.
fn in_sync_with_a_peer(node: &Node) -> bool {
    node.is_in_sync() && node.members().iter().any(|m| m.state == MemberState::Alive)
}

/// A fresh read of the prefix.
fn snapshot(node: &Node, prefix: &str, absent: Absent) -> SyncInput {
    let revision = node.revision();
    let entries = node
        .scan(prefix)
        .into_iter()
        .map(|(key, entry)| (key, entry.value))
        .collect();
    SyncInput::Snapshot {
        entries,
        revision,
        absent,
    }
}

/// Feeds the mirror from the node until the node stops or the mirror is gone: a snapshot
/// once the node is in sync (with a peer, or alone after its solo delay) or `sync_wait`
/// passed, the changes after it, a new snapshot whenever the watch fell behind, and a removing
/// snapshot once a node that started without a peer's confirmation gets in sync with one.
async fn feed(
    node: &Node,
    prefix: &str,
    sync_wait: Duration,
    tx: &mpsc::Sender<SyncInput>,
    stats: &SyncStats,
) {
    // Subscribe before reading the state so that no change falls between the two.
    let mut watch = node.watch(prefix);
    let give_up = Instant::now() + sync_wait;
    let mut confirmed = in_sync_with_a_peer(node);
    while !confirmed && !node.is_in_sync() && Instant::now() < give_up {
        tokio::time::sleep(SYNC_POLL.min(give_up - Instant::now())).await;
        confirmed = in_sync_with_a_peer(node);
    }
    if !confirmed {
        tracing::warn!(
            ?sync_wait,
            "sync-dir: not in sync with a peer yet; writing the local state, and removing the \
             files of keys it lacks only once in sync with one"
        );
    }
    let absent = |confirmed: bool| {
        if confirmed {
            Absent::Remove
        } else {
            Absent::Keep
        }
    };
    if tx
        .send(snapshot(node, prefix, absent(confirmed)))
        .await
        .is_err()
    {
        return;
    }
    // An interval, not a sleep in the loop: changes arriving faster than the period would
    // restart a sleep for ever.
    let mut poll = tokio::time::interval(SYNC_POLL);
    loop {
        tokio::select! {
            change = watch.next() => match change {
                Some(Ok(change)) => {
                    let input = SyncInput::Change {
                        key: change.key,
                        value: change.value,
                        revision: change.revision,
                    };
                    if tx.send(input).await.is_err() {
                        return;
                    }
                }
                // The node stopped.
                None => return,
                Some(Err(e)) => {
                    // The watch fell behind the change log; a new one and a fresh read carry
                    // on from now.
                    bump(&stats.resyncs);
                    tracing::warn!(error = %e, "sync-dir: the watch fell behind; re-reading the prefix");
                    watch = node.watch(prefix);
                    if tx.send(snapshot(node, prefix, absent(confirmed))).await.is_err() {
                        return;
                    }
                }
            },
            _ = poll.tick(), if !confirmed => {
                if in_sync_with_a_peer(node) {
                    confirmed = true;
                    tracing::info!("sync-dir: in sync with a peer; removing the files of absent keys");
                    if tx.send(snapshot(node, prefix, Absent::Remove)).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Mirrors the prefix of `dir` from `node` until the node stops (then runs a pending hook).
/// Failures are logged and counted in the directory's [`SyncStats`]; the mirror goes on.
pub async fn mirror(node: Node, dir: SyncDir, hook: Hook, sync_wait: Duration) {
    let prefix = dir.prefix.clone();
    let stats = Arc::clone(&dir.stats);
    let (tx, rx) = mpsc::channel(1024);
    let applying = tokio::spawn(run(dir, rx, hook));
    feed(&node, &prefix, sync_wait, &tx, &stats).await;
    drop(tx);
    if let Err(e) = applying.await {
        tracing::error!(error = %e, "sync-dir: mirror task failed");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn read(root: &Path, rel: &str) -> Option<String> {
        std::fs::read_to_string(root.join(rel)).ok()
    }

    fn open(root: &Path) -> SyncDir {
        SyncDir::open(root, "app/", Arc::default()).unwrap()
    }

    fn put(dir: &mut SyncDir, key: &str, value: &str) -> bool {
        dir.apply(key, Some(&Bytes::from(value.to_owned())))
            .unwrap()
    }

    fn figure(stats: &SyncStats, name: &str) -> u64 {
        stats
            .figures()
            .into_iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, _, v)| v)
            .unwrap()
    }

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
    fn paths_are_checked() {
        let ok = |k| relative_path("app/", k).unwrap();
        assert_eq!(ok("app/a/b.conf").as_deref(), Some("a/b.conf"));
        assert_eq!(ok("other/x"), None);
        let long = format!("app/{}", "n".repeat(255));
        assert_eq!(ok(&long).as_deref(), Some(&long[4..]));
        for bad in [
            "app/",
            "app//x",
            "app/../etc/passwd",
            "app/a/../../x",
            "app/./x",
            "app/a/",
            "app/.chorus-sync-manifest",
            "app/.chorus-tmp-0000000000000000",
            "app/a\\b",
            "app/a\0b",
            &format!("app/{}", "n".repeat(256)),
        ] {
            assert!(relative_path("app/", bad).is_err(), "{bad:?} accepted");
        }
        // An empty prefix and a key starting with '/' would be absolute.
        assert!(relative_path("", "/etc/passwd").is_err());
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

    fn event(key: &str, value: Option<&str>, revision: u64) -> SyncInput {
        SyncInput::Change {
            key: key.to_owned(),
            value: value.map(|v| Bytes::from(v.to_owned())),
            revision,
        }
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting: {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn hook_runs_once_after_changes_settle() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let marker = tmp.path().join("hook-count");
        let mirror = tmp.path().join("mirror");
        let stats = Arc::new(SyncStats::default());
        let dir = SyncDir::open(&mirror, "app/", Arc::clone(&stats)).unwrap();
        let (tx, rx) = mpsc::channel(16);
        let hook = Hook {
            command: Some(format!("echo \"$CHORUS_PREFIX\" >> '{}'", marker.display())),
            debounce: Duration::from_millis(300),
            timeout: Duration::from_secs(60),
        };
        let task = tokio::spawn(run(dir, rx, hook));
        // A burst of changes closer together than the debounce delay.
        for i in 0..5 {
            tx.send(event(&format!("app/k{i}"), Some(&format!("v{i}")), i + 1))
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
        wait_for("the hook ran", || marker.exists()).await;
        // An event that changes nothing does not run the hook again.
        tx.send(event("app/k0", Some("v0"), 6)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1);
        // A change at or below the revision of the last snapshot is already in it.
        tx.send(SyncInput::Snapshot {
            entries: vec![("app/k1".into(), Bytes::from("v1"))],
            revision: 10,
            absent: Absent::Keep,
        })
        .await
        .unwrap();
        tx.send(event("app/k1", Some("stale"), 9)).await.unwrap();
        // A deletion, then the stream ends: the pending hook still runs.
        tx.send(event("app/k2", None, 11)).await.unwrap();
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
        assert!(read(&mirror, "k2").is_none());
        assert_eq!(read(&mirror, "k1").as_deref(), Some("v1"));
        assert_eq!(figure(&stats, "hook_runs"), 2);
    }

    #[tokio::test]
    async fn a_hook_that_overruns_its_timeout_is_killed_and_the_mirror_goes_on() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mirror = tmp.path().join("mirror");
        let pid_file = tmp.path().join("pid");
        let stats = Arc::new(SyncStats::default());
        let dir = SyncDir::open(&mirror, "app/", Arc::clone(&stats)).unwrap();
        let (tx, rx) = mpsc::channel(16);
        // The hook leaves a grandchild behind; killing the group takes it too.
        let hook = Hook {
            command: Some(format!(
                "sleep 60 & echo $! > '{}'; wait",
                pid_file.display()
            )),
            debounce: Duration::from_millis(10),
            timeout: Duration::from_millis(300),
        };
        let task = tokio::spawn(run(dir, rx, hook));
        tx.send(event("app/a", Some("1"), 1)).await.unwrap();
        wait_for("the hook started", || {
            read(tmp.path(), "pid").is_some_and(|p| p.ends_with('\n'))
        })
        .await;
        // Without the timeout the mirror would sit in the hook for a minute.
        tx.send(event("app/b", Some("2"), 2)).await.unwrap();
        wait_for("the next change", || read(&mirror, "b").is_some()).await;
        assert!(figure(&stats, "hook_timeouts") >= 1);
        let pid = read(tmp.path(), "pid").unwrap().trim().to_owned();
        wait_for("the hook's child was killed", || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.split_whitespace().nth(2) == Some("Z"))
        })
        .await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }

    async fn node_on(hub: &chorus::transport::MemoryHub, id: u8) -> Node {
        let transport = hub.endpoint(([10, 0, 0, id], 7400).into()).unwrap();
        Node::builder()
            .cluster("sync-dir")
            .node_id(chorus::NodeId(u64::from(id)))
            .start_with_transport(transport)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn at_start_files_of_absent_keys_stay_until_the_node_is_in_sync_with_a_peer() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        {
            let mut dir = open(tmp.path());
            put(&mut dir, "app/stale.conf", "from the last run");
        }
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let a = node_on(&hub, 1).await;
        a.put("app/new.conf", "new").await.unwrap();
        let stats = Arc::new(SyncStats::default());
        let hook = Hook {
            command: None,
            debounce: Duration::from_millis(10),
            timeout: Duration::from_secs(60),
        };
        let dir = SyncDir::open(tmp.path(), "app/", Arc::clone(&stats)).unwrap();
        // Alone, the node calls itself in sync after 3 s; the wait for a peer gives up first.
        let mirror = tokio::spawn(mirror(a.clone(), dir, hook, Duration::from_millis(300)));
        wait_for("the local state written", || {
            read(tmp.path(), "new.conf").is_some()
        })
        .await;
        assert_eq!(
            read(tmp.path(), "stale.conf").as_deref(),
            Some("from the last run")
        );
        assert_eq!(figure(&stats, "kept_unconfirmed"), 1);
        // Past the solo in-sync delay it is still kept: no peer has confirmed the state.
        a.wait_in_sync(Duration::from_secs(10)).await.unwrap();
        tokio::time::sleep(2 * SYNC_POLL).await;
        assert_eq!(
            read(tmp.path(), "stale.conf").as_deref(),
            Some("from the last run")
        );
        // A peer arrives; once in sync with it, the absent key's file goes.
        let b = node_on(&hub, 2).await;
        wait_for("the stale file removed", || {
            read(tmp.path(), "stale.conf").is_none()
        })
        .await;
        assert_eq!(read(tmp.path(), "new.conf").as_deref(), Some("new"));
        assert_eq!(figure(&stats, "kept_unconfirmed"), 0);
        a.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), mirror)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_watch_that_fell_behind_the_change_log_resumes_from_a_fresh_read() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mirror = tmp.path().join("mirror");
        let started = tmp.path().join("hook-started");
        let flag = tmp.path().join("hold");
        std::fs::write(&flag, "").unwrap();
        let hub = chorus::transport::MemoryHub::new(Default::default()).unwrap();
        let node = node_on(&hub, 1).await;
        node.put("app/first", "1").await.unwrap();
        let stats = Arc::new(SyncStats::default());
        let dir = SyncDir::open(&mirror, "app/", Arc::clone(&stats)).unwrap();
        // A hook that holds the mirror until the test lets it go.
        let hook = Hook {
            command: Some(format!(
                "touch '{}'; while [ -e '{}' ]; do sleep 0.02; done",
                started.display(),
                flag.display()
            )),
            debounce: Duration::from_millis(10),
            timeout: Duration::from_secs(120),
        };
        let (tx, rx) = mpsc::channel(4);
        let applying = tokio::spawn(run(dir, rx, hook));
        let feeding = {
            let (node, stats) = (node.clone(), Arc::clone(&stats));
            tokio::spawn(async move { feed(&node, "app/", Duration::ZERO, &tx, &stats).await })
        };
        wait_for("the hook holds the mirror", || started.exists()).await;
        // Enough changes under the prefix to fill the mirror's queue, so the watch is not
        // read; then more changes than the node's change log keeps (100 000).
        let ops = |prefix: &str, n: usize| -> Vec<chorus::Op> {
            (0..n)
                .map(|i| chorus::Op::Put {
                    key: format!("{prefix}{i:04}"),
                    value: Bytes::from_static(b"x"),
                })
                .collect()
        };
        node.batch(ops("app/queued-", 16)).await.unwrap();
        for _ in 0..101 {
            node.batch(ops("other/", 1000)).await.unwrap();
        }
        node.put("app/last", "after the burst").await.unwrap();
        std::fs::remove_file(&flag).unwrap();
        // Without the fresh read the watch's end would stop the mirror here.
        wait_for("the state after the burst mirrored", || {
            read(&mirror, "last").as_deref() == Some("after the burst")
                && read(&mirror, "queued-0015").as_deref() == Some("x")
        })
        .await;
        assert_eq!(figure(&stats, "resyncs"), 1);
        node.put("app/later", "still mirrored").await.unwrap();
        wait_for("a later change mirrored", || {
            read(&mirror, "later").is_some()
        })
        .await;
        node.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(20), feeding)
            .await
            .unwrap()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), applying)
            .await
            .unwrap()
            .unwrap();
    }
}
