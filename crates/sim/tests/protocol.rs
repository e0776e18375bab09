//! Property tests of the real `chorus_protocol::Endpoint` in the simulator.
//!
//! Each case is one seed; the whole schedule (node count, link faults, partitions, crashes,
//! late joins, sends) is derived from it, so a failure replays with
//! `CHORUS_SIM_SEED=<seed> cargo test -p chorus-sim --test protocol <test name>`.
//! `PROPTEST_CASES` sets the number of seeds (small by default so the suite stays fast).

mod common;

use std::time::Duration;

use chorus_protocol::Event;
use common::{Cluster, Life, Scenario, pick_seed, proptest_config, replay_hint};
use proptest::prelude::*;

/// Virtual time allowed for convergence after the schedule ends and every partition is healed.
const CONVERGE_WITHIN: Duration = Duration::from_secs(60);
/// Extra virtual time run after convergence, to catch late duplicates or spurious events.
const QUIESCE: Duration = Duration::from_secs(3);

/// Lost messages that the sender still had to keep: sent while it already knew the receiver,
/// reported lost less than the window age later, and the sender never declared the receiver
/// gone in between.
fn unjustified_losses(cluster: &Cluster, window_max_age: Duration) -> Vec<String> {
    let ledger = cluster.ledger.borrow();
    let mut out = Vec::new();
    for (at, node, receiver, event) in &ledger.events {
        let Event::Lost {
            sender,
            incarnation,
            range,
        } = event
        else {
            continue;
        };
        let sender_life: Life = (*sender, *incarnation);
        let Some(knew) = ledger.known_since.get(&(sender_life, *receiver)) else {
            continue;
        };
        let Some(sent) = ledger.sent.get(&sender_life) else {
            continue;
        };
        // A sender may forget a receiver it declared gone.
        let sender_dropped_receiver = ledger.events.iter().any(|(t, _, me, e)| {
            *me == sender_life
                && t <= at
                && matches!(e, Event::MemberLeft { node, incarnation, .. }
                    if (*node, *incarnation) == *receiver)
        });
        if sender_dropped_receiver {
            continue;
        }
        let suspicions = suspicion_intervals(&ledger.events, sender_life, *receiver);
        for seq in range.clone() {
            let Some(msg) = usize::try_from(seq - 1).ok().and_then(|i| sent.get(i)) else {
                continue;
            };
            // KNOWN PROTOCOL ISSUE (see `suspected_member_keeps_its_messages_within_window_age`):
            // the sender trims its window past members it merely suspects, so a receiver
            // suspected between the send and the Lost gets Lost early. Excused here so this
            // property keeps checking everything else; pinned by that dedicated test.
            let suspected = suspicions
                .iter()
                .any(|&(from, to)| from <= *at && to >= msg.at);
            if msg.at > *knew && *at < msg.at + window_max_age && !suspected {
                out.push(format!(
                    "t={at:?} node#{node} got Lost for {sender}/{incarnation} seq {seq}, sent at \
                     {:?} after the sender knew the receiver (since {knew:?})",
                    msg.at
                ));
                break;
            }
        }
    }
    out
}

/// Intervals during which `sender` had `receiver` suspected (end `Duration::MAX` if never
/// cleared).
fn suspicion_intervals(
    events: &[(Duration, usize, Life, Event)],
    sender: Life,
    receiver: Life,
) -> Vec<(Duration, Duration)> {
    let mut intervals = Vec::new();
    let mut open: Option<Duration> = None;
    for (t, _, me, e) in events {
        if *me != sender {
            continue;
        }
        match e {
            Event::MemberSuspected { node, incarnation } if (*node, *incarnation) == receiver => {
                open.get_or_insert(*t);
            }
            Event::MemberAlive { node, incarnation } if (*node, *incarnation) == receiver => {
                if let Some(from) = open.take() {
                    intervals.push((from, *t));
                }
            }
            _ => {}
        }
    }
    if let Some(from) = open {
        intervals.push((from, Duration::MAX));
    }
    intervals
}

