//! Unit tests of the file format, replay, repair and compaction (moved from the replication
//! crate's `durable.rs`), and of the crash points of compaction.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use bytes::Bytes;
use chorus_replication::{
    DurableError, Entry, Fsync, Hlc, LoadReport, MergedState, Origin, Version, wire,
};
use proptest::prelude::*;
use prost::Message as _;

use crate::files::FAULTS;
use crate::record::{
    FILE_HEADER, LEGACY_HEADER, LEGACY_MAGIC, SNAPSHOT_CHUNK, cobs_decode, cobs_encode,
    encode_frame,
};
use crate::replay::{Loader, Scan, replay};
use crate::{DiskLog, DiskOptions, FlushMode, SnapshotSource};

/// The store being rebuilt while loading: key → (value or tombstone, version).
type State = HashMap<String, (Option<Bytes>, Version)>;

fn state_of(merged: MergedState) -> State {
    merged
        .into_sorted()
        .0
        .into_iter()
        .map(|(k, v, ver, _)| (k, (v, ver)))
        .collect()
}

const WALL: u64 = 1_700_000_000_000;

fn entry(key: &str, t: u64, value: &[u8]) -> wire::Entry {
    wire::Entry {
        key: key.into(),
        hlc: Hlc::new(t, 0).0,
        node: 1,
        value: Some(Bytes::copy_from_slice(value)),
        ..Default::default()
    }
}

fn record(entries: Vec<wire::Entry>) -> wire::LogRecord {
    wire::LogRecord {
        wall_ms: WALL,
        entries,
        removed: vec![],
    }
}

fn frame(r: &wire::LogRecord) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(r, &mut Vec::new(), &mut out);
    out
}

fn rec(key: &str, t: u64) -> Vec<u8> {
    frame(&record(vec![entry(key, t, b"v")]))
}

/// A record of the previous format (`CHL1`).
fn legacy(r: &wire::LogRecord) -> Vec<u8> {
    let payload = r.encode_to_vec();
    let len = u32::try_from(payload.len()).unwrap().to_le_bytes();
    let mut crc = crc32fast::Hasher::new();
    crc.update(&len);
    crc.update(&payload);
    [
        &LEGACY_MAGIC[..],
        &len,
        &crc.finalize().to_le_bytes(),
        &payload,
    ]
    .concat()
}

fn file(frames: &[Vec<u8>]) -> Vec<u8> {
    [&[FILE_HEADER.to_vec()], frames].concat().concat()
}

fn load(bytes: &[u8]) -> (State, LoadReport, Scan) {
    let mut loader = Loader {
        state: MergedState::new(),
        report: LoadReport::default(),
    };
    let scan = replay(bytes, Path::new("t"), &mut loader);
    (state_of(loader.state), loader.report, scan)
}

#[test]
fn scan_skips_a_damaged_middle_record_and_stops_at_a_torn_tail() {
    let (a, b, c) = (rec("a", 1), rec("b", 2), rec("c", 3));
    let mut bytes = file(&[a.clone(), b.clone(), c.clone()]);
    bytes[FILE_HEADER.len() + a.len() + 2] ^= 0x40;
    let (state, report, scan) = load(&bytes);
    assert!(state.contains_key("a") && state.contains_key("c") && !state.contains_key("b"));
    assert_eq!(report.corrupt_records, 1);
    assert_eq!(report.corrupt_bytes, b.len() as u64);
    assert!(scan.damaged);
    assert_eq!(scan.torn_tail, 0);

    let whole = file(&[a.clone(), b.clone(), c]);
    let cut = &whole[..whole.len() - 3];
    let (state, report, scan) = load(cut);
    assert_eq!(state.len(), 2);
    assert_eq!(report.corrupt_records, 0);
    assert_eq!(scan.valid_end, FILE_HEADER.len() + a.len() + b.len());
    assert_eq!(scan.torn_tail, cut.len() - scan.valid_end);
}

#[test]
fn a_frame_that_lost_only_its_delimiter_is_torn() {
    let (a, b) = (rec("a", 1), rec("b", 2));
    let whole = file(&[a, b]);
    let (state, report, scan) = load(&whole[..whole.len() - 1]);
    assert_eq!(state.len(), 1, "b is not adopted without its delimiter");
    assert_eq!(report.corrupt_records, 0);
    assert!(scan.torn_tail > 0);
}

