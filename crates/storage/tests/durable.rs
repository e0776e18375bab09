//! The data directory (`DiskLog`) and restoring a `Replica` from it: reload equality, torn
//! tails, flipped bytes in the log and in a snapshot, compaction, tombstones and freshness
//! after a restart, and catching up with a peer after a restart. (Moved from
//! `crates/replication/tests/durable.rs` with the file I/O; the replica's persist items are
//! handed to the log by the `Durable` harness below, as the storage thread does.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::num::NonZeroU32;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::{
    DurableError, DurableStats, Entry, Fsync, Loaded, Op, Origin, Persist, Replica, ReplicaConfig,
    Version, wire,
};
use chorus_storage::{DiskLog, DiskOptions, FlushMode};
use chorus_testkit::{TempDir, temp_dir};
use prost::Message as _;

const WALL: u64 = 1_700_000_000_000;

fn options() -> DiskOptions {
    DiskOptions::new(Fsync::Always)
}

fn cfg(node: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node, node * 7);
    c.buckets = NonZeroU32::new(16).unwrap();
    c
}

/// A durable replica and its data directory, driven as the node and its storage thread
/// drive them: the replica's persist items go to the log, which writes, fsyncs and compacts.
struct Durable {
    replica: Replica,
    log: DiskLog,
}

impl Deref for Durable {
    type Target = Replica;
    fn deref(&self) -> &Replica {
        &self.replica
    }
}

impl DerefMut for Durable {
    fn deref_mut(&mut self) -> &mut Replica {
        &mut self.replica
    }
}

impl Durable {
    fn new(replica: Replica, log: DiskLog) -> Durable {
        Durable { replica, log }
    }

    /// Hands every persist item to the log, writes and fsyncs it as the policy says (all of
    /// it with `force`), then compacts if the log has grown enough.
    fn flush_durable(&mut self, now: Instant, force: bool) -> Result<(), DurableError> {
        while let Some(item) = self.replica.poll_persist() {
            if let Persist::Append {
                seq,
                record,
                origin,
            } = item
            {
                self.log.append(seq, &record, origin);
            }
        }
        let mode = if force {
            FlushMode::SyncAll
        } else {
            FlushMode::Policy
        };
        self.log.flush(now, mode)?;
        if self.log.wants_compaction() {
            // A failure is counted by the log; the old log stays in use.
            let _ = self
                .log
                .compact(self.replica.store(), self.replica.last_wall_ms());
        }
        Ok(())
    }

    fn durable_stats(&self) -> Option<DurableStats> {
        Some(self.log.stats())
    }

    fn poll_timeout(&self) -> Option<Instant> {
        [self.replica.poll_timeout(), self.log.poll_timeout()]
            .into_iter()
            .flatten()
            .min()
    }

    /// The replica's timers and the log's fsync timer.
    fn handle_timeout(&mut self, now: Instant, wall_ms: u64) {
        self.replica.handle_timeout(now, wall_ms);
        if self.log.poll_timeout().is_some_and(|t| t <= now) {
            let _ = self.flush_durable(now, false);
        }
    }
}

/// Opens `dir` and builds a durable replica from what it holds.
fn open(dir: &Path, node: u64, opts: DiskOptions, now: Instant) -> (Durable, Loaded) {
    let (log, loaded) = DiskLog::open(dir, opts).expect("open data dir");
    let r = Replica::restore(cfg(node), now, WALL, loaded.clone());
    (Durable::new(r, log), loaded)
}

type Contents = BTreeMap<String, (Option<Bytes>, Version)>;

fn contents(r: &Replica) -> Contents {
    r.store()
        .entries()
        .into_iter()
        .map(|(k, e)| (k, (e.value, e.version)))
        .collect()
}

fn loaded_contents(l: &Loaded) -> Contents {
    l.entries
        .iter()
        .map(|(k, v, ver, _)| (k.clone(), (v.clone(), *ver)))
        .collect()
}

fn files(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && !n.ends_with(".corrupt"))
        })
        .collect();
    out.sort();
    out
}

fn wal(dir: &Path) -> PathBuf {
    files(dir, "wal-").pop().expect("a log file")
}

#[test]
fn reload_gives_back_exactly_what_was_committed() {
    let dir = temp_dir("durable-reload");
    let now = Instant::now();
    let (mut r, loaded) = open(dir.path(), 1, options(), now);
    assert!(loaded.entries.is_empty());
    for i in 0..50 {
        r.put(WALL + i, format!("k/{i}"), format!("v{i}")).unwrap();
    }
    r.delete(WALL + 60, "k/3").unwrap();
    r.batch(
        WALL + 61,
        vec![Op::put("b/1", Bytes::from_static(b"x")), Op::delete("k/4")],
    )
    .unwrap();
    r.put(WALL + 62, "k/5", "newer").unwrap();
    r.flush_durable(now, false).unwrap();
    let before = contents(&r);
    let digest = r.digest();
    drop(r);

    let (r2, loaded) = open(dir.path(), 1, options(), now);
    assert!(!loaded.report.is_damaged());
    assert_eq!(loaded.report.torn_tail_bytes, 0);
    assert_eq!(loaded_contents(&loaded), before);
    assert_eq!(contents(&r2), before);
    assert_eq!(r2.digest(), digest, "digests rebuilt from the loaded store");
    assert!(
        r2.store()
            .get_entry("k/3")
            .is_some_and(|e| e.is_tombstone()),
        "tombstones are loaded"
    );
    // Revisions restart locally: 1..=n.
    assert_eq!(r2.store().revision(), before.len() as u64);
}

