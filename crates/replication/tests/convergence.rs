//! Phase 3: convergence of real `NodeCore`s over chorus-sim under loss, duplication,
//! reordering, partitions, crash/restart and late joins, as a `proptest-state-machine` test.
//!
//! - The reference machine ([`World`]) knows the topology (which nodes exist and are up, which
//!   partitions are in force) and the last-writer-wins model: every acknowledged put, delete
//!   and batch applied to a `BTreeMap`. Its preconditions keep every transition valid (writes
//!   and crashes only on nodes that are up, restarts only of crashed nodes, at most
//!   [`MAX_NODES`] nodes, heal only while partitioned), also while shrinking.
//! - The system under test ([`Cluster`]) is a `Sim` of real `NodeCore`s on lossy links (up to
//!   50 % loss, duplication, reordering), each durable on a `MemoryDisk` (synced on every
//!   timer, which acknowledges the writes it covers). Versions are stamped by the nodes'
//!   HLCs, so it keeps every write with the version the node returned, and marks the writes a
//!   crash may have taken with it (no other live node held them or anything newer; after a
//!   `Kill`, which keeps the disk, not on that disk either). A `Crash` loses the node's disk
//!   with it (it restarts empty); a `Kill` keeps it (it restarts from what was synced).
//! - On a restart after a `Kill`, every write that node acknowledged must be in the store
//!   it loaded (at its version or a newer one).
//! - After every transition the topology of the simulator must match the reference and no
//!   watch may have seen a key go backwards. At the end everything is healed and restarted
//!   and must settle; then every node's store must equal the LWW model by version (exactly for
//!   keys with no possibly-lost write, otherwise a write at least as new as every surviving
//!   one), no deleted key may come back, and every watch (prefixes [`WATCHES`], from the start
//!   of each node's life) must have seen every change of its prefix exactly once, per key in
//!   version order, ending at the store's contents.
//!
//! `PROPTEST_CASES` sets the number of random scenarios (default 256). A failing case prints
//! the simulation seed in its message and in the reduced initial state (the simulator also
//! prints `seed=...` when a run panics).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus_replication::{Change, Op, Version};
use chorus_sim::{LinkConfig, Sim, SimConfig};
use common::{Disks, SimNode, run_until_settled, sim, sim_durable};
use proptest::prelude::*;
use proptest::strategy::Union;
use proptest::test_runner::FileFailurePersistence;
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest, prop_state_machine};

/// Most nodes a scenario grows to by late joins.
const MAX_NODES: usize = 6;
/// Keys are drawn from `0..KEYS` (see [`key`]).
const KEYS: u8 = 10;
/// Prefixes every node is watched on: everything, two disjoint groups, one single key.
const WATCHES: [&str; 4] = ["", "app/", "sys/", "app/3"];

fn key(k: u8) -> String {
    if k < 6 {
        format!("app/{k}")
    } else {
        format!("sys/{k}")
    }
}

fn val(v: u8) -> Bytes {
    Bytes::from(vec![v; 1 + usize::from(v % 7)])
}

/// One transition of a scenario.
#[derive(Debug, Clone)]
enum Step {
    Put {
        node: usize,
        key: u8,
        value: u8,
    },
    Delete {
        node: usize,
        key: u8,
    },
    /// Atomic batch: `None` deletes the key.
    Batch {
        node: usize,
        ops: BTreeMap<u8, Option<u8>>,
    },
    Wait {
        ms: u16,
    },
    /// Cuts `side` off from every other node existing now (both directions).
    Partition {
        side: Vec<usize>,
    },
    Heal,
    /// The node and its disk are lost (it restarts empty).
    Crash {
        node: usize,
    },
    /// The process dies (`kill -9`); its disk keeps what was synced.
    Kill {
        node: usize,
    },
    Restart {
        node: usize,
    },
    AddNode,
}

