//! Self-tests of the simulated network, driven by a tiny probe machine (no protocol involved).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::{Destination, Transmit};
use chorus_sim::{LinkConfig, Machine, Sim, SimConfig, Spawn, StepKind, TraceEvent, node_addr};

/// A machine that sends what it is told, records what it receives, and optionally ticks.
struct Probe {
    spawn: Spawn,
    outbox: VecDeque<Transmit>,
    received: Vec<(Instant, SocketAddr, Vec<u8>)>,
    timeouts: Vec<Instant>,
    timer: Option<Instant>,
    /// Every `tick`, multicast a datagram `[index, counter]`.
    tick: Option<Duration>,
    ticks_left: u32,
    /// Answer every datagram with one back to its sender (ping-pong).
    echo: bool,
}

impl Probe {
    fn new(spawn: &Spawn) -> Probe {
        Probe {
            spawn: spawn.clone(),
            outbox: VecDeque::new(),
            received: Vec::new(),
            timeouts: Vec::new(),
            timer: None,
            tick: None,
            ticks_left: 0,
            echo: false,
        }
    }

    fn ticking(spawn: &Spawn, every: Duration, count: u32) -> Probe {
        let mut probe = Probe::new(spawn);
        probe.tick = Some(every);
        probe.ticks_left = count;
        probe.timer = Some(spawn.now + every);
        probe
    }

    fn send(&mut self, destination: Destination, payload: &[u8]) {
        self.outbox.push_back(Transmit {
            destination,
            payload: Bytes::copy_from_slice(payload),
        });
    }
}

impl Machine for Probe {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        self.received.push((now, from, datagram.to_vec()));
        if self.echo {
            self.send(Destination::Addr(from), datagram);
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.timeouts.push(now);
        self.timer = None;
        if let Some(every) = self.tick
            && self.ticks_left > 0
        {
            self.ticks_left -= 1;
            let index = u8::try_from(self.spawn.index).expect("small test");
            let counter = self.ticks_left.to_be_bytes();
            let mut payload = vec![index];
            payload.extend_from_slice(&counter);
            self.send(Destination::Group, &payload);
            self.timer = Some(now + every);
        }
    }

    fn poll_transmit(&mut self, _now: Instant) -> Option<Transmit> {
        self.outbox.pop_front()
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.timer
    }
}

fn probe(machine: Option<&Probe>) -> &Probe {
    machine.expect("node is up")
}

fn chaotic_link() -> LinkConfig {
    LinkConfig::lan()
        .with_loss(0.2)
        .with_duplicate(0.1)
        .with_reorder(0.2, Duration::from_millis(5))
        .with_corrupt(0.05)
        .with_delay(Duration::from_millis(1), Duration::from_millis(2))
}

/// What a node received: (virtual time since epoch, sender, bytes).
type Received = Vec<(Duration, SocketAddr, Vec<u8>)>;

fn chaotic_run(seed: u64) -> (u64, Vec<TraceEvent>, Vec<Received>) {
    let config = SimConfig::new(seed, 4)
        .with_link(chaotic_link())
        .with_trace(true);
    let mut sim = Sim::new(config, |s: &Spawn| {
        Probe::ticking(s, Duration::from_millis(3 + s.index as u64), 40)
    });
    sim.run_for(Duration::from_millis(100));
    sim.partition(&[0, 1], &[2, 3]);
    sim.run_for(Duration::from_millis(50));
    sim.crash(3);
    sim.heal();
    sim.run_for(Duration::from_millis(20));
    sim.restart(3);
    sim.add_node();
    sim.run_for(Duration::from_secs(1));
    let epoch = sim.epoch();
    let received = (0..sim.len())
        .map(|i| {
            probe(sim.node(i).machine())
                .received
                .iter()
                .map(|(t, from, data)| (*t - epoch, *from, data.clone()))
                .collect()
        })
        .collect();
    (sim.digest(), sim.trace().to_vec(), received)
}

#[test]
fn same_seed_gives_identical_trace() {
    let a = chaotic_run(42);
    let b = chaotic_run(42);
    assert!(
        a.1.len() > 500,
        "trace too short to mean anything: {}",
        a.1.len()
    );
    assert_eq!(a.0, b.0, "digests differ for the same seed");
    assert_eq!(a.1, b.1, "traces differ for the same seed");
    assert_eq!(a.2, b.2, "received datagrams differ for the same seed");
    let c = chaotic_run(43);
    assert_ne!(a.0, c.0, "a different seed should give a different run");
    assert_ne!(a.1, c.1);
}