#[test]
fn writes_after_a_restart_win_over_the_previous_life() {
    let dir = temp_dir("durable-clock");
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, options(), now);
    // Written with a wall clock far ahead of the one the next life sees.
    let old = r.put(WALL + 10_000, "k", "old").unwrap();
    r.flush_durable(now, false).unwrap();
    drop(r);
    let (mut r2, _) = open(dir.path(), 1, options(), now);
    let new = r2.put(WALL, "k", "new").unwrap();
    assert!(new > old, "{new:?} must beat {old:?}");
    assert_eq!(r2.get("k"), Some(Bytes::from_static(b"new")));
}

#[test]
fn a_torn_tail_is_truncated_and_the_log_stays_usable() {
    let dir = temp_dir("durable-torn");
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, options(), now);
    for i in 0..10 {
        r.put(WALL + i, format!("k{i}"), "v").unwrap();
        r.flush_durable(now, false).unwrap();
    }
    drop(r);
    let path = wal(dir.path());
    let full = fs::read(&path).unwrap();
    // Cut the last record short, as a crash in the middle of a write does.
    fs::write(&path, &full[..full.len() - 5]).unwrap();

    let (mut r2, loaded) = open(dir.path(), 1, options(), now);
    assert!(loaded.report.torn_tail_bytes > 0);
    assert!(!loaded.report.is_damaged());
    assert_eq!(loaded.entries.len(), 9);
    assert!(r2.get("k9").is_none() && r2.get("k8").is_some());
    assert!(fs::metadata(&path).unwrap().len() < full.len() as u64 - 5);
    // Appending after the repair gives a clean log.
    r2.put(WALL + 100, "after", "v").unwrap();
    r2.flush_durable(now, false).unwrap();
    drop(r2);
    let (_, loaded) = open(dir.path(), 1, options(), now);
    assert_eq!(loaded.report.torn_tail_bytes, 0);
    assert_eq!(loaded.report.corrupt_records, 0);
    assert_eq!(loaded.entries.len(), 10);
}

#[test]
fn garbage_after_the_last_record_is_a_torn_tail() {
    let dir = temp_dir("durable-garbage");
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, options(), now);
    r.put(WALL, "a", "1").unwrap();
    r.flush_durable(now, false).unwrap();
    drop(r);
    let path = wal(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0u8; 100]);
    fs::write(&path, &bytes).unwrap();
    let (_, loaded) = open(dir.path(), 1, options(), now);
    assert_eq!(loaded.report.torn_tail_bytes, 100);
    assert_eq!(loaded.entries.len(), 1);
}

#[test]
fn a_flipped_byte_in_the_middle_of_the_log_is_skipped_counted_and_set_aside() {
    let dir = temp_dir("durable-flip");
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, options(), now);
    let mut ends = Vec::new();
    for i in 0..5 {
        r.put(WALL + i, format!("k{i}"), format!("value-{i}"))
            .unwrap();
        r.flush_durable(now, false).unwrap();
        ends.push(fs::metadata(wal(dir.path())).unwrap().len() as usize);
    }
    drop(r);
    let path = wal(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    // A byte inside the payload of the third record (k2).
    let at = ends[1] + 20;
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();

    let (r2, loaded) = open(dir.path(), 1, options(), now);
    assert_eq!(loaded.report.corrupt_records, 1);
    assert_eq!(loaded.report.corrupt_bytes, (ends[2] - ends[1]) as u64);
    assert!(loaded.damaged());
    let keys: Vec<&str> = loaded.entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(keys, ["k0", "k1", "k3", "k4"], "intact records kept");
    assert!(r2.get("k2").is_none());
    let mut aside = path.clone().into_os_string();
    aside.push(".corrupt");
    assert!(
        Path::new(&aside).exists(),
        "damaged log kept for inspection"
    );
    drop(r2);
    // What was intact was rewritten: the next start is clean and has the same entries.
    let (_, again) = open(dir.path(), 1, options(), now);
    assert!(!again.report.is_damaged());
    assert_eq!(loaded_contents(&again), loaded_contents(&loaded));
}

fn small_compaction() -> DiskOptions {
    let mut o = DiskOptions::new(Fsync::Never);
    o.compact_factor = NonZeroU32::new(2).unwrap();
    o.compact_min_bytes = 16 * 1024;
    o
}

