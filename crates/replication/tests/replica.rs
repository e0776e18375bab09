//! Unit-level tests of `Replica` over an in-memory, lossless "multicast" (no protocol).
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_replication::{
    Error, Hlc, Loaded, Op, OutgoingKind, Replica, ReplicaConfig, ReplicaEvent, Version, wire,
};
use proptest::prelude::*;
use prost::Message as _;

mod common;

const WALL0: u64 = 1_700_000_000_000;

fn cfg(node: u64) -> ReplicaConfig {
    let mut c = ReplicaConfig::new(node, node * 7919);
    c.buckets = NonZeroU32::new(16).unwrap();
    c.sync_interval = Duration::from_millis(500);
    c.solo_in_sync_after = Duration::from_millis(300);
    c
}

/// N replicas sharing a virtual clock; every outgoing message reaches every other replica
/// unless the link is cut.
struct Cluster {
    nodes: Vec<Replica>,
    now: Instant,
    wall: u64,
    cut: Vec<(usize, usize)>,
    sync_bytes: usize,
}

impl Cluster {
    fn new(n: usize, f: impl Fn(u64) -> ReplicaConfig) -> Cluster {
        let now = Instant::now();
        let nodes = (0..n).map(|i| Replica::new(f(i as u64 + 1), now)).collect();
        Cluster {
            nodes,
            now,
            wall: WALL0,
            cut: Vec::new(),
            sync_bytes: 0,
        }
    }

    fn connect_all(&mut self) {
        let n = self.nodes.len();
        for i in 0..n {
            for j in 0..n {
                if i != j {
                    let node = self.nodes[j].node();
                    self.nodes[i].handle_peer_up(self.now, node);
                }
            }
        }
    }

    fn pump(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                while let Some(out) = self.nodes[i].poll_outgoing() {
                    moved = true;
                    if out.kind == OutgoingKind::Sync {
                        self.sync_bytes += out.payload.len();
                    }
                    let from = self.nodes[i].node();
                    for j in 0..self.nodes.len() {
                        if j != i && !self.cut.contains(&(i, j)) {
                            self.nodes[j].handle_message(self.now, self.wall, from, &out.payload);
                        }
                    }
                }
            }
            if !moved {
                break;
            }
        }
    }

    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += Duration::from_millis(10);
            self.wall += 10;
            for n in &mut self.nodes {
                if n.poll_timeout().is_some_and(|t| t <= self.now) {
                    n.handle_timeout(self.now, self.wall);
                }
            }
            self.pump();
        }
    }

    fn events(&mut self, i: usize) -> Vec<ReplicaEvent> {
        std::iter::from_fn(|| self.nodes[i].poll_event()).collect()
    }

    fn converged(&self) -> bool {
        let first = contents(&self.nodes[0]);
        self.nodes.iter().all(|n| contents(n) == first)
    }
}