fn failure(cluster: &Cluster, scenario: &Scenario, test: &str, problems: &[String]) -> String {
    let test = format!("protocol {test}");
    format!(
        "{}\n{scenario:?}\nnet: {:?}\nproblems:\n  {}\nlast events:\n{}",
        replay_hint(scenario.seed, &test),
        cluster.sim.stats(),
        problems.join("\n  "),
        cluster.recent_events(40),
    )
}

/// One line per case (shown with `--nocapture`), so a passing run shows it tested something.
fn summary(kind: &str, cluster: &Cluster, scenario: &Scenario) {
    let ledger = cluster.ledger.borrow();
    let sent: usize = ledger.sent.values().map(Vec::len).sum();
    let naks: u64 = (0..cluster.sim.len())
        .filter_map(|i| cluster.sim.node(i).machine())
        .map(|ep| ep.stats().naks_sent)
        .sum();
    let net = cluster.sim.stats();
    println!(
        "{kind} seed={} nodes={} loss={:.2} sent={sent} delivered={} lost={} naks={naks} \
         wire: copies={} lost={} dup={} corrupt={} blocked={} down={} t={:?}",
        scenario.seed,
        cluster.sim.len(),
        scenario.link.loss,
        ledger.delivered,
        ledger.lost_messages,
        net.copies,
        net.lost,
        net.duplicated,
        net.corrupted,
        net.blocked,
        net.to_down_node,
        cluster.sim.elapsed(),
    );
}

/// Invariants (a), (b), (c) under loss, duplication, reordering, corruption and partitions.
fn run_chaos(seed: u64) -> Result<(), String> {
    let scenario = Scenario::chaos(seed);
    let mut cluster = Cluster::new(scenario.sim_config(), scenario.preset, true);
    let _refused = scenario.play(&mut cluster);
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(10),
        CONVERGE_WITHIN,
    );
    cluster.sim.run_for(QUIESCE);
    let mut problems = cluster.violations();
    if !gaps.is_empty() {
        problems.push(format!(
            "not converged {CONVERGE_WITHIN:?} after healing ({} gaps): {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(8)]
        ));
    }
    problems.extend(cluster.coverage_gaps().into_iter().take(8));
    let age = scenario
        .preset
        .config(common::node_id(0), chorus_protocol::Incarnation(1), 0)
        .window_max_age;
    problems.extend(unjustified_losses(&cluster, age).into_iter().take(8));
    if cluster.sim.budget_exhausted() {
        problems.push("event budget exhausted".to_owned());
    }
    summary("chaos", &cluster, &scenario);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(failure(
            &cluster,
            &scenario,
            "streams_are_reliable_under_chaos",
            &problems,
        ))
    }
}

/// Crash/restart and late join: invariants (a)–(c) plus membership convergence (joins,
/// restarts and leaves seen by every live node).
fn run_churn(seed: u64) -> Result<(), String> {
    let scenario = Scenario::churn(seed);
    let mut cluster = Cluster::new(scenario.sim_config(), scenario.preset, true);
    let _refused = scenario.play(&mut cluster);
    let gaps = cluster.run_until_empty(
        |c| {
            let mut gaps = c.coverage_gaps();
            gaps.extend(c.membership_gaps());
            gaps
        },
        Duration::from_millis(50),
        CONVERGE_WITHIN,
    );
    cluster.sim.run_for(QUIESCE);
    let mut problems = cluster.violations();
    if !gaps.is_empty() {
        problems.push(format!(
            "not converged {CONVERGE_WITHIN:?} after healing ({} gaps): {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(8)]
        ));
    }
    problems.extend(cluster.coverage_gaps().into_iter().take(8));
    problems.extend(cluster.membership_gaps().into_iter().take(8));
    if cluster.sim.budget_exhausted() {
        problems.push("event budget exhausted".to_owned());
    }
    summary("churn", &cluster, &scenario);
    if problems.is_empty() {
        Ok(())
    } else {
        Err(failure(
            &cluster,
            &scenario,
            "membership_and_streams_survive_churn",
            &problems,
        ))
    }
}

proptest! {
    #![proptest_config(proptest_config(12, "proptest-regressions/protocol.txt"))]

    #[test]
    fn streams_are_reliable_under_chaos(seed in any::<u64>()) {
        let seed = pick_seed(seed);
        if let Err(report) = run_chaos(seed) {
            prop_assert!(false, "{}", report);
        }
    }

    #[test]
    fn membership_and_streams_survive_churn(seed in any::<u64>()) {
        let seed = pick_seed(seed);
        if let Err(report) = run_churn(seed) {
            prop_assert!(false, "{}", report);
        }
    }
}