#[test]
fn loss_rate_is_roughly_honoured() {
    for &loss in &[0.0, 0.1, 0.3, 0.5] {
        let config = SimConfig::new(7, 3).with_link(LinkConfig::perfect().with_loss(loss));
        let mut sim = Sim::new(config, |s: &Spawn| Probe::new(s));
        let sent = 5_000u32;
        for i in 0..sent {
            sim.act(0, |m, _| m.send(Destination::Group, &i.to_be_bytes()));
            sim.run_for(Duration::from_micros(50));
        }
        sim.run_for(Duration::from_millis(10));
        for receiver in 1..3 {
            let got = probe(sim.node(receiver).machine()).received.len() as f64;
            let rate = 1.0 - got / f64::from(sent);
            assert!(
                (rate - loss).abs() < 0.03,
                "loss {loss}: node {receiver} saw loss rate {rate}"
            );
        }
        let stats = sim.stats();
        assert_eq!(stats.copies, 2 * u64::from(sent));
        assert_eq!(stats.lost + stats.delivered, stats.copies);
        assert!(
            probe(sim.node(0).machine()).received.is_empty(),
            "group reached the sender"
        );
    }
}

#[test]
fn group_excludes_sender_and_addr_reaches_one() {
    let mut sim = Sim::new(SimConfig::new(1, 4), |s: &Spawn| Probe::new(s));
    sim.act(1, |m, _| m.send(Destination::Group, b"all"));
    sim.act(1, |m, _| m.send(Destination::Addr(node_addr(3)), b"one"));
    sim.act(1, |m, _| {
        m.send(
            Destination::Addr("192.0.2.1:7400".parse().expect("addr")),
            b"nobody",
        )
    });
    sim.run_for(Duration::from_millis(10));
    let from = node_addr(1);
    for i in 0..4 {
        let got: Vec<&[u8]> = probe(sim.node(i).machine())
            .received
            .iter()
            .map(|(_, f, d)| {
                assert_eq!(*f, from);
                d.as_slice()
            })
            .collect();
        let expected: Vec<&[u8]> = match i {
            1 => vec![],
            3 => vec![b"all", b"one"],
            _ => vec![b"all"],
        };
        assert_eq!(got, expected, "node {i}");
    }
    assert_eq!(sim.stats().unknown_destination, 1);
    assert_eq!(sim.stats().delivered, 4);
}

#[test]
fn fixed_delay_is_exact_and_jitter_reorders_only_when_asked() {
    let delay = Duration::from_millis(3);
    let link = LinkConfig::perfect().with_delay(delay, Duration::ZERO);
    let mut sim = Sim::new(SimConfig::new(3, 2).with_link(link), |s: &Spawn| {
        Probe::new(s)
    });
    let sent_at = sim.now();
    for i in 0..100u8 {
        sim.act(0, |m, _| m.send(Destination::Group, &[i]));
    }
    sim.run_for(Duration::from_millis(10));
    let received = &probe(sim.node(1).machine()).received;
    assert_eq!(received.len(), 100);
    for (i, (t, _, d)) in received.iter().enumerate() {
        assert_eq!(*t - sent_at, delay);
        assert_eq!(
            d[0] as usize, i,
            "same-time datagrams must keep their order"
        );
    }

    let reordering = LinkConfig::perfect().with_reorder(0.3, Duration::from_millis(5));
    let mut sim = Sim::new(SimConfig::new(3, 2).with_link(reordering), |s: &Spawn| {
        Probe::new(s)
    });
    for i in 0..100u8 {
        sim.act(0, |m, _| m.send(Destination::Group, &[i]));
        sim.run_for(Duration::from_micros(200));
    }
    sim.run_for(Duration::from_millis(10));
    let order: Vec<u8> = probe(sim.node(1).machine())
        .received
        .iter()
        .map(|(_, _, d)| d[0])
        .collect();
    assert_eq!(order.len(), 100);
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "nothing was reordered"
    );
    assert!(sim.stats().reordered > 10);
}

#[test]
fn duplication_and_corruption() {
    let link = LinkConfig::perfect().with_duplicate(1.0);
    let mut sim = Sim::new(SimConfig::new(4, 2).with_link(link), |s: &Spawn| {
        Probe::new(s)
    });
    for i in 0..50u8 {
        sim.act(0, |m, _| m.send(Destination::Group, &[i, i, i, i]));
    }
    sim.run_for(Duration::from_millis(10));
    assert_eq!(probe(sim.node(1).machine()).received.len(), 100);
    assert_eq!(sim.stats().duplicated, 50);

    let link = LinkConfig::perfect().with_corrupt(1.0);
    let mut sim = Sim::new(SimConfig::new(5, 2).with_link(link), |s: &Spawn| {
        Probe::new(s)
    });
    let original = [0xAAu8; 32];
    for _ in 0..50 {
        sim.act(0, |m, _| m.send(Destination::Group, &original));
    }
    sim.run_for(Duration::from_millis(10));
    let received = &probe(sim.node(1).machine()).received;
    assert_eq!(received.len(), 50);
    assert!(received.iter().all(|(_, _, d)| d.as_slice() != original));
    assert!(
        received.iter().any(|(_, _, d)| d.len() < original.len()),
        "no truncation"
    );
    assert!(
        received.iter().any(|(_, _, d)| d.len() == original.len()),
        "no bit flips"
    );
}