/// Store contents without the node-local revisions.
fn contents(r: &Replica) -> BTreeMap<String, (Version, Option<Bytes>)> {
    r.store()
        .entries()
        .into_iter()
        .map(|(k, e)| (k, (e.version, e.value)))
        .collect()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[test]
fn put_get_delete_scan_and_events() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let v1 = r.put(WALL0, "app/a", "1").unwrap();
    let v2 = r.put(WALL0, "app/b", "2").unwrap();
    let v3 = r.delete(WALL0, "app/a").unwrap();
    assert!(v1 < v2 && v2 < v3);
    assert_eq!(v1.node, 1);
    assert_eq!(r.get("app/a"), None);
    assert_eq!(r.get("app/b"), Some(b("2")));
    assert_eq!(r.scan("app/"), vec![("app/b".to_string(), b("2"))]);
    assert_eq!(r.store().revision(), 3);
    assert_eq!(r.store().len(), 1);
    let revs: Vec<u64> = std::iter::from_fn(|| r.poll_event())
        .map(|e| match e {
            ReplicaEvent::Change(c) => c.revision,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(revs, [1, 2, 3]);
    let kinds: Vec<OutgoingKind> = std::iter::from_fn(|| r.poll_outgoing())
        .map(|o| o.kind)
        .collect();
    assert_eq!(kinds, [OutgoingKind::Write; 3]);
}

#[test]
fn limits_are_enforced_and_refusals_change_nothing() {
    let mut c = cfg(1);
    c.limits.max_key_len = 8;
    c.limits.max_value_len = 4;
    c.limits.max_batch_ops = 2;
    c.limits.max_write_bytes = 40;
    let mut r = Replica::new(c, Instant::now());
    assert_eq!(r.put(WALL0, "", "x"), Err(Error::EmptyKey));
    assert_eq!(
        r.put(WALL0, "123456789", "x"),
        Err(Error::KeyTooLong { len: 9, max: 8 })
    );
    assert_eq!(
        r.put(WALL0, "k", "12345"),
        Err(Error::ValueTooLarge {
            key: "k".into(),
            len: 5,
            max: 4
        })
    );
    assert_eq!(r.batch(WALL0, vec![]), Err(Error::EmptyBatch));
    let three = (0..3).map(|i| Op::delete(format!("k{i}"))).collect();
    assert_eq!(
        r.batch(WALL0, three),
        Err(Error::BatchTooLarge { ops: 3, max: 2 })
    );
    let dup = vec![Op::delete("k"), Op::put("k", b("v"))];
    assert_eq!(
        r.batch(WALL0, dup),
        Err(Error::DuplicateKey { key: "k".into() })
    );
    let big = vec![
        Op::put("kkkkkkk1", b("vvvv")),
        Op::put("kkkkkkk2", b("vvvv")),
    ];
    assert!(matches!(
        r.batch(WALL0, big),
        Err(Error::WriteTooLarge { .. })
    ));
    assert_eq!(
        r.clock(),
        Hlc(0),
        "refused commands must not move the clock"
    );
    assert_eq!(r.store().revision(), 0);
    assert!(r.poll_event().is_none() && r.poll_outgoing().is_none());
    r.put(WALL0, "k", "1234").unwrap();
    assert_eq!(r.store().len(), 1);
}

fn write_msg(hlc: Hlc, ops: Vec<(&str, Option<&str>)>) -> Vec<u8> {
    wire::Envelope {
        body: Some(wire::envelope::Body::Write(wire::Write {
            hlc: hlc.0,
            ops: ops
                .into_iter()
                .map(|(k, v)| wire::Op {
                    key: k.into(),
                    value: v.map(b),
                    ..Default::default()
                })
                .collect(),
        })),
    }
    .encode_to_vec()
}

#[test]
fn remote_writes_obey_lww_drift_limits_and_malformed_input() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    r.handle_message(
        now,
        WALL0,
        2,
        &write_msg(Hlc::new(WALL0, 5), vec![("k", Some("new"))]),
    );
    r.handle_message(
        now,
        WALL0,
        3,
        &write_msg(Hlc::new(WALL0, 4), vec![("k", Some("old"))]),
    );
    assert_eq!(r.get("k"), Some(b("new")));
    assert_eq!(r.stats().stale_ignored, 1);
    // Same hlc, larger node id wins.
    r.handle_message(
        now,
        WALL0,
        3,
        &write_msg(Hlc::new(WALL0, 5), vec![("k", Some("tie"))]),
    );
    assert_eq!(r.get("k"), Some(b("tie")));
    // The local clock moved past the remote version: a local write now wins.
    let v = r.put(WALL0 - 1000, "k", "mine").unwrap();
    assert!(
        v > Version {
            hlc: Hlc::new(WALL0, 5),
            node: 3
        }
    );
    assert_eq!(r.get("k"), Some(b("mine")));
    // Too far in the future.
    let future = Hlc::new(WALL0 + 61_000, 0);
    r.handle_message(now, WALL0, 2, &write_msg(future, vec![("f", Some("x"))]));
    assert_eq!(r.stats().drift_rejected, 1);
    assert_eq!(r.get("f"), None);
    // Garbage, empty envelope, duplicate keys, empty key, own messages.
    r.handle_message(now, WALL0, 2, &[0xff, 0xff, 0xff, 0x01]);
    r.handle_message(
        now,
        WALL0,
        2,
        &wire::Envelope { body: None }.encode_to_vec(),
    );
    r.handle_message(
        now,
        WALL0,
        2,
        &write_msg(Hlc::new(WALL0, 9), vec![("d", None), ("d", Some("x"))]),
    );
    r.handle_message(
        now,
        WALL0,
        2,
        &write_msg(Hlc::new(WALL0, 9), vec![("", Some("x"))]),
    );
    r.handle_message(
        now,
        WALL0,
        1,
        &write_msg(Hlc::new(WALL0, 9), vec![("o", Some("x"))]),
    );
    assert_eq!(r.stats().malformed, 3);
    assert_eq!(r.stats().limit_violations, 1);
    assert_eq!(r.stats().own_messages, 1);
    assert_eq!(r.get("d"), None);
    assert_eq!(r.get("o"), None);
}

#[test]
fn remote_batch_is_one_change_set_with_consecutive_revisions() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    r.put(WALL0, "b", "local-newer").unwrap();
    let _ = std::iter::from_fn(|| r.poll_event()).count();
    // Older than the local write of "b": that op loses, the rest applies.
    r.handle_message(
        now,
        WALL0,
        2,
        &write_msg(
            Hlc::new(WALL0 - 5, 0),
            vec![("a", Some("1")), ("b", Some("2")), ("c", None)],
        ),
    );
    let changes: Vec<(u64, String)> = std::iter::from_fn(|| r.poll_event())
        .filter_map(|e| match e {
            ReplicaEvent::Change(c) => Some((c.revision, c.key)),
            _ => None,
        })
        .collect();
    assert_eq!(changes, [(2, "a".to_string()), (3, "c".to_string())]);
    assert_eq!(r.get("b"), Some(b("local-newer")));
}

