//! Owned keys over chorus-sim: the real `NodeCore`s remove a key whose owner leaves, crashes
//! (declared gone), restarts or is partitioned away, with ordinary versioned deletes that one
//! deputy issues; a healed owner writes its keys again.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use chorus_replication::{DEPUTY_STEP, NodeConfig, Op, PutMeta};
use chorus_sim::{LinkConfig, Sim, SimConfig};
use common::{SimNode, sim};

/// The harness's protocol preset (lossy): silence after which a member is gone.
fn leave_after(s: &Sim<SimNode>) -> Duration {
    let live = s.live_nodes()[0];
    s.node(live)
        .machine()
        .unwrap()
        .core
        .endpoint()
        .config()
        .leave_after
}

fn cluster(seed: u64, nodes: usize) -> Sim<SimNode> {
    let mut s = sim(
        SimConfig::new(seed, nodes).with_link(LinkConfig::lan()),
        |_: &mut NodeConfig| {},
    );
    assert!(
        s.run_until(
            |s| (0..nodes).all(|i| s.node(i).machine().unwrap().core.members().len() == nodes - 1),
            Duration::from_secs(10)
        ),
        "the nodes never met"
    );
    s
}

fn put_owned(s: &mut Sim<SimNode>, node: usize, key: &str, value: &str) {
    let (key, value) = (key.to_owned(), value.to_owned());
    s.act(node, move |m, now| {
        let meta = PutMeta {
            owned: true,
            ..PutMeta::default()
        };
        m.core
            .batch(now, vec![Op::put_with(key, value, meta)], 0)
            .unwrap()
    });
}

/// Whether node `i` holds a live `key`.
fn holds(s: &Sim<SimNode>, i: usize, key: &str) -> bool {
    s.node(i)
        .machine()
        .is_some_and(|m| m.core.store().get(key).is_some())
}

fn everywhere(s: &Sim<SimNode>, nodes: &[usize], key: &str, present: bool) -> bool {
    nodes.iter().all(|&i| holds(s, i, key) == present)
}

/// Deletes of gone owners' keys issued, summed over the live nodes.
fn deputy_deletes(s: &Sim<SimNode>) -> u64 {
    s.live_nodes()
        .iter()
        .map(|&i| s.node(i).machine().unwrap().core.stats().owned.deleted)
        .sum()
}

/// Deletes of `key` seen in change events of node `i`.
fn deletes_seen(s: &Sim<SimNode>, i: usize, key: &str) -> usize {
    s.node(i)
        .machine()
        .unwrap()
        .events
        .iter()
        .filter(|c| c.key == key && c.value.is_none())
        .count()
}

#[test]
fn a_graceful_stop_removes_the_owners_keys_at_once() {
    let mut s = cluster(31, 3);
    put_owned(&mut s, 0, "svc/a", "1");
    s.act(1, |m, now| m.core.put(now, "plain", "x").unwrap());
    assert!(s.run_until(
        |s| everywhere(s, &[0, 1, 2], "svc/a", true),
        Duration::from_secs(5)
    ));
    s.act(0, |m, now| m.core.shutdown(now));
    // The owner deletes its own keys before its goodbye: well before any failure detector.
    assert!(s.run_until(
        |s| everywhere(s, &[1, 2], "svc/a", false),
        Duration::from_secs(2)
    ));
    assert!(holds(&s, 1, "plain"), "a plain key stays");
    assert_eq!(deputy_deletes(&s), 0, "nobody else had to delete");
    assert_eq!(deletes_seen(&s, 2, "svc/a"), 1, "a watch sees one delete");
}