#[test]
fn partition_blocks_until_healed() {
    let mut sim = Sim::new(SimConfig::new(6, 5), |s: &Spawn| Probe::new(s));
    sim.partition(&[0, 1], &[2, 3, 4]);
    sim.act(0, |m, _| m.send(Destination::Group, b"p"));
    sim.act(3, |m, _| m.send(Destination::Group, b"q"));
    sim.run_for(Duration::from_millis(10));
    let got = |sim: &Sim<Probe>, i: usize| probe(sim.node(i).machine()).received.len();
    assert_eq!(
        (0..5).map(|i| got(&sim, i)).collect::<Vec<_>>(),
        vec![0, 1, 1, 0, 1]
    );
    assert_eq!(sim.stats().blocked, 3 + 2);
    assert!(sim.is_blocked(4, 1) && !sim.is_blocked(2, 4));

    sim.heal();
    sim.act(0, |m, _| m.send(Destination::Group, b"r"));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(
        (0..5).map(|i| got(&sim, i)).collect::<Vec<_>>(),
        vec![0, 2, 2, 1, 2]
    );

    sim.isolate(2);
    sim.act(2, |m, _| m.send(Destination::Group, b"s"));
    sim.act(0, |m, _| m.send(Destination::Group, b"t"));
    sim.run_for(Duration::from_millis(10));
    assert_eq!(
        (0..5).map(|i| got(&sim, i)).collect::<Vec<_>>(),
        vec![0, 3, 2, 2, 3]
    );
}

#[test]
fn crash_drops_machine_and_in_flight_datagrams() {
    let link = LinkConfig::perfect().with_delay(Duration::from_millis(10), Duration::ZERO);
    let restarts_seen = Rc::new(RefCell::new(Vec::new()));
    let seen = Rc::clone(&restarts_seen);
    let mut sim = Sim::new(SimConfig::new(8, 3).with_link(link), move |s: &Spawn| {
        seen.borrow_mut().push((s.index, s.restarts, s.seed));
        Probe::new(s)
    });
    sim.act(0, |m, _| m.send(Destination::Group, b"in flight"));
    sim.run_for(Duration::from_millis(1));
    sim.crash(2);
    assert!(!sim.node(2).is_up());
    assert!(
        sim.act(2, |m, _| m.send(Destination::Group, b"x"))
            .is_none()
    );
    sim.run_for(Duration::from_millis(2));
    sim.restart(2);
    assert_eq!(sim.node(2).restarts(), 1);
    sim.run_for(Duration::from_millis(20));
    assert!(
        probe(sim.node(2).machine()).received.is_empty(),
        "in-flight survived a crash"
    );
    assert_eq!(probe(sim.node(1).machine()).received.len(), 1);
    assert_eq!(sim.stats().to_down_node, 1);

    // A datagram sent while the node is down is dropped too.
    sim.crash(1);
    sim.act(0, |m, _| m.send(Destination::Group, b"while down"));
    sim.run_for(Duration::from_millis(20));
    sim.restart(1);
    sim.run_for(Duration::from_millis(20));
    assert!(probe(sim.node(1).machine()).received.is_empty());
    assert_eq!(sim.stats().to_down_node, 2);
    assert_eq!(sim.stats().crashes, 2);

    let seen = restarts_seen.borrow();
    assert_eq!(seen.len(), 5);
    assert_eq!((seen[3].0, seen[3].1), (2, 1));
    assert_ne!(seen[2].2, seen[3].2, "restart must get a fresh seed");
}

#[test]
fn late_joiner_receives_traffic_sent_after_it_joined() {
    let mut sim = Sim::new(SimConfig::new(9, 2), |s: &Spawn| Probe::new(s));
    sim.act(0, |m, _| m.send(Destination::Group, b"early"));
    sim.run_for(Duration::from_millis(5));
    let late = sim.add_node();
    assert_eq!(late, 2);
    assert_eq!(sim.node(late).addr(), node_addr(2));
    assert_eq!(sim.node(late).started_at(), Some(Duration::from_millis(5)));
    sim.act(0, |m, _| m.send(Destination::Group, b"late"));
    sim.run_for(Duration::from_millis(5));
    let got: Vec<Vec<u8>> = probe(sim.node(late).machine())
        .received
        .iter()
        .map(|(_, _, d)| d.clone())
        .collect();
    assert_eq!(got, vec![b"late".to_vec()]);
    assert_eq!(probe(sim.node(1).machine()).received.len(), 2);
}