#[test]
fn batches_are_never_half_visible_to_concurrent_readers() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let store = r.store().clone();
    let keys: Vec<String> = (0..32).map(|i| format!("batch/{i:02}")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let store = store.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut scans = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let scan = store.scan_prefix("batch/");
                if let Some((_, first)) = scan.first() {
                    assert_eq!(scan.len(), 32, "half a batch inserted");
                    assert!(
                        scan.iter().all(|(_, v)| v == first),
                        "half a batch visible: {scan:?}"
                    );
                }
                let entries = store.entries();
                let versions: std::collections::BTreeSet<_> =
                    entries.values().map(|e| e.version).collect();
                assert!(versions.len() <= 1, "two batch versions visible at once");
                scans += 1;
            }
            scans
        })
    };
    for round in 0..2000u64 {
        let value = Bytes::from(round.to_string());
        let ops = keys
            .iter()
            .map(|k| Op::put(k.clone(), value.clone()))
            .collect();
        r.batch(WALL0 + round, ops).unwrap();
        while r.poll_event().is_some() {}
        while r.poll_outgoing().is_some() {}
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let scans = reader.join().unwrap();
    assert!(scans > 0);
    assert_eq!(store.get("batch/00"), Some(Bytes::from("1999")));
}

#[test]
fn change_log_resumes_filters_and_compacts() {
    let mut c = cfg(1);
    c.change_log_capacity = 5;
    let mut r = Replica::new(c, Instant::now());
    for i in 0..8 {
        let prefix = if i % 2 == 0 { "a/" } else { "b/" };
        r.put(WALL0, format!("{prefix}{i}"), "v").unwrap();
    }
    // Revisions 4..=8 retained.
    let since3: Vec<u64> = r
        .changes_since(3, "")
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(since3, [4, 5, 6, 7, 8]);
    let a: Vec<String> = r
        .changes_since(5, "a/")
        .unwrap()
        .into_iter()
        .map(|c| c.key)
        .collect();
    assert_eq!(a, ["a/6"]);
    assert!(r.changes_since(8, "").unwrap().is_empty());
    let err = r.changes_since(2, "").unwrap_err();
    assert_eq!(err.oldest_available, 4);
}

#[test]
fn change_log_is_bounded_by_bytes_too() {
    let mut c = cfg(1);
    c.change_log_capacity = 1000;
    // Keys "k/N" (3 bytes) with 1000-byte values: three changes fit in 3 100 bytes.
    c.change_log_max_bytes = 3100;
    let mut r = Replica::new(c, Instant::now());
    for i in 0..6 {
        r.put(WALL0, format!("k/{i}"), vec![b'x'; 1000]).unwrap();
    }
    let kept: Vec<u64> = r
        .changes_since(3, "")
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(kept, [4, 5, 6]);
    assert_eq!(r.changes_since(2, "").unwrap_err().oldest_available, 4);
    // One change larger than the bound is still kept, alone.
    r.put(WALL0, "big", vec![b'y'; 10_000]).unwrap();
    let kept: Vec<u64> = r
        .changes_since(6, "")
        .unwrap()
        .iter()
        .map(|c| c.revision)
        .collect();
    assert_eq!(kept, [7]);
}