/// The reference state.
#[derive(Debug, Clone)]
struct World {
    /// Seed of the simulation (network draws and every node's RNG).
    seed: u64,
    /// Loss of every link, in percent, until the final heal.
    loss_pct: u8,
    /// Per node (simulator index): whether it is up.
    up: Vec<bool>,
    /// Partitions in force: the two sides of each cut.
    cuts: Vec<(Vec<usize>, Vec<usize>)>,
    /// Last writer wins over every acknowledged write, applied in the order of issue. Every
    /// node stamps versions from one shared virtual clock and writes are at least 20 ms apart,
    /// so issue order is version order (the system under test asserts it).
    model: BTreeMap<u8, Option<u8>>,
}

impl World {
    fn is_up(&self, node: usize) -> bool {
        self.up.get(node).copied().unwrap_or(false)
    }
}

impl ReferenceStateMachine for World {
    type State = World;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<World> {
        (
            any::<u64>(),
            2usize..=4,
            prop_oneof![Just(0u8), Just(20u8), Just(50u8)],
        )
            .prop_map(|(seed, nodes, loss_pct)| World {
                seed,
                loss_pct,
                up: vec![true; nodes],
                cuts: Vec::new(),
                model: BTreeMap::new(),
            })
            .boxed()
    }

    fn transitions(w: &World) -> BoxedStrategy<Step> {
        let n = w.up.len();
        let up: Vec<usize> = (0..n).filter(|&i| w.up[i]).collect();
        let down: Vec<usize> = (0..n).filter(|&i| !w.up[i]).collect();
        let mut options: Vec<(u32, BoxedStrategy<Step>)> = vec![
            (5, (0u16..800).prop_map(|ms| Step::Wait { ms }).boxed()),
            // Long enough for suspicion and leave (lossy preset: 3 s / 15 s) inside a partition.
            (
                1,
                (4_000u16..20_000).prop_map(|ms| Step::Wait { ms }).boxed(),
            ),
            (
                1,
                proptest::sample::subsequence((0..n).collect::<Vec<_>>(), 1..n)
                    .prop_map(|side| Step::Partition { side })
                    .boxed(),
            ),
        ];
        if !up.is_empty() {
            let on = || proptest::sample::select(up.clone());
            options.extend([
                (
                    6,
                    (on(), 0..KEYS, any::<u8>())
                        .prop_map(|(node, key, value)| Step::Put { node, key, value })
                        .boxed(),
                ),
                (
                    3,
                    (on(), 0..KEYS)
                        .prop_map(|(node, key)| Step::Delete { node, key })
                        .boxed(),
                ),
                (
                    2,
                    (
                        on(),
                        proptest::collection::btree_map(
                            0..KEYS,
                            proptest::option::of(any::<u8>()),
                            1..5,
                        ),
                    )
                        .prop_map(|(node, ops)| Step::Batch { node, ops })
                        .boxed(),
                ),
                (1, on().prop_map(|node| Step::Crash { node }).boxed()),
                (1, on().prop_map(|node| Step::Kill { node }).boxed()),
            ]);
        }
        if !w.cuts.is_empty() {
            options.push((1, Just(Step::Heal).boxed()));
        }
        if !down.is_empty() {
            options.push((
                1,
                proptest::sample::select(down)
                    .prop_map(|node| Step::Restart { node })
                    .boxed(),
            ));
        }
        if n < MAX_NODES {
            options.push((1, Just(Step::AddNode).boxed()));
        }
        Union::new_weighted(options).boxed()
    }

    fn preconditions(w: &World, step: &Step) -> bool {
        let n = w.up.len();
        match step {
            Step::Put { node, .. }
            | Step::Delete { node, .. }
            | Step::Batch { node, .. }
            | Step::Crash { node }
            | Step::Kill { node } => w.is_up(*node),
            Step::Restart { node } => *node < n && !w.up[*node],
            Step::Partition { side } => {
                !side.is_empty() && side.len() < n && side.iter().all(|&i| i < n)
            }
            Step::Heal => !w.cuts.is_empty(),
            Step::AddNode => n < MAX_NODES,
            Step::Wait { .. } => true,
        }
    }