#[test]
fn compaction_bounds_the_log_and_keeps_the_state() {
    let dir = temp_dir("durable-compact");
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, small_compaction(), now);
    for i in 0..3000u64 {
        r.put(WALL + i, format!("k{}", i % 20), vec![b'x'; 64])
            .unwrap();
        if i % 50 == 49 {
            r.delete(WALL + i, format!("k{}", i % 20)).unwrap();
        }
        r.flush_durable(now, false).unwrap();
    }
    let stats = r.durable_stats().unwrap();
    assert!(stats.snapshots >= 5, "{stats:?}");
    assert!(
        stats.wal_bytes <= 16 * 1024 + 512,
        "log bounded by the compaction threshold: {stats:?}"
    );
    assert_eq!(
        files(dir.path(), "snapshot-").len(),
        1,
        "old snapshots deleted"
    );
    assert_eq!(files(dir.path(), "wal-").len(), 1, "old logs deleted");
    let before = contents(&r);
    drop(r);
    let (r2, loaded) = open(dir.path(), 1, small_compaction(), now);
    assert!(!loaded.report.is_damaged());
    assert!(loaded.report.generation >= 5);
    assert_eq!(contents(&r2), before);
}

#[test]
fn a_flipped_byte_in_a_snapshot_loses_one_chunk_only() {
    let dir = temp_dir("durable-snapflip");
    let now = Instant::now();
    let mut o = DiskOptions::new(Fsync::Always);
    o.compact_min_bytes = 0;
    let (mut r, _) = open(dir.path(), 1, o, now);
    let value = vec![b'v'; 1000];
    let ops: Vec<Op> = (0..300)
        .map(|i| Op::put(format!("key/{i:04}"), Bytes::from(value.clone())))
        .collect();
    for chunk in ops.chunks(100) {
        r.batch(WALL, chunk.to_vec()).unwrap();
    }
    // The first flush compacts (threshold 0): the whole store goes to a snapshot.
    r.flush_durable(now, false).unwrap();
    assert_eq!(r.durable_stats().unwrap().snapshots, 1);
    drop(r);
    let snap = files(dir.path(), "snapshot-").pop().unwrap();
    let mut bytes = fs::read(&snap).unwrap();
    assert!(bytes.len() > 4 * 64 * 1024, "several chunks");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x80;
    fs::write(&snap, &bytes).unwrap();

    let (log, loaded) = DiskLog::open(dir.path(), o).unwrap();
    drop(log);
    assert_eq!(loaded.report.corrupt_records, 1);
    assert!(loaded.damaged());
    let n = loaded.entries.len();
    assert!(
        (200..300).contains(&n),
        "one chunk (~64 entries) lost, the rest kept: {n}"
    );
}