#[test]
fn late_joiner_catches_up_through_sync_and_reports_in_sync() {
    let mut c = Cluster::new(3, cfg);
    for i in 0..500 {
        c.nodes[0]
            .put(WALL0, format!("key/{i}"), format!("value-{i}"))
            .unwrap();
    }
    // Node 1 learns the data as it is written; node 2 is not connected yet.
    while let Some(out) = c.nodes[0].poll_outgoing() {
        c.nodes[1].handle_message(c.now, c.wall, 1, &out.payload);
    }
    let now = c.now;
    c.nodes[0].handle_peer_up(now, 2);
    c.nodes[1].handle_peer_up(now, 1);
    c.run(Duration::from_secs(2));
    assert!(c.nodes[0].is_in_sync() && c.nodes[1].is_in_sync());
    c.connect_all();
    assert!(!c.nodes[2].is_in_sync());
    c.run(Duration::from_secs(3));
    assert!(c.converged());
    assert_eq!(c.nodes[2].store().len(), 500);
    assert!(c.nodes.iter().all(Replica::is_in_sync));
    let ev = c.events(2);
    assert_eq!(
        ev.iter()
            .filter(|e| matches!(e, ReplicaEvent::Change(_)))
            .count(),
        500
    );
    assert_eq!(ev.last(), Some(&ReplicaEvent::InSync));
    // Buckets of the joiner were answered by one responder each, spread over both members.
    let answered: Vec<u64> = c.nodes[..2]
        .iter()
        .map(|n| n.stats().buckets_answered)
        .collect();
    assert!(
        answered.iter().all(|a| *a > 0),
        "load not spread: {answered:?}"
    );
    assert!(
        answered.iter().sum::<u64>() <= 16 + 4,
        "too many answers: {answered:?}"
    );
}

#[test]
fn partitioned_nodes_with_both_sides_writing_converge() {
    let mut c = Cluster::new(2, cfg);
    c.connect_all();
    c.run(Duration::from_secs(1));
    c.cut = vec![(0, 1), (1, 0)];
    for i in 0..200 {
        c.nodes[0].put(c.wall, format!("k/{i}"), "zero").unwrap();
        c.wall += 1;
        c.nodes[1]
            .put(c.wall, format!("k/{}", i + 100), "one")
            .unwrap();
        if i % 3 == 0 {
            c.nodes[1].delete(c.wall, format!("k/{i}")).unwrap();
        }
    }
    c.run(Duration::from_secs(1));
    assert!(!c.converged());
    c.cut.clear();
    let now = c.now;
    c.nodes[0].handle_peer_up(now, 2);
    c.nodes[1].handle_peer_up(now, 1);
    c.run(Duration::from_secs(3));
    assert!(c.converged());
    assert!(c.nodes.iter().all(Replica::is_in_sync));
    // Summaries were used, not whole-store pushes.
    assert!(c.nodes.iter().any(|n| n.stats().summaries_sent > 0));
}

#[test]
fn loss_report_triggers_repair() {
    let mut c = Cluster::new(2, cfg);
    c.connect_all();
    c.run(Duration::from_secs(1));
    c.nodes[0].put(c.wall, "lost", "x").unwrap();
    let _lost = c.nodes[0].poll_outgoing();
    c.nodes[1].handle_lost(c.now, 1);
    assert!(!c.nodes[1].is_in_sync());
    c.run(Duration::from_millis(400));
    assert_eq!(c.nodes[1].get("lost"), Some(b("x")));
    assert!(c.nodes[1].is_in_sync());
}

#[test]
fn sync_messages_respect_the_size_limit() {
    let small = |n| {
        let mut c = cfg(n);
        c.buckets = NonZeroU32::new(1).unwrap();
        c.max_sync_message = 1024;
        c
    };
    let mut c = Cluster::new(2, small);
    for i in 0..300 {
        c.nodes[0]
            .put(c.wall, format!("key/{i:04}"), "0123456789")
            .unwrap();
        c.nodes[1]
            .put(c.wall, format!("key/{:04}", i + 150), "abcdefghij")
            .unwrap();
    }
    while c.nodes[0].poll_outgoing().is_some() {}
    while c.nodes[1].poll_outgoing().is_some() {}
    c.connect_all();
    let mut largest = 0;
    for _ in 0..200 {
        c.now += Duration::from_millis(10);
        c.wall += 10;
        for n in &mut c.nodes {
            if n.poll_timeout().is_some_and(|t| t <= c.now) {
                n.handle_timeout(c.now, c.wall);
            }
        }
        for i in 0..2 {
            while let Some(out) = c.nodes[i].poll_outgoing() {
                largest = largest.max(out.payload.len());
                let from = c.nodes[i].node();
                c.nodes[1 - i].handle_message(c.now, c.wall, from, &out.payload);
            }
        }
    }
    assert!(c.converged());
    assert_eq!(c.nodes[0].store().len(), 450);
    assert!(largest <= 1024, "message of {largest} bytes");
    assert!(
        c.nodes.iter().any(|n| n.stats().summaries_sent > 1),
        "summaries were not chunked"
    );
}