    fn apply(mut w: World, step: &Step) -> World {
        match step {
            Step::Put { key, value, .. } => {
                w.model.insert(*key, Some(*value));
            }
            Step::Delete { key, .. } => {
                w.model.insert(*key, None);
            }
            Step::Batch { ops, .. } => w.model.extend(ops.iter().map(|(k, v)| (*k, *v))),
            Step::Wait { .. } => {}
            Step::Partition { side } => {
                let other = (0..w.up.len()).filter(|i| !side.contains(i)).collect();
                w.cuts.push((side.clone(), other));
            }
            Step::Heal => w.cuts.clear(),
            Step::Crash { node } | Step::Kill { node } => w.up[*node] = false,
            Step::Restart { node } => w.up[*node] = true,
            Step::AddNode => w.up.push(true),
        }
        w
    }
}

/// One acknowledged write, as the node stamped it.
#[derive(Debug, Clone)]
struct Rec {
    version: Version,
    /// Key number of the reference model.
    id: u8,
    key: String,
    value: Option<Bytes>,
    /// The write may have been lost with a crashed node (no live node held it or anything
    /// newer for its key when a holder crashed).
    at_risk: bool,
    /// The node that took it and the ticket of its command.
    node: usize,
    ticket: u64,
}

/// The system under test.
struct Cluster {
    seed: u64,
    sim: Sim<SimNode>,
    /// Every acknowledged write, in issue (and so version) order.
    writes: Vec<Rec>,
    /// The reference model after the latest transition (teardown sees no reference state).
    model: BTreeMap<u8, Option<u8>>,
    /// Every node's disk (a `Crash` removes the node's, a `Kill` keeps it).
    disks: Disks,
    /// Per killed node: the writes it had acknowledged when it was killed (checked when it
    /// restarts from its disk).
    killed: BTreeMap<usize, Vec<Rec>>,
}

impl Cluster {
    /// Issues `ops` as one batch on `node` and records what it acknowledged.
    fn write(&mut self, node: usize, ops: &BTreeMap<u8, Option<u8>>) {
        let seed = self.seed;
        let wire: Vec<Op> = ops
            .iter()
            .map(|(k, v)| match v {
                Some(v) => Op::put(key(*k), val(*v)),
                None => Op::delete(key(*k)),
            })
            .collect();
        let ticket = self.writes.len() as u64;
        let version = self
            .sim
            .act(node, |m, now| m.core.batch(now, wire, ticket))
            .unwrap_or_else(|| panic!("seed={seed}: node {node} is down, the reference has it up"))
            .unwrap_or_else(|e| panic!("seed={seed}: node {node} refused a write: {e}"));
        if let Some(last) = self.writes.last() {
            assert!(
                version > last.version,
                "seed={seed}: a later write on node {node} got version {version}, not above {}",
                last.version
            );
        }
        self.writes.extend(ops.iter().map(|(k, v)| Rec {
            version,
            id: *k,
            key: key(*k),
            value: v.map(val),
            at_risk: false,
            node,
            ticket,
        }));
    }

    /// The writes `node` acknowledged in its current life (a ticket answered `Ok`).
    fn acknowledged_by(&self, node: usize) -> Vec<Rec> {
        let Some(m) = self.sim.node(node).machine() else {
            return Vec::new();
        };
        let acked: std::collections::HashSet<u64> = m
            .acked
            .iter()
            .filter(|(_, r)| r.is_ok())
            .map(|(t, _)| *t)
            .collect();
        self.writes
            .iter()
            .filter(|r| r.node == node && acked.contains(&r.ticket))
            .cloned()
            .collect()
    }

    /// The process of `node` dies; its disk keeps what was synced.
    fn kill(&mut self, node: usize) {
        let acked = self.acknowledged_by(node);
        let disk = self.disks.borrow().get(&node).cloned();
        let kept = |rec: &Rec| {
            disk.as_ref().is_some_and(|d| {
                d.borrow()
                    .durable_state()
                    .get(&rec.key)
                    .is_some_and(|(_, v, _)| *v >= rec.version)
            })
        };
        let kept_now: Vec<bool> = self.writes.iter().map(kept).collect();
        self.mark_at_risk_unless(node, &kept_now);
        self.killed.insert(node, acked);
        self.sim.crash(node);
    }