/// A fixed, easy schedule that must always pass: 3 nodes, perfect links, a few sends.
#[test]
fn perfect_network_delivers_everything_in_order() {
    let config = chorus_sim::SimConfig::new(1, 3);
    let mut cluster = Cluster::new(config, common::Preset::Lan, true);
    cluster.sim.run_for(Duration::from_secs(1));
    for i in 0..30u64 {
        let node = (i % 3) as usize;
        let payload = common::payload(1, node, i, 10 + (i as usize) * 100);
        let seq = cluster
            .send(node, payload)
            .expect("up")
            .expect("window has room");
        assert_eq!(seq, i / 3 + 1);
        cluster.sim.run_for(Duration::from_millis(7));
    }
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(10),
        Duration::from_secs(5),
    );
    assert!(gaps.is_empty(), "{gaps:?}");
    assert!(
        cluster.violations().is_empty(),
        "{:?}",
        cluster.violations()
    );
    let ledger = cluster.ledger.borrow();
    assert_eq!(
        ledger.delivered, 60,
        "each of 30 messages reaches 2 receivers"
    );
    assert_eq!(ledger.lost_messages, 0);
    for track in ledger.tracks.values() {
        assert_eq!((track.first, track.next, track.lost), (1, 11, 0));
    }
}

/// KNOWN PROTOCOL ISSUE, pinned (found by `streams_are_reliable_under_chaos`, e.g.
/// `CHORUS_SIM_SEED=16814215784104855338`: 4 nodes, no random loss, partition {0,1,2}|{3} from
/// 0.6 s; after healing every node gets `Lost` for what the other side sent during the
/// partition, ~2.5 s after it was sent, far inside `window_max_age` = 10 s).
///
/// Cause: `Endpoint::trim_stable` computes stability over `MemberState::Alive` peers only, so
/// once a peer is suspected (`suspect_after` = 1.5 s on `Config::lan`) the sender releases
/// messages that peer has not acknowledged. `Config::window_max_age` documents that a message
/// leaves the window before every member delivered it only by age; a suspected peer is still a
/// member (`members()` lists it). Any partition or stall longer than `suspect_after` thus turns
/// into `Lost` + a resync instead of a NAK repair.
///
/// Deterministic schedule: 3 nodes, perfect links, node 0 cut off for 3 s (> suspect_after,
/// < leave_after); node 1 sends 5 messages 2 s into the partition; after healing node 0 must
/// deliver all of them, with no `Lost`.
#[test]
fn suspected_member_keeps_its_messages_within_window_age() {
    let config = chorus_sim::SimConfig::new(2, 3);
    let mut cluster = Cluster::new(config, common::Preset::Lan, true);
    cluster.sim.run_for(Duration::from_secs(1));
    cluster.sim.isolate(0);
    cluster.sim.run_for(Duration::from_secs(2));
    for i in 0..5 {
        let payload = common::payload(2, 1, i, 100);
        cluster
            .send(1, payload)
            .expect("up")
            .expect("window has room");
        cluster.sim.run_for(Duration::from_millis(10));
    }
    cluster.sim.run_for(Duration::from_secs(1));
    cluster.sim.heal();
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(10),
        Duration::from_secs(5),
    );
    assert!(gaps.is_empty(), "{gaps:?}");
    assert!(
        cluster.violations().is_empty(),
        "{:?}",
        cluster.violations()
    );
    let ledger = cluster.ledger.borrow();
    let node0 = (common::node_id(0), chorus_protocol::Incarnation(1));
    let node1 = (common::node_id(1), chorus_protocol::Incarnation(1));
    let track = ledger
        .tracks
        .get(&(node0, node1))
        .expect("node 0 saw node 1's stream");
    assert_eq!(
        (track.delivered, track.lost),
        (5, 0),
        "messages sent while node 0 was suspected (well within window_max_age) were trimmed \
         before node 0 acknowledged them; events:\n{}",
        cluster.recent_events(30)
    );
}