#[test]
fn tombstones_are_collected_after_grace_and_never_resurrect() {
    let grace = |n| {
        let mut c = cfg(n);
        c.tombstone_grace = Duration::from_secs(10);
        c
    };
    let mut c = Cluster::new(2, grace);
    c.connect_all();
    c.nodes[0].put(c.wall, "gone", "v").unwrap();
    c.nodes[0].put(c.wall, "kept", "v").unwrap();
    c.run(Duration::from_secs(1));
    c.nodes[0].delete(c.wall, "gone").unwrap();
    c.run(Duration::from_secs(1));
    assert_eq!(c.nodes[1].store().entry_count(), 2);
    c.run(Duration::from_secs(11));
    for n in &c.nodes {
        assert_eq!(n.store().entry_count(), 1, "tombstone not collected");
        assert_eq!(n.stats().tombstones_collected, 1);
    }
    assert!(c.converged());
    // A late copy of the expired tombstone is dropped, not re-inserted.
    let entries = wire::Envelope {
        body: Some(wire::envelope::Body::Entries(wire::Entries {
            entries: vec![wire::Entry {
                key: "gone".into(),
                hlc: Hlc::new(WALL0, 0).0,
                node: 1,
                value: None,
                ..Default::default()
            }],
        })),
    }
    .encode_to_vec();
    let (now, wall) = (c.now, c.wall);
    c.nodes[1].handle_message(now, wall, 1, &entries);
    assert_eq!(c.nodes[1].store().entry_count(), 1);
    assert_eq!(c.nodes[1].stats().expired_tombstones_dropped, 1);
}

#[test]
fn long_isolated_node_forgets_old_entries_instead_of_resurrecting_them() {
    let grace = |n| {
        let mut c = cfg(n);
        c.tombstone_grace = Duration::from_secs(10);
        c
    };
    let mut c = Cluster::new(2, grace);
    c.connect_all();
    c.nodes[0].put(c.wall, "doomed", "v").unwrap();
    c.nodes[0].put(c.wall, "survivor", "v").unwrap();
    c.run(Duration::from_secs(1));
    // Node 2 is cut off (both sides see the other leave); node 1 deletes and collects.
    c.cut = vec![(0, 1), (1, 0)];
    let now = c.now;
    c.nodes[0].handle_peer_down(now, 2);
    c.nodes[1].handle_peer_down(now, 1);
    c.nodes[0].delete(c.wall, "doomed").unwrap();
    c.run(Duration::from_secs(15));
    assert_eq!(c.nodes[0].store().entry_count(), 1);
    assert_eq!(c.nodes[1].get("doomed"), Some(b("v")));
    // Heal after more than the grace period.
    c.cut.clear();
    c.connect_all();
    c.run(Duration::from_secs(3));
    assert!(c.converged());
    assert_eq!(c.nodes[0].get("doomed"), None, "deleted key resurrected");
    assert_eq!(c.nodes[1].get("survivor"), Some(b("v")));
    assert_eq!(c.nodes[1].stats().entries_forgotten, 1);
    assert_eq!(c.nodes[1].stats().recoveries, 1);
}

/// The entries of `r` as a data directory would hand them to `Replica::restore`.
fn as_loaded(r: &Replica, last_wall_ms: u64) -> Loaded {
    Loaded {
        entries: r
            .store()
            .entries()
            .into_iter()
            .map(|(k, e)| (k, e.meta(), e))
            .map(|(k, m, e)| (k, e.value, e.version, m))
            .collect(),
        last_wall_ms,
        ..Loaded::default()
    }
}

