//! Scale: 50 real endpoints, 10 % independent loss per link, one sender, a few hundred
//! messages. Measures NAK implosion: NAKs sent by all receivers per datagram lost on the wire.
//!
//! Run with `cargo test -p chorus-sim --test scale -- --nocapture` to see the figures;
//! `CHORUS_SIM_SEED` pins the seed.

mod common;

use std::time::Duration;

use chorus_sim::{LinkConfig, SimConfig};
use common::{Cluster, Preset, payload, replay_hint};

const NODES: usize = 50;
const MESSAGES: u64 = 300;
const LOSS: f64 = 0.1;

#[test]
fn fifty_nodes_ten_percent_loss_no_nak_implosion() {
    let seed = chorus_sim::seed_from_env().unwrap_or(0x5CA1E);
    let hint = replay_hint(seed, "scale");
    let config = SimConfig::new(seed, NODES)
        .with_link(LinkConfig::lan().with_loss(LOSS))
        .with_max_events(20_000_000);
    let mut cluster = Cluster::new(config, Preset::Lan, false);
    // Let membership form before the first message.
    let members_known = cluster.run_until_empty(
        Cluster::membership_gaps,
        Duration::from_millis(100),
        Duration::from_secs(10),
    );
    assert!(
        members_known.is_empty(),
        "{hint}: membership did not form: {members_known:?}"
    );

    let sender_lost_before = cluster.sim.node(0).net_stats().clone();
    for i in 0..MESSAGES {
        let len = 100 + (i as usize * 37) % 900;
        let seq = cluster
            .send(0, payload(seed, 0, i, len))
            .expect("sender is up")
            .expect("window has room");
        assert_eq!(seq, i + 1);
        cluster.sim.run_for(Duration::from_millis(10));
    }
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(20),
        Duration::from_secs(30),
    );
    cluster.sim.run_for(Duration::from_secs(1));
    assert!(
        gaps.is_empty(),
        "{hint}: not all delivered: {:?}",
        &gaps[..gaps.len().min(5)]
    );
    let violations = cluster.violations();
    assert!(violations.is_empty(), "{hint}: {violations:?}");
    let ledger = cluster.ledger.borrow();
    assert_eq!(
        ledger.lost_messages, 0,
        "{hint}: messages reported Lost at 10 % loss"
    );
    assert_eq!(ledger.delivered, MESSAGES * (NODES as u64 - 1));
    drop(ledger);

    let sender = cluster.sim.node(0).net_stats();
    let lost_copies = sender.copies_lost - sender_lost_before.copies_lost;
    let lost_datagrams = sender.datagrams_with_loss - sender_lost_before.datagrams_with_loss;
    let mut naks = 0;
    let mut suppressed = 0;
    for i in 1..NODES {
        let stats = cluster.sim.node(i).machine().expect("up").stats();
        naks += stats.naks_sent;
        suppressed += stats.naks_suppressed;
    }
    let sender_stats = cluster.sim.node(0).machine().expect("up").stats().clone();
    let per_datagram = naks as f64 / lost_datagrams.max(1) as f64;
    let per_copy = naks as f64 / lost_copies.max(1) as f64;
    // Nearly every data datagram is missed by someone (1 - 0.9^49 = 99.4 %), so this is NAKs
    // per original data datagram lost on the wire, heartbeats and repairs left out.
    let per_data = naks as f64 / sender_stats_data(&cluster).max(1) as f64;
    println!(
        "scale {hint}: {NODES} nodes, {LOSS} loss, {MESSAGES} messages: sender datagrams {} \
         (data {}), sender datagrams lost by >=1 receiver {lost_datagrams}, copies lost \
         {lost_copies}; NAKs sent {naks} (suppressed {suppressed}), NAKs received by sender {}, \
         repairs sent {}; NAKs per lost datagram {per_datagram:.2} (any kind), per data datagram \
         {per_data:.2}, per lost copy {per_copy:.2}; \
         virtual time {:?}, events {}",
        sender.datagrams_sent - sender_lost_before.datagrams_sent,
        sender_stats.data_datagrams_sent,
        sender_stats.naks_received,
        sender_stats.repairs_sent,
        cluster.sim.elapsed(),
        cluster.sim.events_processed(),
    );
    assert!(
        lost_datagrams > 0,
        "{hint}: nothing was lost; the test measures nothing"
    );
    assert!(
        per_datagram < 5.0,
        "{hint}: NAK implosion: {per_datagram:.2} NAKs per lost datagram with {} receivers",
        NODES - 1
    );
    assert!(
        per_data < 5.0,
        "{hint}: NAK implosion: {per_data:.2} NAKs per data datagram with {} receivers",
        NODES - 1
    );
}

fn sender_stats_data(cluster: &Cluster) -> u64 {
    cluster
        .sim
        .node(0)
        .machine()
        .map_or(0, |ep| ep.stats().data_datagrams_sent)
}