#[test]
fn records_of_the_previous_format_load_up_to_the_first_bad_one() {
    let (a, b, c) = (
        legacy(&record(vec![entry("a", 1, b"1")])),
        legacy(&record(vec![entry("b", 2, b"2")])),
        legacy(&record(vec![entry("c", 3, b"3")])),
    );
    let (state, report, scan) = load(&[a.clone(), b.clone(), c.clone()].concat());
    assert_eq!(state.len(), 3);
    assert!(scan.legacy && !scan.damaged && scan.torn_tail == 0);
    assert_eq!(report.records, 3);

    let mut bytes = [a.clone(), b.clone(), c.clone()].concat();
    bytes[a.len() + LEGACY_HEADER + 1] ^= 0x10;
    let (state, report, scan) = load(&bytes);
    assert!(state.contains_key("a") && !state.contains_key("b"));
    assert!(
        !state.contains_key("c"),
        "nothing after a bad CHL1 record is adopted"
    );
    assert!(scan.damaged && report.corrupt_records == 1);

    let whole = [a, b].concat();
    let (state, _, scan) = load(&whole[..whole.len() - 2]);
    assert_eq!(state.len(), 1);
    assert!(!scan.damaged && scan.torn_tail > 0);
}

/// A value holding what would be a valid record in either format, at every alignment.
fn forged_value() -> Vec<u8> {
    let evil = record(vec![entry("evil", 9, b"adopted")]);
    let mut value = Vec::new();
    for pad in 0..8 {
        value.extend(std::iter::repeat_n(0xAB, pad));
        value.extend(legacy(&evil));
        value.push(0);
        value.extend(frame(&evil));
        value.extend(FILE_HEADER);
        value.extend(frame(&evil));
    }
    value
}

#[test]
fn resync_never_takes_bytes_inside_a_value_for_a_record() {
    let host = frame(&record(vec![entry("host", 5, &forged_value())]));
    let (a, c, d) = (rec("a", 1), rec("c", 3), rec("d", 4));
    let clean = file(&[a.clone(), host.clone(), c, d]);
    let (state, _, _) = load(&clean);
    assert_eq!(state.len(), 4);
    let delimiter = FILE_HEADER.len() + a.len() + host.len() - 1;
    let start = FILE_HEADER.len() + a.len();
    // Damage every byte of the record that holds the value, one at a time.
    for at in start..start + host.len() {
        for flip in [0x01, 0x80, 0xFF] {
            let mut bytes = clean.clone();
            bytes[at] ^= flip;
            let (state, report, scan) = load(&bytes);
            assert!(
                !state.contains_key("evil"),
                "adopted a record inside a value (byte {at} ^ {flip:#x})"
            );
            assert!(
                state.contains_key("a") && state.contains_key("d"),
                "byte {at}"
            );
            // A damaged delimiter joins the next frame to the damaged one.
            assert_eq!(state.contains_key("c"), at != delimiter, "byte {at}");
            assert!(scan.damaged && report.corrupt_records >= 1, "byte {at}");
        }
    }
}

#[test]
fn a_previous_format_file_never_adopts_a_record_inside_a_value() {
    let host = legacy(&record(vec![entry("host", 5, &forged_value())]));
    let a = legacy(&record(vec![entry("a", 1, b"1")]));
    let clean = [a.clone(), host.clone()].concat();
    for at in [a.len(), a.len() + 5, a.len() + LEGACY_HEADER + 3] {
        let mut bytes = clean.clone();
        bytes[at] ^= 0x55;
        let (state, _, scan) = load(&bytes);
        assert!(!state.contains_key("evil"), "byte {at}");
        assert!(state.contains_key("a"));
        assert!(
            scan.damaged,
            "a later valid-looking record marks the file damaged"
        );
    }
}

