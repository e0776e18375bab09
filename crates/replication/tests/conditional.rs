//! Conditional writes (`Replica::batch_checked`) and entry metadata (flags, owner) on bare
//! replicas: every kind of check, all or nothing, tombstones as absent, refusals that change
//! nothing; metadata through writes, anti-entropy, change events, persistence, and the
//! validation of a remote owner.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::chorus_protocol::NodeId;
use chorus_replication::{
    Check, Error, Expect, Hlc, MemoryDisk, Op, Owner, Persist, PutMeta, Replica, ReplicaConfig,
    ReplicaEvent, Version, wire,
};
use prost::Message as _;

const WALL0: u64 = 1_700_000_000_000;

fn cfg(node: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node, node * 31);
    c.buckets = NonZeroU32::new(16).unwrap();
    c.sync_interval = Duration::from_millis(500);
    c.solo_in_sync_after = Duration::from_millis(300);
    c.incarnation = 40 + node;
    c
}

fn drain(r: &mut Replica) -> (Vec<ReplicaEvent>, Vec<Bytes>) {
    let events = std::iter::from_fn(|| r.poll_event()).collect();
    let out = std::iter::from_fn(|| r.poll_outgoing())
        .map(|o| o.payload)
        .collect();
    (events, out)
}

fn failed(e: Error) -> (String, Option<Version>, Option<u64>) {
    match e {
        Error::ConditionFailed {
            key,
            current,
            revision,
        } => (key, current, revision),
        other => panic!("expected ConditionFailed, got {other}"),
    }
}

#[test]
fn each_kind_of_check_holds_exactly_when_it_should() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let put = |k: &str| vec![Op::put(k, "v")];

    // Absent: a key never written.
    let v1 = r
        .batch_checked(WALL0, vec![Check::new("k", Expect::Absent)], put("k"))
        .unwrap();
    let rev1 = r.store().get_entry("k").unwrap().revision;
    // Absent fails on a live key, with its version and revision.
    let e = r
        .batch_checked(WALL0 + 1, vec![Check::new("k", Expect::Absent)], put("k"))
        .unwrap_err();
    assert_eq!(failed(e), ("k".into(), Some(v1), Some(rev1)));
    // Present / Version / Revision on the live key.
    r.batch_checked(WALL0 + 2, vec![Check::new("k", Expect::Present)], put("k"))
        .map(|_| ())
        .unwrap_or_else(|e| panic!("present: {e}"));
    let v2 = r.store().get_entry("k").unwrap().version;
    assert!(
        r.batch_checked(
            WALL0 + 3,
            vec![Check::new("k", Expect::Version(v1))],
            put("k")
        )
        .is_err(),
        "an older version no longer matches"
    );
    assert!(
        r.batch_checked(
            WALL0 + 3,
            vec![Check::new("k", Expect::Revision(rev1))],
            put("k")
        )
        .is_err()
    );
    let v3 = r
        .batch_checked(
            WALL0 + 4,
            vec![Check::new("k", Expect::Version(v2))],
            put("k"),
        )
        .unwrap();
    let rev3 = r.store().get_entry("k").unwrap().revision;
    r.batch_checked(
        WALL0 + 5,
        vec![Check::new("k", Expect::Revision(rev3))],
        vec![Op::delete("k")],
    )
    .unwrap();
    // A tombstone counts as absent: Absent passes, Present/Version/Revision fail with no
    // current version.
    assert!(r.store().get_entry("k").unwrap().is_tombstone());
    for expect in [Expect::Present, Expect::Version(v3), Expect::Revision(rev3)] {
        let e = r
            .batch_checked(WALL0 + 6, vec![Check::new("k", expect)], put("k"))
            .unwrap_err();
        assert_eq!(failed(e), ("k".into(), None, None), "{expect:?}");
    }
    r.batch_checked(WALL0 + 7, vec![Check::new("k", Expect::Absent)], put("k"))
        .unwrap();
    // Present on a key never written fails.
    assert!(
        r.batch_checked(
            WALL0 + 8,
            vec![Check::new("never", Expect::Present)],
            put("x")
        )
        .is_err()
    );
    assert_eq!(r.stats().conditions_failed, 7);
}