#[test]
fn timers_fire_at_their_deadline_and_superseded_ones_do_not() {
    let mut sim = Sim::new(SimConfig::new(10, 1), |s: &Spawn| Probe::new(s));
    let epoch = sim.epoch();
    sim.act(0, |m, now| m.timer = Some(now + Duration::from_millis(50)));
    sim.run_for(Duration::from_millis(10));
    // Move the deadline earlier, then later: only the last one may fire.
    sim.act(0, |m, now| m.timer = Some(now + Duration::from_millis(5)));
    sim.act(0, |m, now| m.timer = Some(now + Duration::from_millis(30)));
    let step = sim.step().expect("timer scheduled");
    assert_eq!(step.kind, StepKind::Timeout);
    assert_eq!(step.at, Duration::from_millis(40));
    assert_eq!(
        probe(sim.node(0).machine()).timeouts,
        vec![epoch + Duration::from_millis(40)]
    );
    assert!(sim.step().is_none(), "no timer should remain");
}

#[test]
fn run_until_reports_convergence_and_deadlines() {
    let mut sim = Sim::new(SimConfig::new(11, 3), |s: &Spawn| {
        Probe::ticking(s, Duration::from_millis(10), 5)
    });
    let all_heard =
        |sim: &mut Sim<Probe>| (0..3).all(|i| probe(sim.node(i).machine()).received.len() == 10);
    assert!(sim.run_until(all_heard, Duration::from_secs(1)));
    assert!(sim.elapsed() >= Duration::from_millis(50));
    assert!(sim.elapsed() < Duration::from_millis(60));

    let start = sim.elapsed();
    assert!(!sim.run_until(|_| false, Duration::from_millis(500)));
    assert_eq!(sim.elapsed(), start + Duration::from_millis(500));
}

#[test]
fn event_budget_bounds_a_run_that_never_ends() {
    let config = SimConfig::new(12, 2).with_max_events(1_000);
    let mut sim = Sim::new(config, |s: &Spawn| {
        let mut p = Probe::new(s);
        p.echo = true;
        p
    });
    sim.act(0, |m, _| m.send(Destination::Group, b"ping"));
    assert!(!sim.run_until(|_| false, Duration::from_secs(3600)));
    assert!(sim.budget_exhausted());
    assert_eq!(sim.events_processed(), 1_000);
    assert!(sim.elapsed() < Duration::from_secs(1));
}

#[test]
fn observer_sees_every_input_with_node_and_time() {
    type Log = Rc<RefCell<Vec<(Duration, usize, usize)>>>;
    let log: Log = Rc::new(RefCell::new(Vec::new()));
    let mut sim = Sim::new(SimConfig::new(13, 3), |s: &Spawn| Probe::new(s));
    let epoch = sim.epoch();
    let sink = Rc::clone(&log);
    sim.set_observer(move |now, node, m: &mut Probe| {
        sink.borrow_mut()
            .push((now - epoch, node, m.received.len()));
    });
    sim.act(0, |m, _| m.send(Destination::Group, b"x"));
    sim.run_for(Duration::from_millis(5));
    let log = log.borrow();
    // Installing the observer looks at every running machine once, then the act, then arrivals.
    assert_eq!(
        log[..4],
        [
            (Duration::ZERO, 0, 0),
            (Duration::ZERO, 1, 0),
            (Duration::ZERO, 2, 0),
            (Duration::ZERO, 0, 0)
        ]
    );
    let rest: Vec<(usize, usize)> = log[4..].iter().map(|&(_, n, r)| (n, r)).collect();
    assert_eq!(rest.len(), 2);
    assert!(rest.contains(&(1, 1)) && rest.contains(&(2, 1)));
    assert!(log[4..].iter().all(|&(t, _, _)| t > Duration::ZERO));
}

#[test]
fn node_mut_commands_are_flushed() {
    let mut sim = Sim::new(SimConfig::new(14, 2), |s: &Spawn| Probe::new(s));
    if let Some(m) = sim.node_mut(0).machine_mut() {
        m.send(Destination::Group, b"direct");
    }
    sim.run_for(Duration::from_millis(5));
    assert_eq!(probe(sim.node(1).machine()).received.len(), 1);
}
