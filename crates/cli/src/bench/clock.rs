//! The clock both sides of a measurement share, the stamp every payload carries, and pacing.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes at the start of every payload: sequence number then send time ([`now_ns`]).
pub const HEADER: usize = 16;

/// Nanoseconds on a clock that two processes of one machine share: the wall clock read once
/// at the first call, advanced by the monotonic clock since. Within a process it never goes
/// back; between processes it agrees as long as nobody steps the wall clock in between.
pub fn now_ns() -> u64 {
    static ANCHOR: OnceLock<(Instant, u64)> = OnceLock::new();
    let (at, wall) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        (Instant::now(), wall)
    });
    wall.saturating_add(u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX))
}

/// Writes the sequence number and send time into the payload header.
pub fn stamp(buf: &mut [u8], seq: u64) {
    buf[..8].copy_from_slice(&seq.to_le_bytes());
    buf[8..HEADER].copy_from_slice(&now_ns().to_le_bytes());
}

/// Reads the header back: (sequence, send time in [`now_ns`]). `None` for a payload too short.
pub fn unstamp(buf: &[u8]) -> Option<(u64, u64)> {
    let seq = u64::from_le_bytes(buf.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(buf.get(8..HEADER)?.try_into().ok()?);
    Some((seq, sent))
}

/// When message `seq` is due at a paced `rate` (messages per second), after the first.
pub(super) fn offset(seq: u64, rate: Option<u64>) -> Option<Duration> {
    let rate = rate.filter(|r| *r > 0)?;
    Some(Duration::from_nanos(
        (u128::from(seq) * 1_000_000_000 / u128::from(rate))
            .try_into()
            .unwrap_or(u64::MAX),
    ))
}

/// [`offset`] from a tokio instant.
pub(super) fn slot(
    t0: tokio::time::Instant,
    seq: u64,
    rate: Option<u64>,
) -> Option<tokio::time::Instant> {
    offset(seq, rate).map(|d| t0 + d)
}

/// The tokio instant of a [`now_ns`] time.
pub(super) fn tokio_at(ns: u64) -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_nanos(ns.saturating_sub(now_ns()))
}

pub(super) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
