//! Phase 3: convergence of real `NodeCore`s over chorus-sim under loss, duplication,
//! reordering, partitions, crash/restart and late joins, checked against a
//! last-writer-wins reference model.
//!
//! `PROPTEST_CASES` sets the number of random scenarios (default 64). A failing case prints
//! the simulation seed (the simulator also prints `seed=...` when a run panics).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use chorus_replication::{Op, Version};
use chorus_sim::{LinkConfig, Sim, SimConfig};
use common::{SimNode, run_until_settled, sim};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

#[derive(Debug, Clone)]
enum Action {
    Put {
        node: usize,
        key: u8,
        value: u8,
    },
    Delete {
        node: usize,
        key: u8,
    },
    Batch {
        node: usize,
        ops: BTreeMap<u8, Option<u8>>,
    },
    Wait {
        ms: u16,
    },
    Partition {
        mask: u8,
    },
    Heal,
    Crash {
        node: usize,
    },
    Restart {
        node: usize,
    },
    AddNode,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0usize..8, 0u8..10, any::<u8>()).prop_map(|(node, key, value)| Action::Put { node, key, value }),
        3 => (0usize..8, 0u8..10).prop_map(|(node, key)| Action::Delete { node, key }),
        2 => (0usize..8, proptest::collection::btree_map(0u8..10, proptest::option::of(any::<u8>()), 1..5))
            .prop_map(|(node, ops)| Action::Batch { node, ops }),
        5 => (0u16..800).prop_map(|ms| Action::Wait { ms }),
        // Long enough for suspicion and leave (lossy preset: 3 s / 15 s) inside a partition.
        1 => (4_000u16..20_000).prop_map(|ms| Action::Wait { ms }),
        1 => any::<u8>().prop_map(|mask| Action::Partition { mask }),
        1 => Just(Action::Heal),
        1 => (0usize..8).prop_map(|node| Action::Crash { node }),
        1 => (0usize..8).prop_map(|node| Action::Restart { node }),
        1 => Just(Action::AddNode),
    ]
}

/// One acknowledged write of the reference model.
#[derive(Debug, Clone)]
struct Rec {
    version: Version,
    key: String,
    value: Option<Bytes>,
    /// The write may have been lost with a crashed node (no live node held it or anything
    /// newer for its key when a holder crashed).
    at_risk: bool,
}

fn key(k: u8) -> String {
    format!("key/{k}")
}

fn val(v: u8) -> Bytes {
    Bytes::from(vec![v; 1 + usize::from(v % 7)])
}

/// Marks every write that no live node other than `crashed` holds (or supersedes) as at risk.
fn mark_at_risk(sim: &Sim<SimNode>, crashed: usize, model: &mut [Rec]) {
    let others: Vec<_> = sim
        .live_nodes()
        .into_iter()
        .filter(|i| *i != crashed)
        .filter_map(|i| sim.node(i).machine().map(|m| m.core.store().clone()))
        .collect();
    for rec in model.iter_mut().filter(|r| !r.at_risk) {
        let held = others.iter().any(|s| {
            s.get_entry(&rec.key)
                .is_some_and(|e| e.version >= rec.version)
        });
        if !held {
            rec.at_risk = true;
        }
    }
}