#[test]
fn node_restarted_alone_for_longer_than_grace_recovers_when_it_meets_a_peer() {
    let grace = |n| {
        let mut c = cfg(n);
        c.tombstone_grace = Duration::from_secs(10);
        c
    };
    let mut c = Cluster::new(2, grace);
    c.connect_all();
    c.nodes[0].put(c.wall, "doomed", "v").unwrap();
    c.nodes[0].put(c.wall, "survivor", "v").unwrap();
    c.run(Duration::from_secs(1));
    // Node 2 restarts at once from its data directory (so it was not absent for long), but
    // hears no peer; meanwhile node 1 deletes "doomed" and collects the tombstone.
    c.cut = vec![(0, 1), (1, 0)];
    let (now, wall) = (c.now, c.wall);
    c.nodes[0].handle_peer_down(now, 2);
    let loaded = as_loaded(&c.nodes[1], wall);
    c.nodes[1] = Replica::restore(grace(2), now, wall, loaded);
    c.nodes[0].delete(c.wall, "doomed").unwrap();
    c.run(Duration::from_secs(15));
    assert_eq!(c.nodes[0].store().entry_count(), 1);
    assert_eq!(c.nodes[1].get("doomed"), Some(b("v")));
    // They meet after node 2 ran alone for longer than the grace period.
    c.cut.clear();
    c.connect_all();
    c.run(Duration::from_secs(3));
    assert!(c.converged());
    assert_eq!(c.nodes[0].get("doomed"), None, "deleted key resurrected");
    assert_eq!(c.nodes[1].get("survivor"), Some(b("v")));
    assert_eq!(c.nodes[1].stats().recoveries, 1);
}

#[test]
fn recovery_survives_the_first_peer_leaving_mid_sync() {
    let grace = |n| {
        let mut c = cfg(n);
        c.tombstone_grace = Duration::from_secs(10);
        c
    };
    let mut c = Cluster::new(2, grace);
    c.connect_all();
    c.nodes[0].put(c.wall, "doomed", "v").unwrap();
    c.nodes[0].put(c.wall, "survivor", "v").unwrap();
    c.run(Duration::from_secs(1));
    c.cut = vec![(0, 1), (1, 0)];
    let now = c.now;
    c.nodes[0].handle_peer_down(now, 2);
    c.nodes[1].handle_peer_down(now, 1);
    c.nodes[0].delete(c.wall, "doomed").unwrap();
    c.run(Duration::from_secs(15));
    // Node 2 hears node 1 again after the grace period, and loses it before any sync message
    // got through; alone, it reports in sync (the solo rule).
    let now = c.now;
    c.nodes[1].handle_peer_up(now, 1);
    assert_eq!(c.nodes[1].stats().recoveries, 1);
    c.nodes[1].handle_peer_down(now, 1);
    c.run(Duration::from_secs(1));
    assert!(c.nodes[1].is_in_sync());
    // When they meet again, node 2 still recovers: it forgets, not resurrects.
    c.cut.clear();
    c.connect_all();
    c.run(Duration::from_secs(3));
    assert!(c.converged());
    assert_eq!(c.nodes[0].get("doomed"), None, "deleted key resurrected");
    assert_eq!(c.nodes[1].get("survivor"), Some(b("v")));
    assert_eq!(c.nodes[1].stats().entries_forgotten, 1);
}

#[test]
fn solo_node_reports_in_sync_after_the_wait() {
    let mut c = Cluster::new(1, cfg);
    c.run(Duration::from_millis(200));
    assert!(!c.nodes[0].is_in_sync());
    c.run(Duration::from_millis(200));
    assert!(c.nodes[0].is_in_sync());
    assert_eq!(c.events(0), [ReplicaEvent::InSync]);
}

#[test]
fn sync_entries_too_far_in_the_future_are_rejected() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let msg = wire::Envelope {
        body: Some(wire::envelope::Body::Entries(wire::Entries {
            entries: vec![
                wire::Entry {
                    key: "ok".into(),
                    hlc: Hlc::new(WALL0, 0).0,
                    node: 2,
                    value: Some(b("1")),
                    ..Default::default()
                },
                wire::Entry {
                    key: "no".into(),
                    hlc: Hlc::new(WALL0 + 3_600_000, 0).0,
                    node: 2,
                    value: Some(b("1")),
                    ..Default::default()
                },
            ],
        })),
    }
    .encode_to_vec();
    r.handle_message(now, WALL0, 2, &msg);
    assert_eq!(r.get("ok"), Some(b("1")));
    assert_eq!(r.get("no"), None);
    assert_eq!(r.stats().drift_rejected, 1);
}

/// A write as it travels: writer node, version, ops.
#[derive(Debug, Clone)]
struct W {
    node: u64,
    hlc: Hlc,
    ops: Vec<(String, Option<String>)>,
}

fn arb_writes() -> impl Strategy<Value = Vec<W>> {
    let op = (0u8..12, proptest::option::of("[a-c]{0,3}")).prop_map(|(k, v)| (format!("k{k}"), v));
    let write = (
        2u64..5,
        0u64..20,
        0u16..3,
        proptest::collection::btree_map(op.clone().prop_map(|o| o.0), op.prop_map(|o| o.1), 1..4),
    )
        .prop_map(|(node, ms, logical, ops)| W {
            node,
            hlc: Hlc::new(WALL0 + ms, logical),
            ops: ops.into_iter().collect(),
        });
    proptest::collection::vec(write, 1..30)
}

