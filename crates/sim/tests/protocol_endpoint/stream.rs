//! One sender's stream: in-order delivery, duplicates, reordering, NAK repair, tail loss,
//! loss below the window, fragmentation, batching, back-pressure, pacing, NAK suppression.

use super::*;

#[test]
fn in_order_delivery() {
    let mut net = Net::pair();
    for i in 1..=200 {
        assert_eq!(net.send(0, msg(i)), i);
    }
    net.run_for(Duration::from_millis(500));
    assert_stream(&net, 1, NodeId(1), 200);
    assert!(net.lost(1).is_empty());
    assert_eq!(net.node(1).stats().messages_delivered, 200);
    assert_eq!(net.node(0).stats().messages_sent, 200);
}

#[test]
fn duplicates_are_dropped_and_counted() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(10));
    let data: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(f, b)| *f == 0 && is_first_data(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data.len(), 1);
    let now = net.now;
    net.node(1).handle_datagram(now, addr(0), &data[0]);
    net.node(1).handle_datagram(now, addr(0), &data[0]);
    net.flush();
    assert_eq!(net.delivered(1, NodeId(1)).len(), 1);
    assert_eq!(net.node(1).stats().duplicates, 2);
}

#[test]
fn reordered_datagrams_are_delivered_in_order() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    // Capture five separate data datagrams without delivering them.
    net.set_filter(|_, _, b| !is_first_data(b));
    for i in 1..=5 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    let data: Vec<Bytes> = net
        .sent
        .iter()
        .filter(|(f, b)| *f == 0 && is_first_data(b))
        .map(|(_, b)| b.clone())
        .collect();
    assert_eq!(data.len(), 5);
    let now = net.now;
    // Seq 1 first (so the stream starts there), then 5, 3, 4, 2.
    for k in [0, 4, 2, 3, 1] {
        net.node(1).handle_datagram(now, addr(0), &data[k]);
    }
    net.flush();
    assert_stream(&net, 1, NodeId(1), 5);
    assert_eq!(net.node(1).stats().naks_sent, 0);
}

#[test]
fn lost_data_is_repaired_after_nak() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let mut nth = 0;
    net.set_filter(move |from, _, b| {
        if from == 0 && is_first_data(b) {
            nth += 1;
            return nth != 3 && nth != 5;
        }
        true
    });
    for i in 1..=10 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    net.run_for(Duration::from_millis(300));
    assert_stream(&net, 1, NodeId(1), 10);
    assert!(net.lost(1).is_empty());
    let (a, b) = (net.node(0).stats().clone(), net.node(1).stats().clone());
    assert!(b.naks_sent >= 1, "{b:?}");
    assert!(a.naks_received >= 1 && a.repairs_sent >= 1, "{a:?}");
    assert!(b.repairs_received >= 1);
}

#[test]
fn tail_loss_is_found_by_heartbeat() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    for i in 1..=3 {
        net.send(0, msg(i));
        net.run_for(Duration::from_millis(1));
    }
    // The last message is lost: nothing after it reveals the gap except a heartbeat.
    let mut dropped = false;
    net.set_filter(move |from, _, b| {
        if from == 0 && is_first_data(b) && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    net.send(0, msg(4));
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.delivered(1, NodeId(1)).len(), 3);
    net.run_for(Duration::from_millis(500));
    assert_stream(&net, 1, NodeId(1), 4);
    assert!(net.node(1).stats().naks_sent >= 1);
}

#[test]
fn gap_below_window_is_reported_lost() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].window_max_age = Duration::from_millis(50);
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(5));
    // Seq 2 and 3 never reach node 1, and neither do repairs.
    net.set_filter(|from, _, b| {
        !(from == 0
            && matches!(
                frame_of(b),
                Kind::Data(proto::Data {
                    first_seq: 2..=3,
                    ..
                }) | Kind::Repair(_)
            ))
    });
    net.send(0, msg(2));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(3));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(4));
    net.run_for(Duration::from_millis(1000));
    assert_eq!(net.lost(1), vec![2..=3]);
    assert_stream(&net, 1, NodeId(1), 4);
    assert_eq!(net.node(1).stats().lost_messages, 2);
    assert!(net.node(0).stats().window_trimmed_age >= 2);
    // Later messages flow normally.
    net.send(0, msg(5));
    net.run_for(Duration::from_millis(50));
    assert_stream(&net, 1, NodeId(1), 5);
}

#[test]
fn one_mebibyte_is_fragmented_and_reassembled_under_loss() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let big: Vec<u8> = (0..(1 << 20)).map(|_| rng.random()).collect();
    let mut loss = ChaCha8Rng::seed_from_u64(8);
    net.set_filter(move |_, _, _| loss.random_bool(0.9));
    net.send(0, big.clone());
    net.send(0, msg(2));
    net.run_for(Duration::from_secs(3));
    let got = net.delivered(1, NodeId(1));
    assert_eq!(
        got.len(),
        2,
        "lost: {:?} stats {:?}",
        net.lost(1),
        net.node(1).stats()
    );
    assert_eq!(got[0].1.as_ref(), big.as_slice());
    let st = net.node(0).stats().clone();
    assert!(st.fragments_sent > 700, "{st:?}");
    assert_eq!(net.node(1).stats().messages_reassembled, 1);
    assert!(net.sent.iter().all(|(_, b)| b.len() <= 1400));
}