#[test]
fn a_failed_check_applies_no_op_of_the_batch_and_sends_nothing() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let va = r.put(WALL0, "a", "1").unwrap();
    r.put(WALL0, "b", "1").unwrap();
    drain(&mut r);
    let before = r.store().entries();
    let revision = r.store().revision();
    let clock = r.clock();
    let writes = r.stats().local_writes;
    // The first check holds, the second does not: nothing of the batch happens.
    let e = r
        .batch_checked(
            WALL0 + 1000,
            vec![
                Check::new("a", Expect::Version(va)),
                Check::new("b", Expect::Absent),
            ],
            vec![Op::put("a", "2"), Op::delete("b"), Op::put("c", "new")],
        )
        .unwrap_err();
    assert_eq!(failed(e).0, "b");
    assert_eq!(r.store().entries(), before);
    assert_eq!(r.store().revision(), revision);
    assert_eq!(r.clock(), clock, "the clock did not move");
    assert_eq!(r.stats().local_writes, writes);
    let (events, out) = drain(&mut r);
    assert!(events.is_empty() && out.is_empty());
    // When every check holds, the whole batch is applied under one version.
    let v = r
        .batch_checked(
            WALL0 + 1000,
            vec![
                Check::new("a", Expect::Version(va)),
                Check::new("c", Expect::Absent),
            ],
            vec![Op::put("a", "2"), Op::delete("b"), Op::put("c", "new")],
        )
        .unwrap();
    for k in ["a", "b", "c"] {
        assert_eq!(r.store().get_entry(k).unwrap().version, v);
    }
    let (events, out) = drain(&mut r);
    assert_eq!(events.len(), 3);
    assert_eq!(out.len(), 1, "one write message");
}

#[test]
fn malformed_checks_are_refused_before_anything_is_looked_at() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let max = r.config().limits.max_batch_ops;
    let many: Vec<Check> = (0..=max)
        .map(|i| Check::new(format!("k{i}"), Expect::Absent))
        .collect();
    assert!(matches!(
        r.batch_checked(WALL0, many, vec![Op::put("k", "v")]),
        Err(Error::TooManyChecks { .. })
    ));
    assert_eq!(
        r.batch_checked(
            WALL0,
            vec![Check::new("", Expect::Absent)],
            vec![Op::put("k", "v")]
        ),
        Err(Error::EmptyKey)
    );
    let long = "x".repeat(r.config().limits.max_key_len + 1);
    assert!(matches!(
        r.batch_checked(
            WALL0,
            vec![Check::new(long, Expect::Present)],
            vec![Op::put("k", "v")]
        ),
        Err(Error::KeyTooLong { .. })
    ));
    assert_eq!(
        r.batch_checked(WALL0, vec![Check::new("k", Expect::Absent)], Vec::new()),
        Err(Error::EmptyBatch)
    );
    assert_eq!(r.store().revision(), 0);
}

/// Delivers every outgoing message of `from` to `to`.
fn deliver(now: Instant, from: &mut Replica, to: &mut Replica) {
    let node = from.node();
    while let Some(out) = from.poll_outgoing() {
        to.handle_message(now, WALL0 + 10, node, &out.payload);
    }
}

#[test]
fn flags_and_owner_replicate_with_the_write_and_reach_change_events() {
    let now = Instant::now();
    let (mut a, mut b) = (Replica::new(cfg(1), now), Replica::new(cfg(2), now));
    let v = a
        .batch(
            WALL0,
            vec![
                Op::put_with(
                    "svc/1",
                    "addr",
                    PutMeta {
                        flags: 7,
                        owned: true,
                    },
                ),
                Op::put_with(
                    "cfg/x",
                    "y",
                    PutMeta {
                        flags: 3,
                        owned: false,
                    },
                ),
                Op::put("plain", "p"),
            ],
        )
        .unwrap();
    let owner = Owner {
        node: NodeId(1),
        incarnation: 41,
    };
    // The local change events carry the metadata.
    let events: Vec<ReplicaEvent> = std::iter::from_fn(|| a.poll_event()).collect();
    let flags: Vec<(String, u64, Option<Owner>)> = events
        .into_iter()
        .filter_map(|e| match e {
            ReplicaEvent::Change(c) => Some((c.key, c.flags, c.owner)),
            _ => None,
        })
        .collect();
    assert!(flags.contains(&("svc/1".into(), 7, Some(owner))));
    deliver(now, &mut a, &mut b);
    let e = b.store().get_entry("svc/1").unwrap();
    assert_eq!((e.version, e.flags, e.owner), (v, 7, Some(owner)));
    let e = b.store().get_entry("cfg/x").unwrap();
    assert_eq!((e.flags, e.owner), (3, None));
    let e = b.store().get_entry("plain").unwrap();
    assert_eq!((e.flags, e.owner), (0, None));
    let remote: Vec<(String, u64, Option<Owner>)> = std::iter::from_fn(|| b.poll_event())
        .filter_map(|e| match e {
            ReplicaEvent::Change(c) => Some((c.key, c.flags, c.owner)),
            _ => None,
        })
        .collect();
    assert!(remote.contains(&("svc/1".into(), 7, Some(owner))));
    // A delete drops the metadata.
    a.delete(WALL0 + 1, "svc/1").unwrap();
    deliver(now, &mut a, &mut b);
    let e = b.store().get_entry("svc/1").unwrap();
    assert!(e.is_tombstone());
    assert_eq!((e.flags, e.owner), (0, None));
}