    /// After `node` restarted: every write it acknowledged before it was killed is in the
    /// store it loaded from its disk.
    fn check_restored(&mut self, node: usize) {
        let Some(acked) = self.killed.remove(&node) else {
            return;
        };
        let seed = self.seed;
        let store = self.sim.node(node).machine().unwrap().core.store().clone();
        for rec in acked {
            let held = store.get_entry(&rec.key).map(|e| e.version);
            assert!(
                held.is_some_and(|v| v >= rec.version),
                "seed={seed}: node {node} acknowledged {} at {} and restarted from its disk with {held:?}",
                rec.key,
                rec.version
            );
        }
    }

    /// Marks every write that no live node other than `crashed` holds (or supersedes) as at
    /// risk.
    fn mark_at_risk(&mut self, crashed: usize) {
        let none = vec![false; self.writes.len()];
        self.mark_at_risk_unless(crashed, &none);
    }

    /// As [`mark_at_risk`](Cluster::mark_at_risk), except the writes marked `kept` (they
    /// survive on the crashed node's disk).
    fn mark_at_risk_unless(&mut self, crashed: usize, kept: &[bool]) {
        let others: Vec<_> = self
            .sim
            .live_nodes()
            .into_iter()
            .filter(|i| *i != crashed)
            .filter_map(|i| self.sim.node(i).machine().map(|m| m.core.store().clone()))
            .collect();
        for (rec, _) in self
            .writes
            .iter_mut()
            .zip(kept)
            .filter(|(r, kept)| !r.at_risk && !**kept)
        {
            let held = others.iter().any(|s| {
                s.get_entry(&rec.key)
                    .is_some_and(|e| e.version >= rec.version)
            });
            if !held {
                rec.at_risk = true;
            }
        }
    }
}

impl StateMachineTest for Cluster {
    type SystemUnderTest = Cluster;
    type Reference = World;

    fn init_test(w: &World) -> Cluster {
        let link = LinkConfig::lan()
            .with_loss(f64::from(w.loss_pct) / 100.0)
            .with_duplicate(0.05)
            .with_reorder(0.1, Duration::from_millis(20));
        let disks = Disks::default();
        let mut sim = sim_durable(
            SimConfig::new(w.seed, w.up.len()).with_link(link),
            |_| {},
            disks.clone(),
        );
        sim.run_for(Duration::from_millis(500));
        Cluster {
            seed: w.seed,
            sim,
            writes: Vec::new(),
            model: w.model.clone(),
            disks,
            killed: BTreeMap::new(),
        }
    }

    fn apply(mut c: Cluster, w: &World, step: Step) -> Cluster {
        match step {
            Step::Put { node, key, value } => c.write(node, &BTreeMap::from([(key, Some(value))])),
            Step::Delete { node, key } => c.write(node, &BTreeMap::from([(key, None)])),
            Step::Batch { node, ops } => c.write(node, &ops),
            Step::Wait { ms } => c.sim.run_for(Duration::from_millis(u64::from(ms))),
            Step::Partition { side } => {
                let other: Vec<usize> = (0..c.sim.len()).filter(|i| !side.contains(i)).collect();
                c.sim.partition(&side, &other);
            }
            Step::Heal => c.sim.heal(),
            Step::Crash { node } => {
                c.mark_at_risk(node);
                c.disks.borrow_mut().remove(&node);
                c.sim.crash(node);
            }
            Step::Kill { node } => c.kill(node),
            Step::Restart { node } => {
                c.sim.restart(node);
                c.check_restored(node);
            }
            Step::AddNode => {
                c.sim.add_node();
            }
        }
        c.sim.run_for(Duration::from_millis(20));
        c.model = w.model.clone();
        c
    }