proptest! {
    #[test]
    fn cobs_round_trips_and_holds_no_zero(
        data in prop::collection::vec(prop_oneof![Just(0u8), Just(0xFFu8), any::<u8>()], 0..1200)
    ) {
        let mut enc = Vec::new();
        cobs_encode(&data, &mut enc);
        prop_assert!(!enc.contains(&0));
        prop_assert!(enc.len() <= data.len() + data.len() / 254 + 1);
        let mut dec = Vec::new();
        prop_assert!(cobs_decode(&enc, &mut dec).is_some());
        prop_assert_eq!(dec, data);
    }

    #[test]
    fn any_bytes_load_without_panic_and_within_their_size(
        bytes in prop::collection::vec(any::<u8>(), 0..600),
        header in any::<bool>(),
    ) {
        let bytes = if header { [&FILE_HEADER[..], &bytes].concat() } else { bytes };
        let (state, report, scan) = load(&bytes);
        prop_assert!(scan.valid_end + scan.torn_tail <= bytes.len());
        prop_assert!(report.corrupt_bytes <= bytes.len() as u64);
        prop_assert!(state.keys().map(String::len).sum::<usize>() <= bytes.len());
    }

    #[test]
    fn damage_to_a_log_never_adopts_a_foreign_record(
        values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..6),
        at in any::<prop::sample::Index>(),
        flip in 1u8..,
    ) {
        let mut frames = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let mut v = v.clone();
            v.extend(forged_value());
            frames.push(frame(&record(vec![entry(&format!("k{i}"), i as u64 + 1, &v)])));
        }
        let mut bytes = file(&frames);
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        let (state, _, _) = load(&bytes);
        prop_assert!(!state.contains_key("evil"));
        for (k, (v, _)) in &state {
            let i: usize = k[1..].parse().unwrap();
            prop_assert_eq!(&v.as_ref().unwrap()[..values[i].len()], &values[i][..]);
        }
    }
}

#[test]
fn a_record_claiming_many_entries_costs_only_what_it_holds() {
    // 200 000 empty entries (2 bytes each on disk) are skipped one by one: none is
    // kept, and no vector of 200 000 decoded entries is built first.
    let mut payload = Vec::new();
    for _ in 0..200_000 {
        payload.extend_from_slice(&[0x12, 0x00]);
    }
    let mut loader = Loader {
        state: MergedState::new(),
        report: LoadReport::default(),
    };
    loader.apply(&payload).unwrap();
    assert!(loader.state.is_empty());
    // A length beyond the record is an error, not an allocation.
    assert!(loader.apply(&[0x12, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]).is_err());
    assert!(loader.apply(&[0x08]).is_err());
}

#[test]
fn the_apply_walker_reads_what_prost_writes() {
    let r = wire::LogRecord {
        wall_ms: WALL + 5,
        entries: vec![
            entry("a", 1, b"x"),
            entry("b", 2, b""),
            wire::Entry {
                key: "t".into(),
                hlc: Hlc::new(3, 0).0,
                node: 7,
                value: None,
                ..Default::default()
            },
        ],
        removed: vec![wire::KeyVersion {
            key: "a".into(),
            hlc: Hlc::new(1, 0).0,
            node: 1,
        }],
    };
    let mut loader = Loader {
        state: MergedState::new(),
        report: LoadReport::default(),
    };
    loader.apply(&r.encode_to_vec()).unwrap();
    assert_eq!(loader.state.last_wall_ms(), WALL + 5);
    assert!(!loader.state.contains_key("a"), "removed at its version");
    assert_eq!(loader.state.get("b").unwrap().0.as_deref(), Some(&b""[..]));
    assert_eq!(loader.state.get("t").unwrap().0, None);
    assert_eq!(loader.state.get("t").unwrap().1.node, 7);
    assert_eq!(loader.report.records, 1);
}

#[test]
fn many_removals_at_once_are_split_into_bounded_records() {
    let dir = TempDir::new("split");
    let (mut log, _) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
    let removed: Vec<wire::KeyVersion> = (0..5000)
        .map(|i| wire::KeyVersion {
            key: format!("{i:0>200}"),
            hlc: Hlc::new(1, 0).0,
            node: 1,
        })
        .collect();
    log.append(
        1,
        &wire::LogRecord {
            wall_ms: WALL,
            entries: vec![],
            removed,
        },
        Origin::Remote,
    );
    let frames: Vec<&[u8]> = log
        .buf
        .split(|b| *b == 0)
        .filter(|f| !f.is_empty())
        .collect();
    assert!(frames.len() >= 15, "{} frames", frames.len());
    assert!(frames.iter().all(|f| f.len() <= SNAPSHOT_CHUNK + 1024));
    assert_eq!(log.stats.records_written, frames.len() as u64);
}

