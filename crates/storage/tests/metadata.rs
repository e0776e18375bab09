//! Entry metadata (flags, owner) in the data directory: it survives a restart from the log
//! and from a snapshot, and records written before entries had metadata still load (as
//! flags 0 and no owner).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::num::NonZeroU32;
use std::time::Instant;

use bytes::Bytes;
use chorus_replication::chorus_protocol::NodeId;
use chorus_replication::{
    EntryMeta, Fsync, Hlc, Op, Origin, Owner, Persist, PutMeta, Replica, ReplicaConfig, wire,
};
use chorus_storage::{DiskLog, DiskOptions, FlushMode};
use chorus_testkit::temp_dir;
use prost::Message as _;

const WALL: u64 = 1_700_000_000_000;

fn cfg() -> ReplicaConfig {
    let mut c = ReplicaConfig::new(1, 7);
    c.buckets = NonZeroU32::new(16).unwrap();
    c.incarnation = 1234;
    c
}

/// Hands the replica's persist items to the log and syncs it.
fn flush(r: &mut Replica, log: &mut DiskLog, now: Instant) {
    while let Some(item) = r.poll_persist() {
        if let Persist::Append {
            seq,
            record,
            origin,
        } = item
        {
            log.append(seq, &record, origin);
        }
    }
    log.flush(now, FlushMode::SyncAll).unwrap();
}

const OWNER: Owner = Owner {
    node: NodeId(1),
    incarnation: 1234,
};

fn assert_meta(r: &Replica) {
    let e = r.store().get_entry("svc/a").unwrap();
    assert_eq!((e.flags, e.owner), (42, Some(OWNER)));
    let e = r.store().get_entry("cfg/b").unwrap();
    assert_eq!((e.flags, e.owner), (u64::MAX, None));
    let e = r.store().get_entry("plain").unwrap();
    assert_eq!((e.flags, e.owner), (0, None));
    let e = r.store().get_entry("gone").unwrap();
    assert!(e.is_tombstone());
    assert_eq!((e.flags, e.owner), (0, None));
}

#[test]
fn flags_and_owner_survive_a_restart_from_the_log_and_from_a_snapshot() {
    let dir = temp_dir("meta-restart");
    let now = Instant::now();
    let options = DiskOptions::new(Fsync::Always);
    let (mut log, loaded) = DiskLog::open(dir.path(), options).unwrap();
    let mut r = Replica::restore(cfg(), now, WALL, loaded);
    r.batch(
        WALL,
        vec![
            Op::put_with(
                "svc/a",
                "10.0.0.1",
                PutMeta {
                    flags: 42,
                    owned: true,
                },
            ),
            Op::put_with(
                "cfg/b",
                "x",
                PutMeta {
                    flags: u64::MAX,
                    owned: false,
                },
            ),
            Op::put("plain", "p"),
            Op::put_with(
                "gone",
                "soon",
                PutMeta {
                    flags: 9,
                    owned: true,
                },
            ),
        ],
    )
    .unwrap();
    r.delete(WALL + 1, "gone").unwrap();
    flush(&mut r, &mut log, now);
    drop(log);

    // From the log.
    let (mut log, loaded) = DiskLog::open(dir.path(), options).unwrap();
    let meta: Vec<(&str, EntryMeta)> = loaded
        .entries
        .iter()
        .map(|(k, _, _, m)| (k.as_str(), *m))
        .collect();
    assert!(meta.contains(&(
        "svc/a",
        EntryMeta {
            flags: 42,
            owner: Some(OWNER)
        }
    )));
    let r2 = Replica::restore(cfg(), now, WALL + 2, loaded);
    assert_meta(&r2);

    // From a snapshot (compaction writes the store), then the log after it.
    log.compact(r2.store(), WALL + 2).unwrap();
    drop(log);
    let (_log, loaded) = DiskLog::open(dir.path(), options).unwrap();
    assert!(loaded.report.generation > 0, "loaded from a snapshot");
    let r3 = Replica::restore(cfg(), now, WALL + 3, loaded);
    assert_meta(&r3);
}

/// `Entry` as `proto/replication.proto` defined it before entries had metadata.
#[derive(Clone, PartialEq, prost::Message)]
struct OldEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(fixed64, tag = "2")]
    hlc: u64,
    #[prost(uint64, tag = "3")]
    node: u64,
    #[prost(bytes = "bytes", optional, tag = "4")]
    value: Option<Bytes>,
}

/// `LogRecord` of that time.
#[derive(Clone, PartialEq, prost::Message)]
struct OldRecord {
    #[prost(uint64, tag = "1")]
    wall_ms: u64,
    #[prost(message, repeated, tag = "2")]
    entries: Vec<OldEntry>,
}

#[test]
fn records_written_before_entries_had_metadata_still_load() {
    let dir = temp_dir("meta-old-records");
    let now = Instant::now();
    let options = DiskOptions::new(Fsync::Always);
    let old = OldRecord {
        wall_ms: WALL,
        entries: vec![
            OldEntry {
                key: "old/a".into(),
                hlc: Hlc::new(WALL, 0).0,
                node: 3,
                value: Some(Bytes::from_static(b"1")),
            },
            OldEntry {
                key: "old/gone".into(),
                hlc: Hlc::new(WALL, 1).0,
                node: 3,
                value: None,
            },
        ],
    };
    let bytes = old.encode_to_vec();
    // The old bytes decode with the current schema as entries without metadata, and an
    // entry without metadata is written as exactly the old bytes: the log holds the old
    // format byte for byte.
    let record = wire::LogRecord::decode(bytes.as_slice()).unwrap();
    assert!(
        record
            .entries
            .iter()
            .all(|e| e.flags == 0 && e.owner.is_none())
    );
    assert_eq!(record.encode_to_vec(), bytes);
    let (mut log, _) = DiskLog::open(dir.path(), options).unwrap();
    log.append(1, &record, Origin::Local);
    log.flush(now, FlushMode::SyncAll).unwrap();
    drop(log);
    let (_log, loaded) = DiskLog::open(dir.path(), options).unwrap();
    assert!(!loaded.report.is_damaged());
    assert_eq!(loaded.entries.len(), 2);
    assert!(loaded.entries.iter().all(|(_, _, _, m)| m.is_empty()));
    let r = Replica::restore(cfg(), now, WALL + 1, loaded);
    let a = r.store().get_entry("old/a").unwrap();
    assert_eq!(
        (a.value.as_deref(), a.flags, a.owner),
        (Some(&b"1"[..]), 0, None)
    );
    assert!(r.store().get_entry("old/gone").unwrap().is_tombstone());
}
