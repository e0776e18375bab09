//! `Replica::restore_entries`: by version, only newer entries are stored, and what was stored
//! is pushed at once as write traffic in bounded `Entries` messages carrying the original
//! versions and metadata; a receiver merges them. Forced, the entries are one new batch.
//! Bad entries are refused whole.
#![allow(clippy::unwrap_used)]

use std::num::NonZeroU32;
use std::time::Instant;

use bytes::Bytes;
use chorus_replication::chorus_protocol::NodeId;
use chorus_replication::{
    Entry, Error, Hlc, OutgoingKind, Owner, Replica, ReplicaConfig, RestoreMode, Version, wire,
};
use prost::Message as _;

const WALL0: u64 = 1_700_000_000_000;

fn cfg(node: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node, node * 13);
    c.buckets = NonZeroU32::new(16).unwrap();
    c.max_sync_message = 4096;
    c
}

fn entry(value: Option<&[u8]>, ms: u64, node: u64) -> Entry {
    Entry {
        value: value.map(Bytes::copy_from_slice),
        version: Version {
            hlc: Hlc::new(WALL0 + ms, 0),
            node,
        },
        revision: 0,
        flags: 0,
        owner: None,
    }
}

#[test]
fn by_version_stores_only_newer_entries_and_pushes_them_with_their_versions() {
    let now = Instant::now();
    let mut a = Replica::new(cfg(1), now);
    let mut b = Replica::new(cfg(2), now);
    // a holds a newer "k/new" and an older "k/old".
    a.put(WALL0 - 500, "k/old", "local").unwrap();
    a.put(WALL0 + 500, "k/new", "local").unwrap();
    while a.poll_outgoing().is_some() {}
    while a.poll_event().is_some() {}
    let mut backup: Vec<(String, Entry)> = (0..200)
        .map(|i| (format!("b/{i:03}"), entry(Some(&[b'x'; 100]), 10, 9)))
        .collect();
    backup.push(("k/new".into(), entry(Some(b"backup"), 0, 9)));
    backup.push(("k/old".into(), entry(Some(b"backup"), 0, 9)));
    backup.push(("k/gone".into(), entry(None, 1, 9)));
    let mut owned = entry(Some(b"svc"), 2, 9);
    owned.flags = 5;
    owned.owner = Some(Owner {
        node: NodeId(9),
        incarnation: 3,
    });
    backup.push(("svc/x".into(), owned.clone()));
    let (report, version) = a
        .restore_entries(WALL0, backup.clone(), RestoreMode::ByVersion)
        .unwrap();
    assert_eq!(version, None);
    assert_eq!((report.applied, report.skipped_older), (203, 1));
    assert_eq!(a.get("k/new"), Some(Bytes::from("local")), "newer kept");
    assert_eq!(
        a.get("k/old"),
        Some(Bytes::from("backup")),
        "older replaced"
    );
    assert_eq!(a.stats().entries_restored, 203);
    // Pushed at once, as writes, in messages of at most max_sync_message bytes.
    let mut pushed = Vec::new();
    while let Some(out) = a.poll_outgoing() {
        assert_eq!(
            out.kind,
            OutgoingKind::Write,
            "never dropped under pressure"
        );
        assert!(out.payload.len() <= 4096, "{} bytes", out.payload.len());
        let env = wire::Envelope::decode(out.payload.clone()).unwrap();
        let Some(wire::envelope::Body::Entries(e)) = env.body else {
            panic!("an Entries message");
        };
        pushed.extend(e.entries.iter().map(|e| e.key.clone()));
        b.handle_message(now, WALL0, 1, &out.payload);
    }
    assert_eq!(pushed.len(), 203, "every stored entry, once");
    assert!(
        !pushed.contains(&"k/new".to_string()),
        "not the skipped one"
    );
    // b now holds them with their original versions and metadata.
    for (k, e) in &backup {
        if k == "k/new" {
            continue;
        }
        let got = b.store().get_entry(k).unwrap();
        assert_eq!(
            (&got.value, got.version, got.flags, got.owner),
            (&e.value, e.version, e.flags, e.owner),
            "{k}"
        );
    }
    // Restoring the same again stores nothing and sends nothing.
    let (report, _) = a
        .restore_entries(WALL0, backup, RestoreMode::ByVersion)
        .unwrap();
    assert_eq!(report.applied, 0);
    assert!(a.poll_outgoing().is_none());
}

#[test]
fn force_newer_is_one_batch_under_a_new_version() {
    let now = Instant::now();
    let mut a = Replica::new(cfg(1), now);
    let v = a.put(WALL0 + 500, "k", "now").unwrap();
    let mut mine = entry(Some(b"mine"), 0, 1);
    mine.owner = Some(Owner {
        node: NodeId(1),
        incarnation: 0,
    });
    let mut theirs = entry(Some(b"theirs"), 0, 9);
    theirs.owner = Some(Owner {
        node: NodeId(9),
        incarnation: 0,
    });
    theirs.flags = 4;
    let backup = vec![
        ("k".to_string(), entry(Some(b"old"), 0, 9)),
        ("gone".to_string(), entry(None, 0, 9)),
        ("mine".to_string(), mine),
        ("theirs".to_string(), theirs),
    ];
    let (report, version) = a
        .restore_entries(WALL0 + 600, backup, RestoreMode::ForceNewer)
        .unwrap();
    let version = version.unwrap();
    assert!(version > v);
    assert_eq!(report.applied, 4);
    assert_eq!(a.get("k"), Some(Bytes::from("old")));
    assert!(a.store().get_entry("gone").unwrap().is_tombstone());
    assert_eq!(
        a.store().get_entry("mine").unwrap().owner.map(|o| o.node),
        Some(NodeId(1))
    );
    let theirs = a.store().get_entry("theirs").unwrap();
    assert_eq!(
        (theirs.flags, theirs.owner),
        (4, None),
        "not re-owned by this node"
    );
    assert_eq!(theirs.version, version);
}

#[test]
fn bad_entries_are_refused_whole() {
    let now = Instant::now();
    let mut a = Replica::new(cfg(1), now);
    let mut forged = entry(Some(b"x"), 0, 4);
    forged.owner = Some(Owner {
        node: NodeId(5),
        incarnation: 1,
    });
    let future = entry(Some(b"x"), 120_000, 4);
    let long = "k".repeat(a.config().limits.max_key_len + 1);
    for bad in [
        vec![
            ("ok".to_string(), entry(Some(b"1"), 0, 4)),
            ("f".into(), forged),
        ],
        vec![
            ("ok".to_string(), entry(Some(b"1"), 0, 4)),
            ("t".into(), future),
        ],
        vec![(long, entry(Some(b"1"), 0, 4))],
        vec![
            ("d".to_string(), entry(Some(b"1"), 0, 4)),
            ("d".to_string(), entry(Some(b"2"), 1, 4)),
        ],
    ] {
        for mode in [RestoreMode::ByVersion, RestoreMode::ForceNewer] {
            let err = a.restore_entries(WALL0, bad.clone(), mode).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidEntry { .. }
                        | Error::KeyTooLong { .. }
                        | Error::DuplicateKey { .. }
                ),
                "{err}"
            );
        }
    }
    assert_eq!(a.store().revision(), 0);
    assert!(a.poll_outgoing().is_none());
}