#[test]
fn fsync_policy_parses_and_prints() {
    for s in ["always", "never", "interval:250"] {
        assert_eq!(s.parse::<Fsync>().unwrap().to_string(), s);
    }
    assert!("interval:0".parse::<Fsync>().is_err());
    assert!("sometimes".parse::<Fsync>().is_err());
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!(
            "chorus-durable-unit-{name}-{}-{n}",
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every file of `dir` (name → bytes; directories as empty).
fn snapshot_of(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let bytes = if e.file_type().unwrap().is_file() {
                fs::read(e.path()).unwrap()
            } else {
                Vec::new()
            };
            (name, bytes)
        })
        .collect()
}

/// A data directory whose log and snapshot are both damaged (so a repair sets two files
/// aside), with `k0..k9` intact besides.
fn damaged_dir(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    let opts = DiskOptions::new(Fsync::Never);
    let (mut log, _) = DiskLog::open(&dir.0, opts).unwrap();
    let mut store = BTreeMap::new();
    for i in 0..10u64 {
        store.insert(
            format!("k{i}"),
            Entry {
                value: Some(Bytes::from(vec![b'v'; 40_000])),
                version: Version {
                    hlc: Hlc::new(WALL + i, 0),
                    node: 1,
                },
                revision: 0,
                flags: 0,
                owner: None,
            },
        );
    }
    log.compact(&store, WALL).unwrap();
    for i in 0..5u64 {
        log.append(
            i + 1,
            &record(vec![entry(&format!("w{i}"), WALL + 100 + i, b"x")]),
            Origin::Remote,
        );
        log.flush(Instant::now(), FlushMode::SyncAll).unwrap();
    }
    drop(log);
    for prefix in ["snapshot-", "wal-"] {
        let path = fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_str().unwrap().starts_with(prefix))
            .unwrap();
        let mut bytes = fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5A;
        fs::write(&path, &bytes).unwrap();
    }
    dir
}

const REPAIR_STEPS: &[(&str, usize)] = &[
    ("create snapshot", 0),
    ("write snapshot", 0),
    ("fsync snapshot", 0),
    ("rename snapshot", 0),
    ("fsync directory", 0),
    ("create log", 0),
    ("write log", 0),
    ("fsync log", 0),
    ("fsync directory again", 0),
    ("set aside", 0),
    ("set aside", 1),
    ("fsync directory after setting aside", 0),
];

#[test]
fn a_repair_that_fails_at_any_step_leaves_the_directory_as_it_was() {
    for &(step_name, skip) in REPAIR_STEPS {
        let dir = damaged_dir("fault");
        let before = snapshot_of(&dir.0);
        FAULTS.with(|f| *f.borrow_mut() = vec![(step_name, skip)]);
        let err = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap_err();
        FAULTS.with(|f| f.borrow_mut().clear());
        match &err {
            DurableError::Repair {
                why, undo_error, ..
            } => {
                assert_eq!(*why, "is damaged");
                assert!(undo_error.is_none(), "{step_name}: {err}");
            }
            other => panic!("{step_name}: expected Repair, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(step_name), "{text}");
        assert!(text.contains("left exactly as it was"), "{text}");
        assert_eq!(
            snapshot_of(&dir.0),
            before,
            "{step_name} #{skip}: directory changed"
        );

        // Once the cause is gone the repair goes through.
        let (log, loaded) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
        assert!(loaded.damaged());
        drop(log);
        let names: Vec<String> = snapshot_of(&dir.0).into_keys().collect();
        assert_eq!(
            names.iter().filter(|n| n.ends_with(".corrupt")).count(),
            2,
            "{names:?}"
        );
        let (_, again) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
        assert!(!again.damaged());
        assert_eq!(again.entries, loaded.entries);
    }
}

#[test]
fn a_failed_undo_is_reported_as_such() {
    let dir = damaged_dir("undo");
    FAULTS.with(|f| *f.borrow_mut() = vec![("set aside", 1), ("undo rename", 0)]);
    let err = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap_err();
    FAULTS.with(|f| f.borrow_mut().clear());
    let DurableError::Repair { undo_error, .. } = &err else {
        panic!("expected Repair, got {err:?}");
    };
    assert!(undo_error.is_some());
    let text = err.to_string();
    assert!(
        text.contains("undoing the partial repair failed too"),
        "{text}"
    );
    // Whatever was left, the next start finds every intact entry.
    let (_, loaded) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Never)).unwrap();
    assert!(loaded.entries.len() >= 10, "{}", loaded.entries.len());
}