#[test]
fn small_messages_are_batched() {
    let mut net = Net::pair();
    net.run_for(JOIN);
    let now = net.now;
    for i in 1..=300 {
        net.node(0).send(now, msg(i)).unwrap();
    }
    // Within the batch delay nothing goes out unless a datagram is full.
    let before = net.node(0).stats().data_datagrams_sent;
    net.flush();
    let full = net.node(0).stats().data_datagrams_sent - before;
    net.run_for(Duration::from_millis(50));
    let st = net.node(0).stats().clone();
    assert!(full >= 1, "full batches leave at once");
    assert!(st.data_datagrams_sent - before <= 4, "{st:?}");
    assert!(st.batches_sent >= 3);
    assert_stream(&net, 1, NodeId(1), 300);
}

#[test]
fn full_window_pushes_back_until_stable() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].window_max_messages = NonZeroUsize::new(8).unwrap();
    let mut net = Net::new(configs);
    net.run_for(JOIN);
    let now = net.now;
    for i in 1..=8 {
        assert_eq!(net.node(0).send(now, msg(i)), Ok(i));
    }
    assert_eq!(net.node(0).send(now, msg(9)), Err(SendError::WindowFull));
    assert!(!net.node(0).is_writable());
    // The receiver's heartbeat reports stability and frees the window.
    net.run_for(Duration::from_millis(400));
    assert!(net.events[0].contains(&Event::Writable));
    assert!(net.node(0).is_writable());
    assert_eq!(net.node(0).stats().window_full, 1);
    assert_eq!(net.node(0).stats().window_trimmed_stable, 8);
    let now = net.now;
    assert_eq!(net.node(0).send(now, msg(9)), Ok(9));
    assert_eq!(
        net.node(0).send(now, Bytes::from(vec![0; 2 << 20])),
        Err(SendError::TooLarge {
            size: 2 << 20,
            max: (1 << 20) + (64 << 10)
        })
    );
}

#[test]
fn rate_limit_paces_data() {
    let mut configs = vec![config(0, 1), config(1, 1)];
    configs[0].rate_bytes_per_sec = NonZeroU64::new(100_000);
    configs[0].rate_burst_bytes = NonZeroU64::new(10_000).unwrap();
    let mut net = Net::new(configs);
    let now = net.now;
    net.node(0)
        .send(now, Bytes::from(vec![1u8; 500_000]))
        .unwrap();
    net.run_for(Duration::from_secs(1));
    // Out of tokens: nothing to send now, and the timeout says when tokens return.
    let now = net.now;
    assert!(net.node(0).poll_transmit(now).is_none());
    let wake = net.node(0).poll_timeout().unwrap();
    assert!(
        wake > now && wake <= now + Duration::from_millis(20),
        "{:?}",
        wake - now
    );
    net.run_for(Duration::from_secs(3));
    assert!(
        net.delivered(1, NodeId(1)).is_empty(),
        "500 kB at 100 kB/s takes ~5 s"
    );
    assert!(net.node(0).stats().rate_limited > 0);
    net.run_for(Duration::from_secs(2));
    assert_eq!(net.delivered(1, NodeId(1)).len(), 1);
}

#[test]
fn naks_for_a_shared_gap_are_suppressed() {
    let mut net = Net::new(vec![config(0, 1), config(1, 1), config(2, 1)]);
    net.run_for(JOIN);
    net.send(0, msg(1));
    net.run_for(Duration::from_millis(1));
    net.set_filter(|from, _, b| {
        !(from == 0 && matches!(frame_of(b), Kind::Data(proto::Data { first_seq: 2, .. })))
    });
    net.send(0, msg(2));
    net.run_for(Duration::from_millis(1));
    net.send(0, msg(3));
    net.run_for(Duration::from_millis(300));
    for i in [1, 2] {
        assert_stream(&net, i, NodeId(1), 3);
    }
    let naks = net.node(1).stats().naks_sent + net.node(2).stats().naks_sent;
    let suppressed = net.node(1).stats().naks_suppressed + net.node(2).stats().naks_suppressed;
    assert_eq!((naks, suppressed), (1, 1));
    assert_eq!(net.node(0).stats().repairs_sent, 1);
}

#[test]
fn random_loss_three_nodes_settles_every_stream() {
    for seed in 0..3u64 {
        let mut net = Net::new((0..3).map(|i| config(i, 1)).collect());
        net.run_for(JOIN);
        let mut loss = ChaCha8Rng::seed_from_u64(seed);
        net.set_filter(move |_, _, _| loss.random_bool(0.8));
        for round in 1..=300u64 {
            for i in 0..3 {
                net.send(i, msg(round));
            }
            net.run_for(Duration::from_millis(1));
        }
        net.run_for(Duration::from_secs(3));
        for i in 0..3 {
            for j in 0..3 {
                if i != j {
                    assert_stream(&net, i, NodeId(j as u64 + 1), 300);
                }
            }
        }
        let lost: usize = (0..3).map(|i| net.lost(i).len()).sum();
        assert_eq!(
            lost, 0,
            "seed {seed}: window is large, nothing should be lost"
        );
    }
}

#[test]
fn same_seed_same_run() {
    let run = || {
        let mut net = Net::new((0..3).map(|i| config(i, 1)).collect());
        let mut loss = ChaCha8Rng::seed_from_u64(5);
        net.set_filter(move |_, _, _| loss.random_bool(0.7));
        for round in 1..=50u64 {
            net.send(0, msg(round));
            net.run_for(Duration::from_millis(2));
        }
        net.run_for(Duration::from_secs(1));
        let t0 = net.t0;
        (
            net.sent
                .iter()
                .map(|(f, b)| (*f, b.clone()))
                .collect::<Vec<_>>(),
            net.now - t0,
        )
    };
    assert_eq!(run(), run());
}
