//! Benchmarks of the store's reads (`get` hit and miss, a 100-key prefix scan and a scan of
//! everything, among 1 M keys) and of what anti-entropy enumerates from the key index (the
//! summaries of one bucket, with its key list at hand or built first, of every bucket of a
//! digest, of one bucket holding all 1 M keys, and the handling of a received summary).
//!
//! Run: `cargo bench -p chorus-replication --bench store -- --warm-up-time 1 --measurement-time 3`
//! (the figures are in `docs/performance.md`).

// criterion's macros generate undocumented public functions.
#![allow(missing_docs)]

use std::hint::black_box;
use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use chorus_replication::wire::{self, envelope::Body};
use chorus_replication::{Op, Replica, ReplicaConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message as _;

const KEYS: usize = 1_000_000;
const WALL_MS: u64 = 1_700_000_000_000;
/// The peer that sends digests and summaries to the replica under test.
const PEER: u64 = 2;

fn key(i: usize) -> String {
    format!("user/{i:07}")
}

/// A replica (node 1) holding `KEYS` keys with 32-byte values, and a live peer.
fn filled(buckets: u32, now: Instant) -> Replica {
    let mut cfg = ReplicaConfig::new(1, 7);
    cfg.buckets = NonZeroU32::new(buckets).unwrap_or(NonZeroU32::MIN);
    let mut r = Replica::new(cfg, now);
    let value = bytes::Bytes::from_static(&[7u8; 32]);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk
            .iter()
            .map(|&i| Op::put(key(i), value.clone()))
            .collect();
        r.batch(WALL_MS, ops).expect("a valid batch");
        drain(&mut r);
    }
    r.handle_peer_up(now, PEER);
    drain(&mut r);
    r
}

/// Drops every queued output; returns the outgoing messages' bytes.
fn drain(r: &mut Replica) -> usize {
    while r.poll_event().is_some() {}
    let mut bytes = 0;
    while let Some(o) = r.poll_outgoing() {
        bytes += o.payload.len();
    }
    bytes
}

/// A digest from `PEER` that differs from `r`'s in the buckets `differ` says.
fn digest_from_peer(r: &Replica, differ: impl Fn(usize) -> bool) -> Vec<u8> {
    let buckets = r
        .digest()
        .into_iter()
        .enumerate()
        .map(|(b, h)| if differ(b) { h ^ 1 } else { h })
        .collect();
    wire::Envelope {
        body: Some(Body::Digest(wire::Digest {
            round: 1,
            buckets,
            reply_wanted: false,
            fresh: false,
        })),
    }
    .encode_to_vec()
}

fn store_reads(c: &mut Criterion) {
    let now = Instant::now();
    let r = filled(256, now);
    let store = r.store().clone();
    let hit = key(KEYS / 2);
    let miss = "user/x".to_owned();
    let mut g = c.benchmark_group("store_1M");
    g.bench_function("get_hit", |b| b.iter(|| store.get(black_box(&hit))));
    // Keys spread over the whole store, as a server's reads would be (cache misses included).
    let spread: Vec<String> = (0..65_536).map(|i| key(i * 7919 % KEYS)).collect();
    let mut i = 0;
    g.bench_function("get_hit_spread", |b| {
        b.iter(|| {
            i = (i + 1) % spread.len();
            store.get(black_box(&spread[i]))
        })
    });
    g.bench_function("get_miss", |b| b.iter(|| store.get(black_box(&miss))));
    g.bench_function("scan_prefix_100", |b| {
        b.iter(|| {
            let out = store.scan_prefix(black_box("user/01234"));
            assert_eq!(out.len(), 100);
            out
        })
    });
    g.sample_size(10);
    g.bench_function("scan_all", |b| {
        b.iter(|| {
            let out = store.scan_prefix(black_box(""));
            assert_eq!(out.len(), KEYS);
            out
        })
    });
    g.finish();
}

/// The summaries a replica builds in answer to a digest (one differing bucket of 256, every
/// bucket, one bucket holding all keys), and its handling of a received summary.
fn summaries(c: &mut Criterion) {
    let start = Instant::now();
    let mut g = c.benchmark_group("sync_1M");
    g.sample_size(10);
    {
        let mut r = filled(256, start);
        let one = digest_from_peer(&r, |b| b == 0);
        let all = digest_from_peer(&r, |_| true);
        let mut now = start;
        // Every answer waits out the resend holdoff of the one before.
        let step = r.config().resend_holdoff + Duration::from_millis(1);
        g.bench_function("summary_1_of_256_buckets", |b| {
            b.iter(|| {
                now += step;
                r.handle_message(now, WALL_MS, PEER, black_box(&one));
                assert!(drain(&mut r) > 0);
            })
        });
        // The same when the bucket key lists are gone (dropped at a timer tick that found
        // them unread since the tick before): one walk of the index builds them all first.
        g.bench_function("summary_1_of_256_buckets_cold", |b| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..2 {
                        now += Duration::from_secs(10);
                        r.handle_timeout(now, WALL_MS);
                        drain(&mut r);
                    }
                    now += step;
                    let t = Instant::now();
                    r.handle_message(now, WALL_MS, PEER, black_box(&one));
                    assert!(drain(&mut r) > 0);
                    spent += t.elapsed();
                }
                spent
            })
        });
        g.bench_function("summaries_256_of_256_buckets", |b| {
            b.iter(|| {
                now += step;
                r.handle_message(now, WALL_MS, PEER, black_box(&all));
                assert!(drain(&mut r) > 0);
            })
        });
        // The replica's own summaries of bucket 0, sent back to it by the peer (same
        // versions: nothing to send or request; what is measured is the enumeration).
        now += step;
        r.handle_message(now, WALL_MS, PEER, &one);
        let mut received = Vec::new();
        while let Some(o) = r.poll_outgoing() {
            let Ok(wire::Envelope {
                body: Some(Body::Summary(mut s)),
            }) = wire::Envelope::decode(o.payload)
            else {
                continue;
            };
            s.target = r.node();
            received.push(
                wire::Envelope {
                    body: Some(Body::Summary(s)),
                }
                .encode_to_vec(),
            );
        }
        assert!(!received.is_empty());
        g.bench_function("receive_summaries_of_1_bucket", |b| {
            b.iter(|| {
                for s in &received {
                    r.handle_message(now, WALL_MS, PEER, black_box(s));
                }
                drain(&mut r)
            })
        });
    }
    {
        let mut r = filled(1, start);
        let one = digest_from_peer(&r, |_| true);
        let mut now = start;
        let step = r.config().resend_holdoff + Duration::from_millis(1);
        g.bench_function("summary_1_bucket_of_1M_keys", |b| {
            b.iter(|| {
                now += step;
                r.handle_message(now, WALL_MS, PEER, black_box(&one));
                assert!(drain(&mut r) > 0);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, store_reads, summaries);
criterion_main!(benches);