#[test]
fn a_compaction_that_fails_is_undone_and_the_old_log_stays_in_use() {
    for &(step_name, _) in &REPAIR_STEPS[..9] {
        let dir = TempDir::new("compact-fault");
        let opts = DiskOptions::new(Fsync::Never);
        let (mut log, _) = DiskLog::open(&dir.0, opts).unwrap();
        log.append(1, &record(vec![entry("a", WALL, b"1")]), Origin::Local);
        log.flush(Instant::now(), FlushMode::SyncAll).unwrap();
        let before = snapshot_of(&dir.0);
        FAULTS.with(|f| *f.borrow_mut() = vec![(step_name, 0)]);
        let store: BTreeMap<String, Entry> = BTreeMap::new();
        assert!(log.compact(&store, WALL).is_err(), "{step_name}");
        FAULTS.with(|f| f.borrow_mut().clear());
        assert_eq!(snapshot_of(&dir.0), before, "{step_name}");
        assert_eq!(log.stats.failed, 0, "{step_name}: undone, not failed");
        log.append(2, &record(vec![entry("b", WALL, b"2")]), Origin::Local);
        log.flush(Instant::now(), FlushMode::SyncAll).unwrap();
        drop(log);
        let (_, loaded) = DiskLog::open(&dir.0, opts).unwrap();
        let keys: Vec<&str> = loaded.entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(keys, ["a", "b"], "{step_name}");
    }
}

// ---- Compaction off the driver: fuzzy snapshots and crash points ----

/// A change to the model store, as the replica makes them: a put that wins only over an
/// older version, or the removal of whatever version the key holds (a collected tombstone, a
/// forgotten key).
#[derive(Debug, Clone)]
enum Change {
    Put { key: u8, t: u64, tombstone: bool },
    Remove { key: u8 },
}

/// Applies `change` to `store`; returns the record it commits, if it changed anything.
fn commit(store: &mut BTreeMap<String, Entry>, change: &Change) -> Option<wire::LogRecord> {
    match *change {
        Change::Put { key, t, tombstone } => {
            let key = format!("k{key:02}");
            let version = Version {
                hlc: Hlc::new(WALL + t, 0),
                node: 1,
            };
            if store.get(&key).is_some_and(|e| e.version >= version) {
                return None;
            }
            let value = (!tombstone).then(|| Bytes::from(format!("v{t}")));
            store.insert(
                key.clone(),
                Entry {
                    value: value.clone(),
                    version,
                    revision: 0,
                    flags: 0,
                    owner: None,
                },
            );
            Some(record(vec![wire::Entry {
                key,
                hlc: version.hlc.0,
                node: 1,
                value,
                ..Default::default()
            }]))
        }
        Change::Remove { key } => {
            let key = format!("k{key:02}");
            let e = store.remove(&key)?;
            Some(wire::LogRecord {
                wall_ms: WALL,
                entries: vec![],
                removed: vec![wire::KeyVersion {
                    key,
                    hlc: e.version.hlc.0,
                    node: e.version.node,
                }],
            })
        }
    }
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        3 => (0u8..12, 0u64..40, any::<bool>())
            .prop_map(|(key, t, tombstone)| Change::Put { key, t, tombstone }),
        1 => (0u8..12).prop_map(|key| Change::Remove { key }),
    ]
}

fn contents_of(store: &BTreeMap<String, Entry>) -> State {
    store
        .iter()
        .map(|(k, e)| (k.clone(), (e.value.clone(), e.version)))
        .collect()
}