#[test]
fn a_crashed_owners_keys_go_when_it_is_declared_gone_with_one_deputy_deleting() {
    let mut s = cluster(32, 4);
    put_owned(&mut s, 2, "svc/c", "1");
    put_owned(&mut s, 2, "svc/c2", "2");
    put_owned(&mut s, 3, "svc/d", "3");
    s.run_for(Duration::from_secs(1));
    assert!(everywhere(&s, &[0, 1, 2, 3], "svc/c", true));
    let crashed_at = s.elapsed();
    s.crash(2);
    let gone = leave_after(&s);
    // Still there while the owner is merely silent.
    s.run_for(gone - Duration::from_secs(1));
    assert!(
        everywhere(&s, &[0, 1, 3], "svc/c", true),
        "deleted before the owner was gone"
    );
    assert!(s.run_until(
        |s| everywhere(s, &[0, 1, 3], "svc/c", false) && everywhere(s, &[0, 1, 3], "svc/c2", false),
        Duration::from_secs(3)
    ));
    let took = s.elapsed() - crashed_at;
    assert!(took <= gone + Duration::from_secs(1), "took {took:?}");
    // Another owner's key is untouched; one node (the deputy, node 0: the lowest id) deleted.
    assert!(everywhere(&s, &[0, 1, 3], "svc/d", true));
    s.run_for(DEPUTY_STEP * 4);
    assert_eq!(deputy_deletes(&s), 2, "one delete per key");
    assert_eq!(s.node(0).machine().unwrap().core.stats().owned.deleted, 2);
    assert_eq!(deletes_seen(&s, 3, "svc/c"), 1);
}

#[test]
fn when_the_deputy_dies_with_the_owner_the_next_member_deletes() {
    let mut s = cluster(33, 4);
    put_owned(&mut s, 3, "svc/x", "1");
    s.run_for(Duration::from_secs(1));
    // The owner and the would-be deputy (node 0) crash together.
    s.crash(3);
    s.crash(0);
    assert!(s.run_until(
        |s| everywhere(s, &[1, 2], "svc/x", false),
        leave_after(&s) + DEPUTY_STEP * 2
    ));
    s.run_for(DEPUTY_STEP * 4);
    assert_eq!(deputy_deletes(&s), 1);
}

#[test]
fn a_restarted_owner_loses_its_old_keys_and_gets_them_back_only_by_writing_them() {
    let mut s = cluster(34, 3);
    put_owned(&mut s, 1, "svc/r", "old");
    s.run_for(Duration::from_secs(1));
    assert!(everywhere(&s, &[0, 1, 2], "svc/r", true));
    s.restart(1);
    // The others see a new incarnation: the old life's key goes everywhere (the restarted
    // node included, once it synced), long before any timeout.
    assert!(s.run_until(
        |s| everywhere(s, &[0, 2], "svc/r", false),
        Duration::from_secs(5)
    ));
    s.run_for(Duration::from_secs(5));
    assert!(everywhere(&s, &[0, 1, 2], "svc/r", false));
    put_owned(&mut s, 1, "svc/r", "new");
    assert!(s.run_until(
        |s| everywhere(s, &[0, 1, 2], "svc/r", true),
        Duration::from_secs(5)
    ));
    assert_eq!(
        s.node(0).machine().unwrap().core.store().get("svc/r"),
        Some(bytes::Bytes::from("new"))
    );
}

#[test]
fn a_partitioned_owners_keys_go_on_the_other_side_and_come_back_when_it_heals() {
    let mut s = cluster(35, 3);
    put_owned(&mut s, 2, "svc/p", "v");
    s.run_for(Duration::from_secs(1));
    s.partition(&[2], &[0, 1]);
    let gone = leave_after(&s);
    assert!(s.run_until(
        |s| everywhere(s, &[0, 1], "svc/p", false),
        gone + Duration::from_secs(2)
    ));
    assert!(
        holds(&s, 2, "svc/p"),
        "the owner keeps its own key on its side"
    );
    s.heal();
    // It rejoins, sees the delete of its live key and writes it again with a newer version.
    assert!(s.run_until(
        |s| everywhere(s, &[0, 1, 2], "svc/p", true),
        Duration::from_secs(20)
    ));
    let reasserted = s.node(2).machine().unwrap().core.stats().owned.reasserted;
    assert!(reasserted >= 1, "re-asserted {reasserted} times");
    // Every store ends the same, and the key is still owned by node 2's life.
    s.run_for(Duration::from_secs(5));
    let entry = |i: usize| {
        s.node(i)
            .machine()
            .unwrap()
            .core
            .store()
            .get_entry("svc/p")
            .unwrap()
    };
    assert_eq!(entry(0).version, entry(2).version);
    assert_eq!(entry(1).owner, entry(2).owner);
    assert!(entry(0).owner.is_some());
}