fn encode(w: &W) -> Vec<u8> {
    write_msg(
        w.hlc,
        w.ops
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "proptest-regressions/replica.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_delivery_order_with_duplicates_gives_identical_stores(
        writes in arb_writes(),
        order in proptest::collection::vec(any::<proptest::sample::Index>(), 0..60),
        seed in any::<u64>(),
    ) {
        // Deduplicate writes with the same version (one writer never reuses a version).
        let mut by_version: BTreeMap<Version, W> = BTreeMap::new();
        for w in writes {
            by_version.entry(Version { hlc: w.hlc, node: w.node }).or_insert(w);
        }
        let writes: Vec<W> = by_version.into_values().collect();
        // Receiver A: in order. Receiver B: a permutation with duplicates.
        let now = Instant::now();
        let mut a = Replica::new(cfg(1), now);
        let mut bb = Replica::new(cfg(1), now);
        for w in &writes {
            a.handle_message(now, WALL0, w.node, &encode(w));
        }
        let mut sequence: Vec<&W> = writes.iter().collect();
        sequence.extend(order.iter().map(|i| &writes[i.index(writes.len())]));
        let mut rng = seed;
        for i in (1..sequence.len()).rev() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            sequence.swap(i, (rng >> 33) as usize % (i + 1));
        }
        for w in sequence {
            bb.handle_message(now, WALL0, w.node, &encode(w));
        }
        // Reference model: last writer wins by version.
        let mut model: BTreeMap<String, (Version, Option<String>)> = BTreeMap::new();
        for w in &writes {
            let v = Version { hlc: w.hlc, node: w.node };
            for (k, val) in &w.ops {
                if model.get(k).is_none_or(|(mv, _)| *mv < v) {
                    model.insert(k.clone(), (v, val.clone()));
                }
            }
        }
        let expected: BTreeMap<String, (Version, Option<Bytes>)> =
            model.into_iter().map(|(k, (v, val))| (k, (v, val.map(|s| b(&s))))).collect();
        prop_assert_eq!(contents(&a), expected.clone());
        prop_assert_eq!(contents(&bb), expected);
        prop_assert_eq!(a.digest(), bb.digest());
    }
}

/// Bytes and count of the `Entries` messages `r` has queued (drained; other messages
/// dropped).
fn drain_entries(r: &mut Replica) -> (usize, usize) {
    let (mut bytes, mut messages) = (0, 0);
    while let Some(out) = r.poll_outgoing() {
        let e = wire::Envelope::decode(out.payload.clone()).unwrap();
        if let Some(wire::envelope::Body::Entries(_)) = e.body {
            bytes += out.payload.len();
            messages += 1;
        }
    }
    (bytes, messages)
}

fn request(target: u64, keys: Vec<String>) -> Vec<u8> {
    wire::Envelope {
        body: Some(wire::envelope::Body::Request(wire::Request {
            target,
            keys,
        })),
    }
    .encode_to_vec()
}

#[test]
fn a_request_naming_one_key_many_times_costs_a_small_multiple_of_its_size() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    r.put(WALL0, "big", vec![7u8; 64 * 1024]).unwrap();
    r.put(WALL0, "small", "v").unwrap();
    while r.poll_outgoing().is_some() {}
    // Node 9 was never offered anything: it gets at most 3 × what it sends.
    let msg = request(1, vec!["big".to_owned(); 2000]);
    r.handle_message(now, WALL0, 9, &msg);
    let (bytes, _) = drain_entries(&mut r);
    assert!(
        bytes <= 3 * msg.len(),
        "{bytes} B answered to {} B",
        msg.len()
    );
    assert_eq!(r.stats().request_duplicates, 1999);
    assert_eq!(r.stats().answers_capped, 1);
    // A small key is answered once however often it is named.
    let msg = request(1, vec!["small".to_owned(); 500]);
    r.handle_message(now, WALL0, 9, &msg);
    let (bytes, messages) = drain_entries(&mut r);
    assert_eq!(messages, 1);
    assert!(bytes < 100, "{bytes}");
    // Requests naming another node are not answered at all.
    r.handle_message(now, WALL0, 9, &request(2, vec!["small".to_owned()]));
    assert_eq!(drain_entries(&mut r), (0, 0));
}