proptest! {
    /// A snapshot read a chunk at a time while the store keeps changing (each key at some
    /// state at or after the cut), followed by every record committed after the cut, gives
    /// exactly the final store: what makes compaction off the driver exact.
    #[test]
    fn a_fuzzy_snapshot_plus_the_records_after_the_cut_is_exact(
        before in prop::collection::vec(change(), 0..40),
        during in prop::collection::vec((change(), 0usize..4), 0..60),
        after in prop::collection::vec(change(), 0..20),
        chunk in 1usize..5,
    ) {
        let mut store = BTreeMap::new();
        for c in &before {
            commit(&mut store, c);
        }
        // The cut: from here every record goes to the new log.
        let mut new_log = Vec::new();
        let mut snapshot = MergedState::new();
        let mut cursor: Option<String> = None;
        let mut during = during.into_iter();
        loop {
            let part = SnapshotSource::entries_after(&store, cursor.as_deref(), chunk);
            if part.is_empty() {
                break;
            }
            for (k, e) in part {
                snapshot.merge_entry(wire::Entry {
                    key: k.clone(),
                    hlc: e.version.hlc.0,
                    node: e.version.node,
                    value: e.value,
                    ..Default::default()
                });
                cursor = Some(k);
            }
            // Changes between two reads of the store.
            if let Some((c, more)) = during.next() {
                new_log.extend(commit(&mut store, &c));
                for (c, _) in during.by_ref().take(more) {
                    new_log.extend(commit(&mut store, &c));
                }
            }
        }
        for (c, _) in during {
            new_log.extend(commit(&mut store, &c));
        }
        for c in &after {
            new_log.extend(commit(&mut store, c));
        }
        for r in &new_log {
            snapshot.merge_record(r);
        }
        prop_assert_eq!(state_of(snapshot), contents_of(&store));
    }
}

/// A log with `n` small entries in the store and in the log (the store mirrors what the log
/// holds, as the node's store does), ready to compact in several steps.
fn log_with_entries(dir: &Path, n: u64) -> (DiskLog, BTreeMap<String, Entry>, u64) {
    let (mut log, _) = DiskLog::open(dir, DiskOptions::new(Fsync::Always)).unwrap();
    let mut store = BTreeMap::new();
    let mut seq = 0;
    for i in 0..n {
        seq += 1;
        let key = format!("key/{i:06}");
        let version = Version {
            hlc: Hlc::new(WALL + i, 0),
            node: 1,
        };
        store.insert(
            key.clone(),
            Entry {
                value: Some(Bytes::from_static(b"v")),
                version,
                revision: 0,
                flags: 0,
                owner: None,
            },
        );
        log.append(
            seq,
            &record(vec![entry(&key, WALL + i, b"v")]),
            Origin::Local,
        );
    }
    log.flush(Instant::now(), FlushMode::SyncAll).unwrap();
    (log, store, seq)
}

/// Commits a change to `store` and appends its record to `log`, as the node and the storage
/// thread do during a compaction.
fn write_during(
    log: &mut DiskLog,
    store: &mut BTreeMap<String, Entry>,
    seq: &mut u64,
    change: &Change,
) {
    if let Some(r) = commit(store, change) {
        *seq += 1;
        log.append(*seq, &r, Origin::Local);
        log.flush(Instant::now(), FlushMode::Policy).unwrap();
        assert_eq!(log.through(), *seq, "acknowledged during the compaction");
    }
}

fn reload(dir: &Path) -> State {
    let (_, loaded) = DiskLog::open(dir, DiskOptions::new(Fsync::Always)).unwrap();
    assert!(!loaded.damaged());
    loaded
        .entries
        .into_iter()
        .map(|(k, v, ver, _)| (k, (v, ver)))
        .collect()
}

fn changes_during() -> Vec<Change> {
    vec![
        Change::Put {
            key: 1,
            t: 50_000,
            tombstone: false,
        },
        Change::Put {
            key: 2,
            t: 50_001,
            tombstone: true,
        },
        Change::Remove { key: 2 },
        Change::Put {
            key: 3,
            t: 50_002,
            tombstone: false,
        },
    ]
}