    fn check_invariants(c: &Cluster, w: &World) {
        let seed = c.seed;
        let s = &c.sim;
        assert_eq!(s.len(), w.up.len(), "seed={seed}: node count");
        for (i, up) in w.up.iter().enumerate() {
            assert_eq!(s.node(i).is_up(), *up, "seed={seed}: node {i} up");
        }
        assert_eq!(
            s.is_partitioned(),
            !w.cuts.is_empty(),
            "seed={seed}: partitioned"
        );
        for (a, b) in &w.cuts {
            for (x, y) in a.iter().flat_map(|x| b.iter().map(move |y| (*x, *y))) {
                assert!(
                    s.is_blocked(x, y) && s.is_blocked(y, x),
                    "seed={seed}: {x} and {y} should be cut"
                );
            }
        }
        for i in s.live_nodes() {
            let m = s.node(i).machine().unwrap();
            assert!(
                m.order_violations.is_empty(),
                "seed={seed}: node {i} events out of order: {:?}",
                m.order_violations
            );
        }
    }

    fn teardown(mut c: Cluster) {
        // Bring every node back (a killed one from its disk, checked at once).
        for i in 0..c.sim.len() {
            if !c.sim.node(i).is_up() {
                c.sim.restart(i);
                c.check_restored(i);
            }
        }
        let Cluster {
            seed,
            mut sim,
            writes,
            model,
            ..
        } = c;
        // Heal everything, bring every node back, let it settle.
        sim.heal();
        sim.clear_link_overrides();
        sim.set_default_link(LinkConfig::lan());
        let ok = run_until_settled(
            &mut sim,
            Duration::from_millis(250),
            Duration::from_secs(120),
        );
        assert!(
            ok,
            "seed={seed}: did not settle within 120 s of virtual time"
        );
        for i in 0..sim.len() {
            sim.act(i, |m, _| m.drain());
        }
        let reference = sim.node(0).machine().unwrap().contents();
        for i in 0..sim.len() {
            let m = sim.node(i).machine().unwrap();
            assert!(
                m.order_violations.is_empty(),
                "seed={seed}: node {i} events out of order: {:?}",
                m.order_violations
            );
            assert_eq!(m.contents(), reference, "seed={seed}: node {i} differs");
            check_watches(seed, i, m);
        }
        check_lww(seed, &writes, &model, &reference);
    }
}

/// Every watch of node `i` saw every change of its prefix exactly once (the same changes as
/// the node's change log), per key in version order, and ends at the store's contents. A
/// watch from the start of a life restored from disk starts from the store it loaded (at
/// the revision it loaded at).
fn check_watches(seed: u64, i: usize, m: &SimNode) {
    let revisions: Vec<u64> = m.events.iter().map(|c| c.revision).collect();
    let expected: Vec<u64> = (m.initial_revision + 1..=m.core.store().revision()).collect();
    assert_eq!(
        revisions, expected,
        "seed={seed}: node {i}: change events are not every revision exactly once"
    );
    let contents = m.contents();
    for prefix in WATCHES {
        let seen: Vec<Change> = m
            .events
            .iter()
            .filter(|c| c.key.starts_with(prefix))
            .cloned()
            .collect();
        let log = m
            .core
            .changes_since(m.initial_revision, prefix)
            .unwrap_or_else(|e| panic!("seed={seed}: node {i}: change log compacted: {e:?}"));
        assert_eq!(
            seen, log,
            "seed={seed}: node {i}: watch {prefix:?} differs from the change log"
        );
        let mut view: BTreeMap<String, (Version, Option<Bytes>)> = m
            .initial
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        for c in seen {
            if let Some((prev, _)) = view.get(&c.key) {
                assert!(
                    c.version > *prev,
                    "seed={seed}: node {i}: watch {prefix:?} saw {} at {} after {prev}",
                    c.key,
                    c.version
                );
            }
            view.insert(c.key, (c.version, c.value));
        }
        let stored: BTreeMap<String, (Version, Option<Bytes>)> = contents
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        assert_eq!(
            view, stored,
            "seed={seed}: node {i}: watch {prefix:?} does not end at the store's contents"
        );
    }
}