#[test]
fn the_data_directory_is_locked() {
    let dir = temp_dir("durable-lock");
    let (_log, _) = DiskLog::open(dir.path(), options()).unwrap();
    match DiskLog::open(dir.path(), options()) {
        Err(DurableError::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[test]
fn fsync_policies_sync_when_they_say() {
    let dir = temp_dir("durable-fsync");
    let now = Instant::now();
    let interval = DiskOptions::new(Fsync::Interval(Duration::from_millis(100)));
    let (mut r, _) = open(dir.path(), 1, interval, now);
    r.put(WALL, "a", "1").unwrap();
    r.flush_durable(now, false).unwrap();
    assert_eq!(r.durable_stats().unwrap().fsyncs, 0, "not yet due");
    assert_eq!(
        r.poll_timeout()
            .map(|t| t <= now + Duration::from_millis(100)),
        Some(true)
    );
    r.handle_timeout(now + Duration::from_millis(100), WALL + 100);
    assert_eq!(
        r.durable_stats().unwrap().fsyncs,
        1,
        "due after the interval"
    );
    drop(r);

    let dir = temp_dir("durable-fsync-always");
    let (mut r, _) = open(dir.path(), 1, options(), now);
    // Three writes in one group: one fsync.
    r.put(WALL, "a", "1").unwrap();
    r.put(WALL, "b", "1").unwrap();
    r.put(WALL, "c", "1").unwrap();
    r.flush_durable(now, false).unwrap();
    let s = r.durable_stats().unwrap();
    assert_eq!((s.records_written, s.fsyncs), (3, 1));
    // A change from a peer takes the relaxed path: written now, fsynced within a second.
    let write = wire::Envelope {
        body: Some(wire::envelope::Body::Write(wire::Write {
            hlc: chorus_replication::Hlc::new(WALL, 0).0,
            ops: vec![wire::Op {
                key: "remote".into(),
                value: Some(Bytes::from_static(b"r")),
                ..Default::default()
            }],
        })),
    };
    r.handle_message(now, WALL, 2, &write.encode_to_vec());
    r.flush_durable(now, false).unwrap();
    assert_eq!(r.durable_stats().unwrap().fsyncs, 1);
    r.flush_durable(now + Duration::from_secs(1), false)
        .unwrap();
    assert_eq!(r.durable_stats().unwrap().fsyncs, 2);
}

/// Delivers every outgoing message of each replica to the others, and runs timers, until
/// `done` holds or the virtual time runs out.
fn converge(
    reps: &mut [&mut Replica],
    mut now: Instant,
    done: impl Fn(&[&mut Replica]) -> bool,
) -> Instant {
    let end = now + Duration::from_secs(120);
    let start = now;
    while now < end {
        loop {
            let mut moved = false;
            for i in 0..reps.len() {
                while let Some(out) = reps[i].poll_outgoing() {
                    moved = true;
                    let from = reps[i].node();
                    let wall = WALL + (now - start).as_millis() as u64;
                    for (j, r) in reps.iter_mut().enumerate() {
                        if j != i {
                            r.handle_message(now, wall, from, &out.payload);
                        }
                    }
                }
                while reps[i].poll_event().is_some() {}
            }
            if !moved {
                break;
            }
        }
        if done(reps) {
            return now;
        }
        now += Duration::from_millis(20);
        let wall = WALL + (now - start).as_millis() as u64;
        for r in reps.iter_mut() {
            r.handle_timeout(now, wall);
        }
    }
    panic!("did not converge");
}

fn digest_of(r: &mut Replica, now: Instant) -> wire::Digest {
    r.handle_peer_up(now, 99);
    let later = now + Duration::from_secs(1);
    r.handle_timeout(later, WALL + 1000);
    while let Some(out) = r.poll_outgoing() {
        let env = wire::Envelope::decode(out.payload).unwrap();
        if let Some(wire::envelope::Body::Digest(d)) = env.body {
            return d;
        }
    }
    panic!("no digest sent");
}

#[test]
fn a_replica_with_loaded_data_is_not_fresh_and_an_empty_or_damaged_one_is() {
    let now = Instant::now();
    let dir = temp_dir("durable-fresh");
    let (mut empty, _) = open(dir.path(), 1, options(), now);
    assert!(digest_of(&mut empty, now).fresh, "nothing loaded: fresh");
    empty.put(WALL, "a", "1").unwrap();
    empty.put(WALL, "b", "1").unwrap();
    empty.put(WALL, "c", "1").unwrap();
    empty.flush_durable(now, false).unwrap();
    drop(empty);
    let (mut loaded, _) = open(dir.path(), 1, options(), now);
    assert!(
        !digest_of(&mut loaded, now).fresh,
        "loaded data is evidence"
    );
    drop(loaded);
    // Damage the middle record: the store may lack keys, so it must not claim otherwise.
    let path = wal(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let third = bytes.len() / 2;
    bytes[third] ^= 0xff;
    fs::write(&path, &bytes).unwrap();
    let (mut damaged, l) = open(dir.path(), 1, options(), now);
    assert!(l.damaged());
    assert!(digest_of(&mut damaged, now).fresh);
}

#[test]
fn a_restarted_replica_catches_up_and_a_deleted_key_stays_deleted() {
    let now = Instant::now();
    let dir = temp_dir("durable-catchup");
    let (mut a, _) = open(dir.path(), 1, options(), now);
    let mut b = Replica::new(cfg(2), now);
    a.handle_peer_up(now, 2);
    b.handle_peer_up(now, 1);
    for i in 0..100 {
        a.put(WALL, format!("k{i}"), "v1").unwrap();
    }
    a.delete(WALL, "k7").unwrap();
    a.flush_durable(now, false).unwrap();
    let now = converge(&mut [&mut a, &mut b], now, |r| {
        r[0].digest() == r[1].digest() && r[0].is_in_sync() && r[1].is_in_sync()
    });
    assert_eq!(contents(&a), contents(&b));
    // a goes away; b writes meanwhile, including deleting a key a holds.
    drop(a);
    b.handle_peer_down(now, 1);
    b.put(WALL + 5000, "k1", "v2").unwrap();
    b.delete(WALL + 5000, "k2").unwrap();
    b.put(WALL + 5000, "new", "n").unwrap();
    while b.poll_outgoing().is_some() {}

    let (mut a, loaded) = open(dir.path(), 1, options(), now);
    assert_eq!(loaded.entries.len(), 100, "99 values and 1 tombstone");
    a.handle_peer_up(now, 2);
    b.handle_peer_up(now, 1);
    converge(&mut [&mut a, &mut b], now, |r| {
        r[0].digest() == r[1].digest() && r[0].is_in_sync() && r[1].is_in_sync()
    });
    assert_eq!(contents(&a), contents(&b));
    assert_eq!(a.get("k1"), Some(Bytes::from_static(b"v2")));
    assert_eq!(a.get("k2"), None);
    assert_eq!(
        a.get("k7"),
        None,
        "the tombstone loaded from disk keeps k7 deleted"
    );
    assert_eq!(b.get("k7"), None);
    // What a learned from b was persisted too (relaxed path): a second restart has it.
    a.flush_durable(now, true).unwrap();
    let expect = contents(&a);
    drop(a);
    let (a, _) = open(dir.path(), 1, options(), now);
    assert_eq!(contents(&a), expect);
}

/// Figures for `docs/performance.md` (Durability): write latency and throughput per fsync
/// policy, group commit, and start-up time for 1 M keys. Not a timed assertion; run in
/// release:
/// `cargo test -p chorus-storage --release --test durable -- --ignored --nocapture`
/// (`CHORUS_BENCH_DIR` picks the file system; default the system temp dir).
#[test]
#[ignore = "measurement: run explicitly in release"]
fn durability_figures() {
    let base = std::env::var_os("CHORUS_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = |name: &str| {
        chorus_testkit::tempfile::Builder::new()
            .prefix(&format!("chorus-bench-{name}-"))
            .tempdir_in(&base)
            .unwrap()
    };
    let value = Bytes::from(vec![b'v'; 100]);
    let policies = [
        ("always", Fsync::Always, 2_000u64),
        (
            "interval:100",
            Fsync::Interval(Duration::from_millis(100)),
            50_000,
        ),
        ("never", Fsync::Never, 50_000),
    ];
    println!("| policy | writes | acknowledged writes/s | mean latency | fsyncs |");
    println!("|---|---:|---:|---:|---:|");
    for (name, fsync, n) in policies {
        let d = dir(name);
        let (mut r, _) = open(d.path(), 1, DiskOptions::new(fsync), Instant::now());
        let start = Instant::now();
        for i in 0..n {
            r.put(WALL + i, format!("key/{i:08}"), value.clone())
                .unwrap();
            // One write per flush: what a lone client that waits for each ack sees.
            r.flush_durable(Instant::now(), false).unwrap();
        }
        let took = start.elapsed();
        let s = r.durable_stats().unwrap();
        println!(
            "| {name} (1 write per flush) | {n} | {:.0} | {:.1} µs | {} |",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / n as f64,
            s.fsyncs
        );
    }
    {
        let d = dir("group");
        let (mut r, _) = open(d.path(), 1, DiskOptions::new(Fsync::Always), Instant::now());
        let n = 64_000u64;
        let start = Instant::now();
        for i in 0..n {
            r.put(WALL + i, format!("key/{i:08}"), value.clone())
                .unwrap();
            if i % 64 == 63 {
                r.flush_durable(Instant::now(), false).unwrap();
            }
        }
        let took = start.elapsed();
        println!(
            "| always, group commit of 64 | {n} | {:.0} | {:.1} µs per group | {} |",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / (n / 64) as f64,
            r.durable_stats().unwrap().fsyncs
        );
    }
    // Start-up with 1 M keys: once from the log alone, once from a snapshot.
    let d = dir("startup");
    let n = 1_000_000u64;
    let mut opts = DiskOptions::new(Fsync::Never);
    opts.compact_min_bytes = u64::MAX;
    let (mut r, _) = open(d.path(), 1, opts, Instant::now());
    for chunk in 0..n / 1000 {
        let ops = (0..1000)
            .map(|i| Op::put(format!("key/{:08}", chunk * 1000 + i), value.clone()))
            .collect();
        r.batch(WALL + chunk, ops).unwrap();
        r.flush_durable(Instant::now(), false).unwrap();
    }
    r.flush_durable(Instant::now(), true).unwrap();
    let wal_bytes = r.durable_stats().unwrap().wal_bytes;
    drop(r);
    let start = Instant::now();
    let (r, loaded) = open(d.path(), 1, opts, Instant::now());
    let from_log = start.elapsed();
    assert_eq!(loaded.entries.len(), n as usize);
    assert_eq!(r.store().len(), n as usize);
    // Compact: snapshot the whole store.
    let mut r = r;
    let entries = r.store().entries();
    let (mut log, _) = {
        drop(r);
        DiskLog::open(d.path(), DiskOptions::new(Fsync::Never)).unwrap()
    };
    let start = Instant::now();
    log.compact(&entries, WALL).unwrap();
    let snap_took = start.elapsed();
    let snap_bytes = log.stats().snapshot_bytes;
    drop(log);
    let start = Instant::now();
    let (r2, loaded) = open(d.path(), 1, opts, Instant::now());
    let from_snapshot = start.elapsed();
    assert_eq!(loaded.entries.len(), n as usize);
    r = r2;
    assert_eq!(r.store().len(), n as usize);
    println!();
    println!(
        "1 M keys (100 B values): start from the log ({} MB) {:.2} s; snapshot write ({} MB) {:.2} s; start from the snapshot {:.2} s",
        wal_bytes / 1_000_000,
        from_log.as_secs_f64(),
        snap_bytes / 1_000_000,
        snap_took.as_secs_f64(),
        from_snapshot.as_secs_f64()
    );
}

// ---- Damage, repair and record limits (issue 13) ----

/// A record of the previous on-disk format (`CHL1`): magic, length, crc32, payload.
fn chl1_record(r: &wire::LogRecord) -> Vec<u8> {
    let payload = r.encode_to_vec();
    let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&payload);
    [&b"CHL1"[..], &len, &crc.finalize().to_le_bytes(), &payload].concat()
}

/// A frame of the current format, written out from its description in `durable.rs`:
/// COBS(crc32("CHLOG2" ++ payload) LE ++ payload), then a zero byte.
fn chlog2_frame(r: &wire::LogRecord) -> Vec<u8> {
    let payload = r.encode_to_vec();
    let mut crc = crc32fast::Hasher::new();
    crc.update(b"CHLOG2");
    crc.update(&payload);
    let body = [&crc.finalize().to_le_bytes()[..], &payload].concat();
    let mut out = Vec::new();
    for block in body.split(|b| *b == 0) {
        let mut block = block;
        loop {
            let n = block.len().min(254);
            out.push(n as u8 + 1);
            out.extend_from_slice(&block[..n]);
            block = &block[n..];
            if n < 254 {
                break;
            }
        }
    }
    out.push(0);
    out
}

fn evil_record() -> wire::LogRecord {
    wire::LogRecord {
        wall_ms: WALL,
        entries: vec![wire::Entry {
            key: "evil".into(),
            hlc: chorus_replication::Hlc::new(WALL + 1_000_000, 0).0,
            node: 9,
            value: Some(Bytes::from_static(b"adopted from inside a value")),
            ..Default::default()
        }],
        removed: vec![wire::KeyVersion {
            key: "a".into(),
            hlc: 0,
            node: 0,
        }],
    }
}

/// A value that holds valid records of both formats, at several alignments.
fn forged_value() -> Vec<u8> {
    let mut v = Vec::new();
    for pad in 0..6 {
        v.extend(std::iter::repeat_n(b'.', pad));
        v.extend(chl1_record(&evil_record()));
        v.extend(b"CHLOG2\r\n\0");
        v.extend(chlog2_frame(&evil_record()));
    }
    v
}

#[test]
fn resync_after_damage_never_adopts_a_record_held_in_a_value() {
    let now = Instant::now();
    for offset in [0usize, 2, 5, 9, 13, 40] {
        let dir = temp_dir("durable-forged");
        let (mut r, _) = open(dir.path(), 1, options(), now);
        r.put(WALL, "a", "1").unwrap();
        r.flush_durable(now, false).unwrap();
        let host_at = fs::metadata(wal(dir.path())).unwrap().len() as usize;
        r.put(WALL + 1, "host", forged_value()).unwrap();
        r.put(WALL + 2, "after", "2").unwrap();
        r.flush_durable(now, false).unwrap();
        drop(r);
        let path = wal(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        // Damage the record that holds the value, near its start.
        bytes[host_at + offset] ^= 0x21;
        fs::write(&path, &bytes).unwrap();

        let (r, loaded) = open(dir.path(), 1, options(), now);
        assert!(loaded.damaged(), "offset {offset}");
        assert_eq!(
            r.get("evil"),
            None,
            "offset {offset}: a record inside a value was adopted"
        );
        assert_eq!(
            r.get("a"),
            Some(Bytes::from_static(b"1")),
            "offset {offset}"
        );
        assert_eq!(
            r.get("after"),
            Some(Bytes::from_static(b"2")),
            "offset {offset}"
        );
        assert_eq!(r.get("host"), None);
    }
}

/// Every entry of `dir` and below (relative path → bytes; directories as `None`).
fn tree(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_owned();
            if p.is_dir() {
                todo.push(p);
                out.insert(rel, None);
            } else {
                out.insert(rel, Some(fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// A data directory (generation 0, log only) whose middle record is damaged.
fn damaged_log_dir(name: &str) -> TempDir {
    let dir = temp_dir(name);
    let now = Instant::now();
    let (mut r, _) = open(dir.path(), 1, options(), now);
    for i in 0..5 {
        r.put(WALL + i, format!("k{i}"), format!("value-{i}"))
            .unwrap();
        r.flush_durable(now, false).unwrap();
    }
    drop(r);
    let path = wal(dir.path());
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    dir
}

#[test]
fn a_repair_blocked_by_a_directory_in_the_way_changes_nothing_and_says_so() {
    let dir = damaged_log_dir("blocked");
    // The repair's snapshot is written as snapshot-<1>.tmp: put a non-empty directory there.
    let obstacle = dir.path().join("snapshot-00000000000000000001.tmp");
    fs::create_dir(&obstacle).unwrap();
    fs::write(obstacle.join("keep"), b"x").unwrap();
    let before = tree(dir.path());

    let err = DiskLog::open(dir.path(), options()).unwrap_err();
    let text = err.to_string();
    match &err {
        DurableError::Repair {
            why, undo_error, ..
        } => {
            assert_eq!(*why, "is damaged");
            assert!(undo_error.is_none(), "{text}");
        }
        other => panic!("expected Repair, got {other:?}"),
    }
    assert!(text.contains("snapshot-00000000000000000001.tmp"), "{text}");
    assert!(text.contains("left exactly as it was"), "{text}");
    assert!(text.contains("move the directory away"), "{text}");
    assert_eq!(
        tree(dir.path()),
        before,
        "a failed repair changed the directory"
    );

    // With the obstacle gone the repair goes through: intact records kept, damaged log aside.
    fs::remove_dir_all(&obstacle).unwrap();
    let (log, loaded) = DiskLog::open(dir.path(), options()).unwrap();
    drop(log);
    assert!(loaded.damaged());
    assert_eq!(loaded.entries.len(), 4);
    assert!(dir.path().join("wal-00000000000000000000.corrupt").exists());
    let (_, again) = DiskLog::open(dir.path(), options()).unwrap();
    assert!(!again.damaged());
    assert_eq!(loaded_contents(&again), loaded_contents(&loaded));
}

#[test]
fn a_second_repair_keeps_the_first_ones_damaged_file() {
    let dir = damaged_log_dir("twice");
    // An earlier repair's file of the same name.
    fs::write(
        dir.path().join("wal-00000000000000000000.corrupt"),
        b"older",
    )
    .unwrap();
    let (log, loaded) = DiskLog::open(dir.path(), options()).unwrap();
    drop(log);
    assert!(loaded.damaged());
    assert_eq!(
        fs::read(dir.path().join("wal-00000000000000000000.corrupt")).unwrap(),
        b"older"
    );
    assert!(
        dir.path()
            .join("wal-00000000000000000000.corrupt.1")
            .exists()
    );
}

#[test]
fn many_tombstones_collected_at_once_reload_cleanly() {
    let dir = temp_dir("durable-tombstones");
    let now = Instant::now();
    let mut c = cfg(1);
    c.tombstone_grace = Duration::from_secs(1);
    let mut opts = DiskOptions::new(Fsync::Never);
    opts.compact_min_bytes = u64::MAX;
    let (log, loaded) = DiskLog::open(dir.path(), opts).unwrap();
    let mut r = Durable::new(Replica::restore(c.clone(), now, WALL, loaded), log);
    let n = 3000;
    for i in 0..n {
        r.put(WALL, format!("{i:0>300}"), "v").unwrap();
    }
    r.put(WALL, "kept", "v").unwrap();
    for i in 0..n {
        r.delete(WALL, format!("{i:0>300}")).unwrap();
    }
    while r.poll_event().is_some() {}
    // One digest timer later, past the grace: every tombstone is collected at once.
    r.handle_timeout(now + Duration::from_secs(60), WALL + 60_000);
    assert_eq!(r.stats().tombstones_collected, n);
    r.flush_durable(now, true).unwrap();
    drop(r);

    let (log, loaded) = DiskLog::open(dir.path(), opts).unwrap();
    assert!(!loaded.damaged());
    assert_eq!(loaded.report.torn_tail_bytes, 0);
    let keys: Vec<&str> = loaded.entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(keys, ["kept"], "every collected tombstone stays collected");
    // No frame (the bytes between two zero bytes) grows with the number collected.
    drop(log);
    let bytes = fs::read(wal(dir.path())).unwrap();
    let largest = bytes.split(|b| *b == 0).map(<[u8]>::len).max().unwrap();
    assert!(largest < 128 * 1024, "largest record {largest} B");
}

#[test]
fn a_removal_record_larger_than_the_old_64_mib_limit_loads() {
    // The previous loader rejected any record over 64 MiB, which a tombstone collection
    // can exceed: the record was then taken for a torn tail and the removals were lost.
    let dir = temp_dir("durable-huge-removal");
    let opts = DiskOptions::new(Fsync::Never);
    let (mut log, _) = DiskLog::open(dir.path(), opts).unwrap();
    let version = chorus_replication::Hlc::new(WALL, 0).0;
    let put = |key: &str| wire::LogRecord {
        wall_ms: WALL,
        entries: vec![wire::Entry {
            key: key.into(),
            hlc: version,
            node: 1,
            value: Some(Bytes::from_static(b"v")),
            ..Default::default()
        }],
        removed: vec![],
    };
    log.append(1, &put("victim"), Origin::Local);
    let key = "k".repeat(1000);
    let mut removed: Vec<wire::KeyVersion> = (0..68_000)
        .map(|_| wire::KeyVersion {
            key: key.clone(),
            hlc: version,
            node: 1,
        })
        .collect();
    removed.push(wire::KeyVersion {
        key: "victim".into(),
        hlc: version,
        node: 1,
    });
    let huge = wire::LogRecord {
        wall_ms: WALL,
        entries: vec![],
        removed,
    };
    assert!(huge.encoded_len() > 64 << 20);
    log.append(2, &huge, Origin::Remote);
    drop(huge);
    log.append(3, &put("after"), Origin::Local);
    log.flush(Instant::now(), FlushMode::SyncAll).unwrap();
    drop(log);

    let (_, loaded) = DiskLog::open(dir.path(), opts).unwrap();
    assert!(!loaded.damaged(), "{:?}", loaded.report);
    assert_eq!(loaded.report.torn_tail_bytes, 0);
    let keys: Vec<&str> = loaded.entries.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(keys, ["after"]);
}

const MAX_GEN: &str = "18446744073709551615";

/// A data directory whose only snapshot and log have generation `u64::MAX`.
fn max_generation_dir(name: &str) -> TempDir {
    let dir = temp_dir(name);
    let now = Instant::now();
    let mut o = DiskOptions::new(Fsync::Always);
    o.compact_min_bytes = 0;
    let (mut r, _) = open(dir.path(), 1, o, now);
    for i in 0..3 {
        r.put(WALL + i, format!("k{i}"), "v").unwrap();
    }
    // Threshold 0: this flush compacts.
    r.flush_durable(now, false).unwrap();
    // Five records in the log: damage to its middle is followed by valid records.
    for i in 3..8 {
        r.put(WALL + 10 + i, format!("k{i}"), "v").unwrap();
        r.flush_durable(now, false).unwrap();
    }
    drop(r);
    let snap = files(dir.path(), "snapshot-").pop().unwrap();
    let log = wal(dir.path());
    fs::rename(snap, dir.path().join(format!("snapshot-{MAX_GEN}"))).unwrap();
    fs::rename(log, dir.path().join(format!("wal-{MAX_GEN}"))).unwrap();
    dir
}

#[test]
fn a_snapshot_at_generation_u64_max_fails_cleanly_instead_of_overflowing() {
    let dir = max_generation_dir("maxgen");
    let now = Instant::now();
    let (log, loaded) = DiskLog::open(dir.path(), DiskOptions::new(Fsync::Always)).unwrap();
    assert_eq!(loaded.report.generation, u64::MAX);
    let mut log = log;
    let entries: BTreeMap<String, Entry> = BTreeMap::new();
    let err = log.compact(&entries, WALL).unwrap_err();
    assert!(err.to_string().contains("u64::MAX"), "{err}");
    let stats = log.stats();
    assert_eq!((stats.compaction_errors, stats.failed), (1, 0));
    // The log stays in use.
    drop(log);
    let (mut r, _) = open(dir.path(), 1, options(), now);
    r.put(WALL + 20, "k8", "v").unwrap();
    r.flush_durable(now, false).unwrap();
    drop(r);
    let (_, loaded) = DiskLog::open(dir.path(), options()).unwrap();
    assert_eq!(loaded.entries.len(), 9);
}

#[test]
fn a_damaged_directory_at_generation_u64_max_is_reported_not_overflowed() {
    let dir = max_generation_dir("maxgen-damaged");
    let path = dir.path().join(format!("wal-{MAX_GEN}"));
    let mut bytes = fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(&path, &bytes).unwrap();
    let before = tree(dir.path());
    let err = DiskLog::open(dir.path(), options()).unwrap_err();
    assert!(matches!(err, DurableError::Repair { .. }), "{err:?}");
    assert!(err.to_string().contains("u64::MAX"), "{err}");
    assert_eq!(tree(dir.path()), before);
}

#[test]
fn a_directory_of_the_previous_format_is_loaded_and_rewritten() {
    let dir = temp_dir("durable-chl1");
    let entry = |key: &str, t: u64, value: Option<&'static [u8]>| wire::LogRecord {
        wall_ms: WALL + t,
        entries: vec![wire::Entry {
            key: key.into(),
            hlc: chorus_replication::Hlc::new(WALL + t, 0).0,
            node: 1,
            value: value.map(Bytes::from_static),
            ..Default::default()
        }],
        removed: vec![],
    };
    let old = [
        chl1_record(&entry("a", 1, Some(b"1"))),
        chl1_record(&entry("b", 2, Some(b"2"))),
        chl1_record(&entry("a", 3, None)),
    ]
    .concat();
    fs::write(dir.path().join("wal-00000000000000000000"), &old).unwrap();
    let (log, loaded) = DiskLog::open(dir.path(), options()).unwrap();
    drop(log);
    assert!(!loaded.damaged(), "{:?}", loaded.report);
    let expect = loaded_contents(&loaded);
    assert_eq!(expect.len(), 2);
    assert_eq!(expect["a"].0, None, "the tombstone is kept");
    assert_eq!(expect["b"].0.as_deref(), Some(&b"2"[..]));
    assert!(!dir.path().join("wal-00000000000000000000").exists());
    let snap = files(dir.path(), "snapshot-").pop().unwrap();
    assert!(fs::read(snap).unwrap().starts_with(b"CHLOG2\r\n\0"));
    let (_, again) = DiskLog::open(dir.path(), options()).unwrap();
    assert_eq!(loaded_contents(&again), expect);
    assert_eq!(again.report.generation, 1);
}

#[test]
fn a_data_file_that_is_not_a_regular_file_is_refused_not_read_forever() {
    // A symbolic link to /dev/zero in place of the log: reading it would never end (and
    // fill memory). Open refuses it and names it.
    let dir = temp_dir("durable-devzero");
    let path = dir.path().join("wal-00000000000000000000");
    std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
    let err = DiskLog::open(dir.path(), options()).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("not a regular file"), "{text}");
    assert!(text.contains("wal-00000000000000000000"), "{text}");
}

#[test]
fn walking_the_store_in_chunks_gives_every_entry_in_key_order() {
    use chorus_storage::SnapshotSource;
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    for i in 0..2000 {
        r.put(WALL + i, format!("k/{}", (i * 7919) % 2000), "v")
            .unwrap();
    }
    r.delete(WALL + 5000, "k/5").unwrap();
    let store = r.store().clone();
    assert_eq!(store.entry_count(), 2000);
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let chunk = SnapshotSource::entries_after(&store, cursor.as_deref(), 333);
        assert!(chunk.len() <= 333);
        let Some(last) = chunk.last() else { break };
        cursor = Some(last.0.clone());
        walked.extend(chunk);
    }
    let expect: Vec<(String, Entry)> = store.entries().into_iter().collect();
    assert_eq!(
        walked, expect,
        "every entry once, tombstones included, in key order"
    );
}