#[test]
fn a_late_joiner_gets_the_metadata_through_anti_entropy() {
    let mut now = Instant::now();
    let (mut a, mut b) = (Replica::new(cfg(1), now), Replica::new(cfg(2), now));
    a.put(WALL0, "k/plain", "1").unwrap();
    a.batch(
        WALL0,
        vec![Op::put_with(
            "k/meta",
            "2",
            PutMeta {
                flags: 99,
                owned: true,
            },
        )],
    )
    .unwrap();
    // b never saw the writes.
    drain(&mut a);
    a.handle_peer_up(now, 2);
    b.handle_peer_up(now, 1);
    let mut wall = WALL0;
    for _ in 0..300 {
        now += Duration::from_millis(10);
        wall += 10;
        for r in [&mut a, &mut b] {
            if r.poll_timeout().is_some_and(|t| t <= now) {
                r.handle_timeout(now, wall);
            }
        }
        let (an, bn) = (a.node(), b.node());
        while let Some(out) = a.poll_outgoing() {
            b.handle_message(now, wall, an, &out.payload);
        }
        while let Some(out) = b.poll_outgoing() {
            a.handle_message(now, wall, bn, &out.payload);
        }
    }
    let e = b.store().get_entry("k/meta").expect("synced");
    assert_eq!(e.flags, 99);
    assert_eq!(
        e.owner,
        Some(Owner {
            node: NodeId(1),
            incarnation: 41
        })
    );
    assert_eq!(b.store().get_entry("k/plain").unwrap().flags, 0);
}

fn write_with_owner(hlc: Hlc, key: &str, owner_node: u64) -> Vec<u8> {
    wire::Envelope {
        body: Some(wire::envelope::Body::Write(wire::Write {
            hlc: hlc.0,
            ops: vec![wire::Op {
                key: key.into(),
                value: Some(Bytes::from_static(b"v")),
                flags: 1,
                owner: Some(wire::Owner {
                    node: owner_node,
                    incarnation: 5,
                }),
            }],
        })),
    }
    .encode_to_vec()
}

#[test]
fn a_remote_owner_other_than_the_writer_is_a_counted_drop() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    // A write from node 2 claiming node 3 owns the key: dropped whole.
    r.handle_message(
        now,
        WALL0,
        2,
        &write_with_owner(Hlc::new(WALL0, 1), "forged", 3),
    );
    assert!(r.store().get_entry("forged").is_none());
    assert_eq!(r.stats().owner_mismatch, 1);
    // The same from its owner is taken.
    r.handle_message(
        now,
        WALL0,
        2,
        &write_with_owner(Hlc::new(WALL0, 2), "own", 2),
    );
    assert_eq!(
        r.store().get_entry("own").unwrap().owner,
        Some(Owner {
            node: NodeId(2),
            incarnation: 5
        })
    );
    // Sync entries: an entry whose owner is not its version's node is dropped alone.
    let entries = wire::Envelope {
        body: Some(wire::envelope::Body::Entries(wire::Entries {
            entries: vec![
                wire::Entry {
                    key: "e/bad".into(),
                    hlc: Hlc::new(WALL0, 3).0,
                    node: 4,
                    value: Some(Bytes::from_static(b"x")),
                    flags: 0,
                    owner: Some(wire::Owner {
                        node: 2,
                        incarnation: 1,
                    }),
                },
                wire::Entry {
                    key: "e/good".into(),
                    hlc: Hlc::new(WALL0, 3).0,
                    node: 4,
                    value: Some(Bytes::from_static(b"x")),
                    flags: 8,
                    owner: Some(wire::Owner {
                        node: 4,
                        incarnation: 1,
                    }),
                },
            ],
        })),
    }
    .encode_to_vec();
    r.handle_message(now, WALL0, 2, &entries);
    assert!(r.store().get_entry("e/bad").is_none());
    assert_eq!(r.store().get_entry("e/good").unwrap().flags, 8);
    assert_eq!(r.stats().owner_mismatch, 2);
}

#[test]
fn metadata_is_persisted_and_restored() {
    let now = Instant::now();
    let mut disk = MemoryDisk::new();
    let mut r = Replica::restore(cfg(1), now, WALL0, disk.crash());
    r.batch(
        WALL0,
        vec![
            Op::put_with(
                "a",
                "1",
                PutMeta {
                    flags: 5,
                    owned: true,
                },
            ),
            Op::put("b", "2"),
        ],
    )
    .unwrap();
    while let Some(item) = r.poll_persist() {
        if let Persist::Append { record, .. } = &item {
            assert!(
                record
                    .entries
                    .iter()
                    .any(|e| e.flags == 5 && e.owner.is_some())
            );
        }
        disk.accept(item);
    }
    disk.sync();
    let loaded = disk.crash();
    let r2 = Replica::restore(cfg(1), now, WALL0 + 1, loaded);
    let a = r2.store().get_entry("a").unwrap();
    assert_eq!(
        (a.flags, a.owner),
        (
            5,
            Some(Owner {
                node: NodeId(1),
                incarnation: 41
            })
        )
    );
    assert_eq!(r2.store().get_entry("b").unwrap().flags, 0);
}
