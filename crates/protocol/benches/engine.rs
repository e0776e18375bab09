//! Benchmarks of the protocol engine: frame encode/decode, and messages per second through one
//! sender and one receiver connected in memory (virtual clock), without and with 10 % loss, each
//! plain and sealed (XChaCha20-Poly1305, `Config::keyring`).
//!
//! Run: `cargo bench -p chorus-protocol --bench engine -- --quick`

// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_protocol::wire::{self, Header};
use chorus_protocol::{
    ClusterId, Config, Endpoint, Event, Incarnation, Key, KeyId, Keyring, NodeId,
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const CLUSTER: ClusterId = ClusterId(42);

fn codec(c: &mut Criterion) {
    let header = Header::new(CLUSTER, NodeId(1), Incarnation(1));
    let messages: Vec<Bytes> = (0..32).map(|i| Bytes::from(vec![i as u8; 32])).collect();
    let batch = wire::encode_data(&header, 1000, messages.iter(), None);
    let chunk = vec![7u8; 1300];
    let fragment = wire::encode_fragment(&header, 1000, 1 << 20, 13_000, &chunk, None);

    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_batch_32x32B", |b| {
        b.iter(|| wire::encode_data(black_box(&header), 1000, messages.iter(), None))
    });
    g.bench_function("decode_batch_32x32B", |b| {
        b.iter(|| wire::decode(black_box(&batch), 65_507, CLUSTER).map(|(_, f)| f.kind.is_some()))
    });
    g.bench_function("encode_fragment_1300B", |b| {
        b.iter(|| wire::encode_fragment(black_box(&header), 1000, 1 << 20, 13_000, &chunk, None))
    });
    g.bench_function("decode_fragment_1300B", |b| {
        b.iter(|| {
            wire::decode(black_box(&fragment), 65_507, CLUSTER).map(|(_, f)| f.kind.is_some())
        })
    });
    // The same with authenticated encryption (XChaCha20-Poly1305): seal = plain encode +
    // seal, open = authenticate + decrypt + decode.
    let ring = keyring();
    let sealed_batch = wire::seal(&batch, &ring, 1).expect("plain datagram");
    let sealed_fragment = wire::seal(&fragment, &ring, 2).expect("plain datagram");
    g.bench_function("seal_batch_32x32B", |b| {
        b.iter(|| {
            let plain = wire::encode_data(black_box(&header), 1000, messages.iter(), None);
            wire::seal(&plain, &ring, 1)
        })
    });
    g.bench_function("open_batch_32x32B", |b| {
        b.iter(|| {
            wire::open(black_box(&sealed_batch), 65_507, CLUSTER, &ring)
                .map(|(_, f)| f.kind.is_some())
        })
    });
    g.bench_function("seal_fragment_1300B", |b| {
        b.iter(|| {
            let plain =
                wire::encode_fragment(black_box(&header), 1000, 1 << 20, 13_000, &chunk, None);
            wire::seal(&plain, &ring, 1)
        })
    });
    g.bench_function("open_fragment_1300B", |b| {
        b.iter(|| {
            wire::open(black_box(&sealed_fragment), 65_507, CLUSTER, &ring)
                .map(|(_, f)| f.kind.is_some())
        })
    });
    g.finish();
}

fn keyring() -> Keyring {
    Keyring::single(Key::new(KeyId::new(1).expect("non-zero"), [0x42; 32]))
}

fn config(node: u64, sealed: bool) -> Config {
    let mut c = Config::lan(CLUSTER, NodeId(node), Incarnation(1), node);
    c.rate_bytes_per_sec = None;
    if sealed {
        c.keyring = Some(keyring());
    }
    c
}

/// Pushes `n` messages of `size` bytes from a sender to a receiver, losing each datagram
/// (either direction) with probability `loss`. Returns (delivered, lost) at the receiver.
fn transfer(n: u64, size: usize, loss: f64, seed: u64, sealed: bool) -> (u64, u64) {
    let t0 = Instant::now();
    let mut now = t0;
    let (a_addr, b_addr) = (
        SocketAddr::from(([10, 0, 0, 1], 1)),
        SocketAddr::from(([10, 0, 0, 2], 1)),
    );
    let mut a = Endpoint::new(config(1, sealed), now);
    let mut b = Endpoint::new(config(2, sealed), now);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let payload = Bytes::from(vec![0xAB; size]);
    let (mut queued, mut delivered, mut lost) = (0u64, 0u64, 0u64);
    for _ in 0..10_000_000u64 {
        while queued < n && a.send(now, payload.clone()).is_ok() {
            queued += 1;
            if queued % 64 == 0 {
                now += Duration::from_micros(1);
            }
        }
        let mut moved = false;
        while let Some(t) = a.poll_transmit(now) {
            moved = true;
            if !rng.random_bool(loss) {
                b.handle_datagram(now, a_addr, &t.payload);
            }
        }
        while let Some(t) = b.poll_transmit(now) {
            moved = true;
            if !rng.random_bool(loss) {
                a.handle_datagram(now, b_addr, &t.payload);
            }
        }
        while let Some(e) = b.poll_event() {
            match e {
                Event::Delivered { .. } => delivered += 1,
                Event::Lost { range, .. } => lost += range.end() - range.start() + 1,
                _ => {}
            }
        }
        while a.poll_event().is_some() {}
        if delivered + lost >= n {
            break;
        }
        if !moved {
            let next = [a.poll_timeout(), b.poll_timeout()]
                .into_iter()
                .flatten()
                .min();
            now = next.map_or(now, |t| t.max(now));
            a.handle_timeout(now);
            b.handle_timeout(now);
        }
    }
    (delivered, lost)
}

fn throughput(c: &mut Criterion) {
    const N: u64 = 100_000;
    let mut g = c.benchmark_group("engine");
    g.throughput(Throughput::Elements(N));
    g.sample_size(10);
    for (name, loss, sealed) in [
        ("100k_x_32B_no_loss", 0.0, false),
        ("100k_x_32B_no_loss_sealed", 0.0, true),
        ("100k_x_32B_10pct_loss", 0.1, false),
        ("100k_x_32B_10pct_loss_sealed", 0.1, true),
    ] {
        g.bench_function(name, |bench| {
            let mut seed = 0;
            bench.iter(|| {
                seed += 1;
                let (delivered, lost) = transfer(N, 32, loss, seed, sealed);
                assert_eq!(delivered + lost, N);
                delivered
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, throughput);
criterion_main!(benches);