fn run_scenario(
    seed: u64,
    nodes: usize,
    loss: f64,
    actions: &[Action],
) -> Result<(), TestCaseError> {
    let link = LinkConfig::lan()
        .with_loss(loss)
        .with_duplicate(0.05)
        .with_reorder(0.1, Duration::from_millis(20));
    let mut s = sim(SimConfig::new(seed, nodes).with_link(link), |_| {});
    let mut model: Vec<Rec> = Vec::new();
    let record = |model: &mut Vec<Rec>, version: Version, ops: Vec<Op>| {
        for op in ops {
            let (k, v) = match op {
                Op::Put { key, value } => (key, Some(value)),
                Op::Delete { key } => (key, None),
            };
            model.push(Rec {
                version,
                key: k,
                value: v,
                at_risk: false,
            });
        }
    };
    s.run_for(Duration::from_millis(500));
    for a in actions {
        let n = s.len();
        match a {
            Action::Put {
                node,
                key: k,
                value,
            } => {
                let ops = vec![Op::Put {
                    key: key(*k),
                    value: val(*value),
                }];
                if let Some(v) = s.act(node % n, |m, now| m.core.batch(now, ops.clone()).unwrap()) {
                    record(&mut model, v, ops);
                }
            }
            Action::Delete { node, key: k } => {
                let ops = vec![Op::Delete { key: key(*k) }];
                if let Some(v) = s.act(node % n, |m, now| m.core.batch(now, ops.clone()).unwrap()) {
                    record(&mut model, v, ops);
                }
            }
            Action::Batch { node, ops } => {
                let ops: Vec<Op> = ops
                    .iter()
                    .map(|(k, v)| match v {
                        Some(v) => Op::Put {
                            key: key(*k),
                            value: val(*v),
                        },
                        None => Op::Delete { key: key(*k) },
                    })
                    .collect();
                if let Some(v) = s.act(node % n, |m, now| m.core.batch(now, ops.clone()).unwrap()) {
                    record(&mut model, v, ops);
                }
            }
            Action::Wait { ms } => s.run_for(Duration::from_millis(u64::from(*ms))),
            Action::Partition { mask } => {
                let (a, b): (Vec<usize>, Vec<usize>) =
                    (0..n).partition(|i| mask & (1 << (i % 8)) != 0);
                if !a.is_empty() && !b.is_empty() {
                    s.partition(&a, &b);
                }
            }
            Action::Heal => s.heal(),
            Action::Crash { node } => {
                let i = node % n;
                if s.node(i).is_up() {
                    mark_at_risk(&s, i, &mut model);
                    s.crash(i);
                }
            }
            Action::Restart { node } => {
                let i = node % n;
                if s.node(i).is_up() {
                    mark_at_risk(&s, i, &mut model);
                }
                s.restart(i);
            }
            Action::AddNode => {
                if n < 6 {
                    s.add_node();
                }
            }
        }
        s.run_for(Duration::from_millis(20));
    }
    // Heal everything, bring every node back, let it settle.
    s.heal();
    s.clear_link_overrides();
    s.set_default_link(LinkConfig::lan());
    for i in 0..s.len() {
        if !s.node(i).is_up() {
            s.restart(i);
        }
    }
    let ok = run_until_settled(&mut s, Duration::from_millis(250), Duration::from_secs(120));
    prop_assert!(
        ok,
        "seed={seed}: did not settle within 120 s of virtual time"
    );
    let reference = s.node(0).machine().unwrap().contents();
    for i in 0..s.len() {
        let m = s.node(i).machine().unwrap();
        prop_assert!(
            m.order_violations.is_empty(),
            "seed={seed}: node {i} events out of order: {:?}",
            m.order_violations
        );
        prop_assert_eq!(
            &m.contents(),
            &reference,
            "seed={}: node {} differs",
            seed,
            i
        );
    }
    // Every key: the winner over certain writes, or a newer write that may have escaped.
    let mut keys: Vec<&String> = model.iter().map(|r| &r.key).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let certain = model
            .iter()
            .filter(|r| &r.key == k && !r.at_risk)
            .map(|r| r.version)
            .max();
        match reference.get(k) {
            None => prop_assert!(
                certain.is_none(),
                "seed={seed}: {k} missing, expected {certain:?}"
            ),
            Some((v, value)) => {
                prop_assert!(
                    certain.is_none_or(|c| *v >= c),
                    "seed={seed}: {k} at {v} older than acknowledged {certain:?}"
                );
                let rec = model.iter().find(|r| &r.key == k && r.version == *v);
                prop_assert!(
                    rec.is_some_and(|r| &r.value == value),
                    "seed={seed}: {k} holds {value:?} at {v}, not a write of the model"
                );
            }
        }
    }
    for k in reference.keys() {
        prop_assert!(
            model.iter().any(|r| &r.key == k),
            "seed={seed}: {k} was never written"
        );
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/convergence.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn stores_converge_to_the_lww_model_under_faults(
        seed in any::<u64>(),
        nodes in 2usize..=4,
        loss in prop_oneof![Just(0.0), Just(0.2), Just(0.5)],
        actions in proptest::collection::vec(action(), 5..60),
    ) {
        run_scenario(seed, nodes, loss, &actions)?;
    }
}

#[test]
fn late_joiner_catches_up_ten_thousand_keys() {
    let mut s = sim(SimConfig::new(2024, 3).with_link(LinkConfig::lan()), |_| {});
    s.run_for(Duration::from_secs(1));
    for batch in 0..100 {
        let ops: Vec<Op> = (0..100)
            .map(|i| Op::Put {
                key: format!("app/{batch:03}/{i:03}"),
                value: Bytes::from(vec![b'x'; 100]),
            })
            .collect();
        s.act(batch % 3, |m, now| m.core.batch(now, ops).unwrap());
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
    assert_eq!(m.core.store().len(), 10_000);
    assert!(m.in_sync);
    let st = m.core.stats();
    println!(
        "late joiner caught up 10000 keys in {took:?} of virtual time ({} entries received, {} digests received)",
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