#[test]
fn a_crash_at_any_point_of_a_compaction_loads_every_acknowledged_write() {
    // Crash points: right after the start, after each chunk (writes in between), and after
    // the new snapshot is installed but before the old pair is deleted.
    for crash_after_steps in 0..5usize {
        let dir = TempDir::new("compact-crash");
        let (mut log, mut store, mut seq) = log_with_entries(&dir.0, 10_000);
        log.start_compaction(WALL).unwrap();
        let mut changes = changes_during().into_iter();
        let mut done = false;
        for _ in 0..crash_after_steps {
            if let Some(c) = changes.next() {
                write_during(&mut log, &mut store, &mut seq, &c);
            }
            if log.continue_compaction(&store).unwrap() == crate::Compacting::Done {
                done = true;
                break;
            }
        }
        if let Some(c) = changes.next() {
            write_during(&mut log, &mut store, &mut seq, &c);
        }
        let compacting = log.is_compacting();
        drop(log); // the process dies here: nothing is cleaned up
        assert_eq!(
            reload(&dir.0),
            contents_of(&store),
            "crash after {crash_after_steps} steps (installed: {done})"
        );
        let names: Vec<String> = snapshot_of(&dir.0).into_keys().collect();
        assert!(
            !names.iter().any(|n| n.ends_with(".tmp")),
            "{names:?}: the interrupted snapshot is removed"
        );
        if compacting {
            // The next generation's log without its snapshot is ignored (and its records
            // were in the old log too); the next compaction numbers above it.
            assert!(
                names.iter().any(|n| n == "wal-00000000000000000001"),
                "{names:?}"
            );
        }
        // The directory stays usable: write, compact, reload.
        let (mut log, _) = DiskLog::open(&dir.0, DiskOptions::new(Fsync::Always)).unwrap();
        let mut seq = 0;
        write_during(
            &mut log,
            &mut store,
            &mut seq,
            &Change::Put {
                key: 9,
                t: 60_000,
                tombstone: false,
            },
        );
        log.compact(&store, WALL).unwrap();
        drop(log);
        assert_eq!(reload(&dir.0), contents_of(&store));
    }
}

#[test]
fn old_files_left_by_a_crash_after_the_install_are_removed_at_the_next_start() {
    let dir = TempDir::new("compact-old-left");
    let (mut log, mut store, mut seq) = log_with_entries(&dir.0, 5000);
    FAULTS.with(|f| *f.borrow_mut() = vec![("remove old", 0)]);
    log.start_compaction(WALL).unwrap();
    for c in changes_during() {
        write_during(&mut log, &mut store, &mut seq, &c);
        if log.continue_compaction(&store).unwrap() == crate::Compacting::Done {
            break;
        }
    }
    while log.continue_compaction(&store).unwrap() == crate::Compacting::More {}
    FAULTS.with(|f| f.borrow_mut().clear());
    assert_eq!(log.stats().snapshots, 1);
    write_during(
        &mut log,
        &mut store,
        &mut seq,
        &Change::Put {
            key: 4,
            t: 70_000,
            tombstone: false,
        },
    );
    drop(log);
    assert!(
        dir.0.join("wal-00000000000000000000").exists(),
        "old log left"
    );
    assert_eq!(reload(&dir.0), contents_of(&store));
    assert!(
        !dir.0.join("wal-00000000000000000000").exists(),
        "removed at start"
    );
}

#[test]
fn a_compaction_with_writes_meanwhile_that_fails_at_any_step_keeps_them_in_the_old_log() {
    for &(step_name, _) in &REPAIR_STEPS[..9] {
        let dir = TempDir::new("compact-fault-writes");
        let (mut log, mut store, mut seq) = log_with_entries(&dir.0, 5000);
        FAULTS.with(|f| *f.borrow_mut() = vec![(step_name, 0)]);
        let mut failed = log.start_compaction(WALL).is_err();
        let mut changes = changes_during().into_iter();
        while !failed && log.is_compacting() {
            if let Some(c) = changes.next() {
                write_during(&mut log, &mut store, &mut seq, &c);
            }
            failed = log.continue_compaction(&store).is_err();
        }
        FAULTS.with(|f| f.borrow_mut().clear());
        assert!(failed, "{step_name}");
        assert!(!log.is_compacting());
        let stats = log.stats();
        assert_eq!(
            (stats.compaction_errors, stats.failed),
            (1, 0),
            "{step_name}"
        );
        for c in changes {
            write_during(&mut log, &mut store, &mut seq, &c);
        }
        drop(log);
        let names: Vec<String> = snapshot_of(&dir.0).into_keys().collect();
        assert_eq!(
            names,
            ["LOCK", "wal-00000000000000000000"],
            "{step_name}: undone"
        );
        assert_eq!(reload(&dir.0), contents_of(&store), "{step_name}");
    }
}
