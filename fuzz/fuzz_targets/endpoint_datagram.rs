//! Fuzzes a whole endpoint: a sequence of datagrams (split on a length prefix) fed to
//! `handle_datagram`, with timers run in between. Nothing a peer sends may panic it.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chorus_protocol::wire::{self, CRC_LEN, HEADER_LEN};
use chorus_protocol::{ClusterId, Config, Endpoint, Incarnation, NodeId};
use libfuzzer_sys::fuzz_target;

const CLUSTER: ClusterId = ClusterId(1);

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut ep = Endpoint::new(Config::lan(CLUSTER, NodeId(1), Incarnation(1), 0), t0);
    let from = SocketAddr::from(([10, 0, 0, 2], 7400));
    let mut now = t0;
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        rest = &rest[2..];
        let take = len.min(rest.len());
        let mut datagram = rest[..take].to_vec();
        rest = &rest[take..];
        // Seal most datagrams with a valid header so the frame logic is exercised.
        if datagram.len() >= HEADER_LEN + CRC_LEN && datagram[0] != b'!' {
            datagram[..4].copy_from_slice(&wire::MAGIC);
            datagram[4] = wire::VERSION;
            datagram[6..10].fill(0);
            datagram[16..24].copy_from_slice(&CLUSTER.0.to_be_bytes());
            let body = (datagram.len() - HEADER_LEN - CRC_LEN) as u32;
            datagram[12..16].copy_from_slice(&body.to_be_bytes());
            let crc_at = datagram.len() - CRC_LEN;
            let crc = wire::crc32(&datagram[..crc_at]);
            datagram[crc_at..].copy_from_slice(&crc.to_be_bytes());
        }
        ep.handle_datagram(now, from, &datagram);
        now += Duration::from_millis(7);
        ep.handle_timeout(now);
        while ep.poll_transmit(now).is_some() {}
        while ep.poll_event().is_some() {}
    }
});