#[test]
fn answers_to_requests_stay_within_what_was_offered_plus_three_times_what_was_asked() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    let keys: Vec<String> = (0..50).map(|i| format!("key/{i:02}")).collect();
    for k in &keys {
        r.put(WALL0, k.as_str(), vec![1u8; 1024]).unwrap();
    }
    while r.poll_outgoing().is_some() {}
    // Node 9's digest differs in every bucket: node 1 answers with summaries, offering
    // node 9 its entries once.
    let digest = wire::Envelope {
        body: Some(wire::envelope::Body::Digest(wire::Digest {
            round: 1,
            buckets: vec![1; 16],
            reply_wanted: false,
            fresh: false,
        })),
    }
    .encode_to_vec();
    r.handle_message(now, WALL0, 9, &digest);
    assert!(r.stats().summaries_sent >= 1);
    while r.poll_outgoing().is_some() {}
    // Node 9 asks for everything, a hundred times over.
    let msg = request(1, keys.clone());
    let (mut answered, mut asked) = (0, 0);
    for _ in 0..100 {
        r.handle_message(now, WALL0, 9, &msg);
        asked += msg.len();
        answered += drain_entries(&mut r).0;
    }
    let store_bytes = 50 * (1024 + 40);
    assert!(
        answered >= 50 * 1024,
        "the offered entries were not all sent: {answered}"
    );
    assert!(
        answered <= store_bytes + 3 * asked,
        "{answered} B answered to {asked} B asked (offered about {store_bytes})"
    );
    assert!(r.stats().answers_capped > 0);
}

#[test]
fn answers_are_not_built_beyond_the_sync_backlog_room() {
    let now = Instant::now();
    let mut r = Replica::new(cfg(1), now);
    for i in 0..50 {
        r.put(WALL0, format!("key/{i:02}"), vec![1u8; 1024])
            .unwrap();
    }
    while r.poll_outgoing().is_some() {}
    // The requester's buckets are empty: node 1 sends its entries, as far as the room goes.
    let digest = wire::Envelope {
        body: Some(wire::envelope::Body::Digest(wire::Digest {
            round: 1,
            buckets: vec![0; 16],
            reply_wanted: false,
            fresh: true,
        })),
    }
    .encode_to_vec();
    r.set_sync_room(10_000);
    r.handle_message(now, WALL0, 9, &digest);
    let (bytes, _) = drain_entries(&mut r);
    assert!(bytes <= 10_000, "{bytes} B built for 10 000 B of room");
    assert!(bytes > 0);
    assert!(r.stats().answers_deferred > 0);
}

#[test]
fn large_values_still_sync_through_summaries_and_requests() {
    let now = Instant::now();
    let mut x = Replica::new(cfg(1), now);
    let mut y = Replica::new(cfg(2), now);
    // Both hold the same small keys (no bucket is empty at either node); x also holds large
    // values that y lacks.
    for i in 0..64 {
        let v = x.put(WALL0, format!("common/{i}"), "v").unwrap();
        let msg = write_msg(v.hlc, vec![(&format!("common/{i}"), Some("v"))]);
        y.handle_message(now, WALL0, 1, &msg);
    }
    for i in 0..20 {
        x.put(WALL0, format!("big/{i}"), vec![i as u8; 64 * 1024])
            .unwrap();
    }
    while x.poll_outgoing().is_some() {}
    while y.poll_outgoing().is_some() {}
    x.handle_peer_up(now, 2);
    y.handle_peer_up(now, 1);
    // y's digest reaches x; x answers with summaries; y requests what it lacks; x answers.
    let digest = wire::Envelope {
        body: Some(wire::envelope::Body::Digest(wire::Digest {
            round: 1,
            buckets: y.digest(),
            reply_wanted: true,
            fresh: false,
        })),
    }
    .encode_to_vec();
    x.handle_message(now, WALL0, 2, &digest);
    for _ in 0..4 {
        while let Some(out) = x.poll_outgoing() {
            y.handle_message(now, WALL0, 1, &out.payload);
        }
        while let Some(out) = y.poll_outgoing() {
            x.handle_message(now, WALL0, 2, &out.payload);
        }
    }
    assert!(y.stats().requests_sent > 0);
    assert_eq!(x.stats().answers_capped, 0);
    for i in 0..20 {
        assert_eq!(
            y.get(&format!("big/{i}")).map(|v| v.len()),
            Some(64 * 1024),
            "big/{i}"
        );
    }
}
