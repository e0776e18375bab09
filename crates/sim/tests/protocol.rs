//! Property tests of the real `chorus_protocol::Endpoint` in the simulator.
//!
//! Each case is one seed; the whole schedule (node count, link faults, partitions, crashes,
//! late joins, sends) is derived from it, so a failure replays with
//! `CHORUS_SIM_SEED=<seed> cargo test -p chorus-sim --test protocol <test name>`.
//! `PROPTEST_CASES` sets the number of seeds (small by default so the suite stays fast);
//! `CHORUS_SIM_DUMP=1` puts every event of a failing run in the report, not only the last 40.

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
            // A sender keeps what a suspected (not yet gone) member has not acknowledged, so
            // suspicion excuses nothing (see
            // `suspected_member_keeps_its_messages_within_window_age`). The intervals are
            // reported to help reading a failure.
            if msg.at > *knew && *at < msg.at + window_max_age {
                out.push(format!(
                    "t={at:?} node#{node} got Lost for {sender}/{incarnation} seq {seq}, sent at \
                     {:?} after the sender knew the receiver (since {knew:?}); the sender \
                     suspected it during {suspicions:?}",
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

/// Each live endpoint's view of its peers: `node/incarnation state delivered_up_to`.
fn member_views(cluster: &Cluster) -> String {
    let mut out = String::new();
    for index in cluster.sim.live_nodes() {
        let Some(ep) = cluster.sim.node(index).machine() else {
            continue;
        };
        let peers: Vec<String> = ep
            .members()
            .iter()
            .map(|m| {
                format!(
                    "{}/{} {:?} up_to={}",
                    m.node.0, m.incarnation.0, m.state, m.delivered_up_to
                )
            })
            .collect();
        out.push_str(&format!(
            "  node#{index} ({}/{}) highest_sent={}: {}\n",
            ep.node_id().0,
            ep.incarnation().0,
            ep.highest_sent(),
            peers.join(", ")
        ));
    }
    out
}

fn failure(cluster: &Cluster, scenario: &Scenario, test: &str, problems: &[String]) -> String {
    let test = format!("protocol {test}");
    format!(
        "{}\n{scenario:?}\nnet: {:?}\nmembers:\n{}problems:\n  {}\nlast events:\n{}",
        replay_hint(scenario.seed, &test),
        cluster.sim.stats(),
        member_views(cluster),
        problems.join("\n  "),
        cluster.recent_events(if std::env::var_os("CHORUS_SIM_DUMP").is_some() {
            usize::MAX
        } else {
            40
        }),
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

/// Regression test for a protocol issue this suite found (`streams_are_reliable_under_chaos`,
/// `CHORUS_SIM_SEED=16814215784104855338`: 4 nodes, no random loss, partition {0,1,2}|{3} from
/// 0.6 s; after healing every node got `Lost` for what the other side sent during the
/// partition, ~2.5 s after it was sent, far inside `window_max_age` = 10 s).
///
/// Cause: `Endpoint::trim_stable` computed stability over `MemberState::Alive` peers only, so
/// once a peer was suspected (`suspect_after` = 1.5 s on `Config::lan`) the sender released
/// messages that peer had not acknowledged, although `Config::window_max_age` documents age as
/// the only reason to drop an unacknowledged message and a suspected peer is still a member.
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

/// Every membership event kind, on a deterministic schedule: a late joiner is announced to all
/// (and learns all), a quick crash + restart is a `MemberRestarted`, a crash without restart
/// ends in `MemberLeft { Timeout }`, a `close()` in `MemberLeft { Goodbye }`.
#[test]
fn membership_events_for_join_restart_crash_and_goodbye() {
    use chorus_protocol::{Incarnation, LeaveReason};
    let seed = chorus_sim::seed_from_env().unwrap_or(3);
    let hint = replay_hint(
        seed,
        "protocol membership_events_for_join_restart_crash_and_goodbye",
    );
    let link = chorus_sim::LinkConfig::lan().with_loss(0.05);
    let config = chorus_sim::SimConfig::new(seed, 5).with_link(link);
    let mut cluster = Cluster::new(config, common::Preset::Lan, true);
    cluster.sim.run_for(Duration::from_secs(1));
    let late = cluster.sim.add_node();
    cluster.sim.run_for(Duration::from_secs(1));
    cluster.sim.crash(2);
    cluster.sim.run_for(Duration::from_millis(300));
    cluster.sim.restart(2);
    cluster.sim.crash(3);
    cluster.sim.act(4, |ep, now| ep.close(now));
    cluster.sim.run_for(Duration::from_millis(500));
    cluster.sim.crash(4); // closed endpoints go away; its goodbye was already sent
    let leave_after = common::Preset::Lan
        .config(common::node_id(0), Incarnation(1), 0)
        .leave_after;
    cluster.sim.run_for(leave_after + Duration::from_secs(2));

    let ledger = cluster.ledger.borrow();
    let seen = |observer: usize, pred: &dyn Fn(&Event) -> bool| {
        ledger
            .events
            .iter()
            .any(|(_, node, _, e)| *node == observer && pred(e))
    };
    for observer in [0, 1, late] {
        for other in [0, 1, late] {
            if other != observer {
                let id = common::node_id(other);
                assert!(
                    seen(
                        observer,
                        &|e| matches!(e, Event::MemberJoined { node, .. } if *node == id)
                    ),
                    "{hint}: node#{observer} never saw node#{other} join"
                );
            }
        }
        let n2 = common::node_id(2);
        assert!(
            seen(observer, &|e| matches!(e,
                Event::MemberRestarted { node, old, new, .. }
                    if *node == n2 && *old == Incarnation(1) && *new == Incarnation(2))
                || (observer == late
                    && matches!(e, Event::MemberJoined { node, incarnation: Incarnation(2), .. }
                        if *node == n2))),
            "{hint}: node#{observer} never saw node#2 restart"
        );
        let n3 = common::node_id(3);
        assert!(
            seen(observer, &|e| matches!(e,
                Event::MemberLeft { node, reason: LeaveReason::Timeout, .. } if *node == n3)),
            "{hint}: node#{observer} never saw crashed node#3 time out"
        );
        // The goodbye is one datagram (best effort); whoever lost it times node#4 out.
        let n4 = common::node_id(4);
        assert!(
            seen(
                observer,
                &|e| matches!(e, Event::MemberLeft { node, .. } if *node == n4)
            ),
            "{hint}: node#{observer} never saw node#4 leave"
        );
    }
    let goodbyes = ledger
        .events
        .iter()
        .filter(|(_, _, _, e)| {
            matches!(e, Event::MemberLeft { node, reason: LeaveReason::Goodbye, .. }
                if *node == common::node_id(4))
        })
        .count();
    assert!(
        goodbyes >= 2,
        "{hint}: only {goodbyes} nodes heard node#4's goodbye"
    );
    drop(ledger);
    let gaps = cluster.membership_gaps();
    assert!(gaps.is_empty(), "{hint}: {gaps:?}");
    assert!(
        cluster.violations().is_empty(),
        "{hint}: {:?}",
        cluster.violations()
    );
}

/// The protocol driven by the simulator is deterministic: the same seed gives the same wire
/// trace, run after run in one process (a replayed seed must reproduce its failure).
#[test]
fn same_seed_replays_identically() {
    let seed = chorus_sim::seed_from_env().unwrap_or(1_482_180_534_931_329_525);
    let run = |seed: u64| {
        let scenario = Scenario::churn(seed);
        let mut cluster = Cluster::new(scenario.sim_config(), scenario.preset, false);
        scenario.play(&mut cluster);
        cluster.sim.run_for(Duration::from_secs(5));
        (cluster.sim.digest(), cluster.sim.stats().clone())
    };
    let first = run(seed);
    for _ in 0..3 {
        assert_eq!(
            run(seed),
            first,
            "{}",
            replay_hint(seed, "protocol same_seed")
        );
    }
}

/// Open protocol question this suite found (`streams_are_reliable_under_chaos`,
/// `CHORUS_SIM_SEED=11216153150992117857`: 3 nodes, no random loss, partitions {0,1}|{2} at
/// 1.262–3.903 s and 3.986–6.046 s; node#2 timed node#0 out at 6.2 s and re-joined the *same*
/// incarnation at once, then never delivered nor reported `Lost` for seqs 4..=16 of it: its
/// stream of node#0 stays at 3 while node#0 sent 16).
///
/// A receiver that times a member out and hears the same incarnation again re-joins it
/// mid-stream, silently skipping what was sent in between. Invariant (c) says every seq from
/// the receiver's first seen one to the sender's last is Delivered or Lost; the receiver knows
/// it stopped at 3 and the sender's heartbeat says 16, so it can repair (if the sender still
/// holds them) or report `Lost { 4..=16 }`.
///
/// Deterministic schedule: 3 nodes, perfect links; node 0 sends 3 messages; node 2 is cut off
/// for `leave_after` + 1 s while node 0 sends 10 more; after healing node 2's stream of node 0
/// must cover 1..=13.
#[test]
fn rejoin_after_timeout_covers_the_gap() {
    let config = chorus_sim::SimConfig::new(4, 3);
    let mut cluster = Cluster::new(config, common::Preset::Lan, true);
    cluster.sim.run_for(Duration::from_secs(1));
    let mut counter = 0;
    let mut send = |cluster: &mut Cluster| {
        counter += 1;
        let payload = common::payload(4, 0, counter, 100);
        cluster
            .send(0, payload)
            .expect("up")
            .expect("window has room");
        cluster.sim.run_for(Duration::from_millis(20));
    };
    for _ in 0..3 {
        send(&mut cluster);
    }
    cluster.sim.run_for(Duration::from_millis(500));
    cluster.sim.isolate(2);
    let leave_after = common::Preset::Lan
        .config(common::node_id(0), chorus_protocol::Incarnation(1), 0)
        .leave_after;
    for _ in 0..10 {
        send(&mut cluster);
    }
    cluster.sim.run_for(leave_after + Duration::from_secs(1));
    cluster.sim.heal();
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(10),
        Duration::from_secs(10),
    );
    assert!(
        gaps.is_empty() && cluster.violations().is_empty(),
        "gaps {gaps:?}, violations {:?}; events:\n{}",
        cluster.violations(),
        cluster.recent_events(30)
    );
}

/// A late joiner that learned a stream from heartbeats repairs the first message it misses.
///
/// Written while chasing an open protocol issue found by `membership_and_streams_survive_churn`
/// (`CHORUS_SIM_SEED=6343472862959240363`, replay with `CHORUS_SIM_DUMP=1`): node#2 restarts at
/// 4.807 s, emits `MemberJoined` for node#1 (NodeId 2) at 5.006 s, node#1 sends its seq 11 at
/// 5.155 s, and over the next 60 s node#2 delivers nothing of node#1's stream and reports no
/// `Lost`, although it delivers the other senders fine (15 % loss, duplication, reordering,
/// corruption). At the end node#2's `members()` reports node#1 `delivered_up_to = 11`: seq 11
/// was settled without a `Delivered` or `Lost` event (a silent skip; likely the stream being
/// anchored at the highest seq of a later heartbeat instead of where it stood at the join).
/// This simple schedule does NOT reproduce it (it passes), so the trigger is more specific;
/// the seed replays it exactly.
///
/// Schedule: 3 nodes, perfect links; node 0 sends 5 messages; node 3 joins late and hears
/// heartbeats for 1 s; node 0's next message is dropped on the link to node 3 only; node 3
/// must repair and deliver it.
#[test]
fn late_joiner_repairs_first_message_lost_after_joining() {
    let config = chorus_sim::SimConfig::new(5, 3);
    let mut cluster = Cluster::new(config, common::Preset::Lan, true);
    cluster.sim.run_for(Duration::from_millis(500));
    for i in 0..5 {
        cluster
            .send(0, common::payload(5, 0, i, 100))
            .expect("up")
            .expect("room");
        cluster.sim.run_for(Duration::from_millis(20));
    }
    let late = cluster.sim.add_node();
    cluster.sim.run_for(Duration::from_secs(1));
    let node0 = (common::node_id(0), chorus_protocol::Incarnation(1));
    let late_life = cluster.life(late).expect("up");
    assert!(
        cluster
            .ledger
            .borrow()
            .known_since
            .contains_key(&(late_life, node0)),
        "the late joiner should know node 0 after 1 s of heartbeats"
    );
    let link = cluster.sim.link(0, late).clone();
    cluster.sim.set_link(0, late, link.clone().with_loss(1.0));
    cluster
        .send(0, common::payload(5, 0, 5, 100))
        .expect("up")
        .expect("room");
    cluster.sim.run_for(Duration::from_millis(5));
    cluster.sim.set_link(0, late, link);
    let gaps = cluster.run_until_empty(
        Cluster::coverage_gaps,
        Duration::from_millis(10),
        Duration::from_secs(10),
    );
    assert!(
        gaps.is_empty() && cluster.violations().is_empty(),
        "gaps {gaps:?}, violations {:?}; events:\n{}",
        cluster.violations(),
        cluster.recent_events(20)
    );
}