/// The converged store against the acknowledged writes and the reference model.
fn check_lww(
    seed: u64,
    writes: &[Rec],
    model: &BTreeMap<u8, Option<u8>>,
    store: &BTreeMap<String, (Version, Option<Bytes>)>,
) {
    let mut by_key: BTreeMap<u8, Vec<&Rec>> = BTreeMap::new();
    for r in writes {
        by_key.entry(r.id).or_default().push(r);
    }
    assert_eq!(
        by_key.keys().collect::<Vec<_>>(),
        model.keys().collect::<Vec<_>>(),
        "seed={seed}: keys written differ from the reference's"
    );
    for (id, recs) in &by_key {
        let k = key(*id);
        // The LWW winner by version over every acknowledged write: the reference's value.
        let newest = recs.iter().max_by_key(|r| r.version).unwrap();
        assert_eq!(
            newest.value,
            model[id].map(val),
            "seed={seed}: {k}: the newest version is not the reference's last write"
        );
        let certain = recs.iter().filter(|r| !r.at_risk).max_by_key(|r| r.version);
        let held = store.get(&k);
        if recs.iter().all(|r| !r.at_risk) {
            // Nothing of this key can have been lost: the store holds exactly the model.
            assert_eq!(
                held,
                Some(&(newest.version, newest.value.clone())),
                "seed={seed}: {k} differs from the LWW model"
            );
        }
        // Otherwise: the winner over certain writes, or a newer write that may have escaped.
        match held {
            None => assert!(
                certain.is_none(),
                "seed={seed}: {k} missing, expected {:?}",
                certain.map(|r| r.version)
            ),
            Some((v, value)) => {
                assert!(
                    certain.is_none_or(|c| *v >= c.version),
                    "seed={seed}: {k} at {v} older than acknowledged {:?}",
                    certain.map(|r| r.version)
                );
                let rec = recs.iter().find(|r| r.version == *v);
                assert!(
                    rec.is_some_and(|r| &r.value == value),
                    "seed={seed}: {k} holds {value:?} at {v}, not a write of the model"
                );
            }
        }
        // No deleted key resurrects: after a surviving delete, only a newer put may show.
        if let Some(d) = certain.filter(|r| r.value.is_none())
            && let Some((v, Some(_))) = held
        {
            assert!(
                *v > d.version,
                "seed={seed}: {k} deleted at {} came back at {v}",
                d.version
            );
        }
    }
    for k in store.keys() {
        assert!(
            writes.iter().any(|r| &r.key == k),
            "seed={seed}: {k} was never written"
        );
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

prop_state_machine! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/convergence.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stores_converge_to_the_lww_model_under_faults(sequential 5..60 => Cluster);
}

/// Keys the late joiner catches up: `CHORUS_LATE_JOIN_KEYS` (a multiple of 100), default 10 000.
fn late_join_keys() -> usize {
    std::env::var("CHORUS_LATE_JOIN_KEYS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(10_000, |k| k.max(100) / 100 * 100)
}

#[test]
fn late_joiner_catches_up_ten_thousand_keys() {
    let keys = late_join_keys();
    let mut s = sim(SimConfig::new(2024, 3).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    for batch in 0..keys / 100 {
        let ops: Vec<Op> = (0..100)
            .map(|i| {
                Op::put(
                    format!("app/{batch:04}/{i:03}"),
                    Bytes::from(vec![b'x'; 100]),
                )
            })
            .collect();
        s.act(batch % 3, |m, now| {
            m.core.batch(now, ops, batch as u64).unwrap()
        });
        s.run_for(Duration::from_millis(10));
    }
    assert!(run_until_settled(
        &mut s,
        Duration::from_millis(100),
        Duration::from_secs(60)
    ));
    let joined_at = s.elapsed();
    let j = s.add_node();
    assert!(
        run_until_settled(&mut s, Duration::from_millis(10), Duration::from_secs(120)),
        "joiner never caught up"
    );
    let took = s.elapsed() - joined_at;
    let m = s.node(j).machine().unwrap();
    assert_eq!(m.core.store().len(), keys);
    assert!(m.in_sync);
    let st = m.core.stats();
    println!(
        "late joiner caught up {keys} keys in {took:?} of virtual time ({} entries received, {} digests received)",
        st.replication.entries_received, st.replication.digests_received
    );
    let answered: Vec<u64> = (0..3)
        .map(|i| {
            s.node(i)
                .machine()
                .unwrap()
                .core
                .stats()
                .replication
                .buckets_answered
        })
        .collect();
    println!("buckets answered per member: {answered:?}");
}
