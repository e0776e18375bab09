//! Blocking queries: `?index=N&wait=D` holds a read until what it reads changes past index
//! `N`, or the wait ends.
//!
//! As Consul: the wait is 5 minutes unless given, at most 10 minutes, and a random jitter of
//! up to a sixteenth of it is added, so that many clients started together do not all come
//! back at once. `?index=0` (or no index) does not block. An index above this agent's own
//! (from another agent, or from before a restart) is answered at once, so that the client
//! sees the index go back and starts over, as Consul clients do.
//!
//! A blocked request follows the node's change feed (a [`chorus::Watch`] on its key or
//! prefix), not a timer: it is woken by a change that may concern it and reads again. At
//! most three quarters of the connection limit's requests are blocked at once (each holds one of the server's
//! connections); one more is answered 429 at once rather than take the last connections.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chorus::Node;
use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::http::ApiError;

/// The wait of a blocking query that gives none.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest wait of a blocking query (longer ones are cut to it).
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// The jitter added to a wait is at most the wait divided by this.
pub const JITTER_FRACTION: u32 = 16;

/// What a read waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// The index the client holds: answer once the read's index is above it.
    pub index: u64,
    /// How long to wait at most (before the jitter).
    pub wait: Duration,
}

impl Wait {
    /// The blocking part of a query: `None` without `index` (or with `index=0`).
    ///
    /// # Errors
    /// An index that is not a number, or a `wait` that is not a duration (`10s`, `5m`,
    /// `1m30s`, `250ms`).
    pub fn parse(index: Option<&str>, wait: Option<&str>) -> Result<Option<Wait>, ApiError> {
        let wait = match wait {
            None => None,
            Some(text) => Some(parse_duration(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid wait {text:?}: expected a duration such as 10s, 5m or 1m30s"
                ))
            })?),
        };
        let Some(index) = index else {
            return Ok(None);
        };
        let index = index.trim().parse::<u64>().map_err(|_| {
            ApiError::bad_request(format!("invalid index {index:?}: expected a number"))
        })?;
        if index == 0 {
            return Ok(None);
        }
        let wait = match wait {
            None => DEFAULT_WAIT,
            Some(w) if w.is_zero() => DEFAULT_WAIT,
            Some(w) => w.min(MAX_WAIT),
        };
        Ok(Some(Wait { index, wait }))
    }

    /// The wait plus Consul's jitter (up to a sixteenth of it).
    pub fn with_jitter(self) -> Duration {
        let most = self.wait / JITTER_FRACTION;
        let nanos = u64::try_from(most.as_nanos()).unwrap_or(u64::MAX);
        self.wait + Duration::from_nanos(rand::rng().random_range(0..=nanos))
    }
}

/// A Go duration (`time.ParseDuration`, which Consul uses for `wait`): numbers with units
/// `ns`, `us`, `µs`, `ms`, `s`, `m`, `h`, one after the other (`1h2m3.5s`), or a bare `0`.
/// Negative durations are refused.
pub fn parse_duration(text: &str) -> Option<Duration> {
    let text = text.trim().strip_prefix('+').unwrap_or(text.trim());
    if text == "0" {
        return Some(Duration::ZERO);
    }
    if text.is_empty() {
        return None;
    }
    let mut rest = text;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_len);
        if number.is_empty() || number == "." {
            return None;
        }
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let nanos_per: f64 = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        let value: f64 = number.parse().ok()?;
        let nanos = value * nanos_per;
        // Anything beyond a day is cut to MAX_WAIT anyway; refuse what cannot be represented.
        if !nanos.is_finite() || nanos > 1e18 {
            return None;
        }
        total = total.checked_add(Duration::from_nanos(nanos as u64))?;
        rest = tail;
    }
    Some(total)
}

/// The budget of blocked requests.
#[derive(Debug, Clone)]
pub struct Blocking {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl Blocking {
    /// At most three quarters of `max_connections` (and at least one) blocked at once, so
    /// that blocked reads never take every connection from writes and plain reads.
    pub fn new(max_connections: usize) -> Blocking {
        let limit = (max_connections.saturating_mul(3) / 4).max(1);
        Blocking {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// A place for one more blocked request.
    ///
    /// # Errors
    /// 429 when as many requests as the limit allows are blocked already.
    pub fn enter(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.permits).try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "too many blocking queries open on this agent (at most {}, three quarters \
                     of --http-max-connections); retry later",
                    self.limit
                ),
            )
        })
    }
}

/// What a blocked read follows on the change feed.
#[derive(Debug, Clone, Copy)]
pub enum Scope<'a> {
    /// One key exactly.
    Key(&'a str),
    /// Every key under a prefix.
    Prefix(&'a str),
}

/// Runs `read` (which returns an answer and its Consul index) until its index is above
/// `wait.index`, waiting for changes in `scope` between reads, or until the wait ends;
/// then returns the last read. Without `wait`, reads once.
///
/// # Errors
/// 429 when too many requests are blocked already; what `read` returns.
pub async fn run<T, F, Fut>(
    node: &Node,
    blocking: &Blocking,
    scope: Scope<'_>,
    wait: Option<Wait>,
    mut read: F,
) -> Result<T, ApiError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(T, u64), ApiError>>,
{
    let Some(wait) = wait else {
        return read().await.map(|(answer, _)| answer);
    };
    let _permit = blocking.enter()?;
    let deadline = Instant::now() + wait.with_jitter();
    // Follow the feed before the first read: a change after it is then never missed.
    let prefix = match scope {
        Scope::Key(key) | Scope::Prefix(key) => key,
    };
    let mut changes = node.watch(prefix);
    loop {
        let (answer, index) = read().await?;
        // The client's index is from another agent or an earlier life of this one.
        let ahead = wait.index > super::index::of_revision(node.revision());
        if index > wait.index || ahead {
            return Ok(answer);
        }
        let woken = tokio::time::timeout_at(deadline, async {
            while let Some(change) = changes.next().await {
                match change {
                    Ok(change) => {
                        let concerns = match scope {
                            Scope::Key(key) => change.key == key,
                            Scope::Prefix(_) => true,
                        };
                        if concerns {
                            return true;
                        }
                    }
                    // Fell behind the change log: read again, as after a change.
                    Err(_) => return false,
                }
            }
            false
        })
        .await;
        match woken {
            Ok(true) => {}
            // The wait ended, the node stopped, or the feed cannot go on: answer what is.
            Ok(false) | Err(_) => return read().await.map(|(answer, _)| answer),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let cases = [
            ("10s", Duration::from_secs(10)),
            ("5m", Duration::from_secs(300)),
            ("1m30s", Duration::from_secs(90)),
            ("250ms", Duration::from_millis(250)),
            ("1.5s", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
            ("0", Duration::ZERO),
            ("100us", Duration::from_micros(100)),
            ("+3s", Duration::from_secs(3)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Some(want), "{text}");
        }
        for bad in [
            "",
            "10",
            "s",
            "-5s",
            "5x",
            "1.2.3s",
            "ms10",
            ".s",
            "1e9s",
            "99999999999h",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn wait_defaults_limits_and_errors() {
        assert_eq!(Wait::parse(None, None).unwrap(), None);
        assert_eq!(Wait::parse(Some("0"), Some("10s")).unwrap(), None);
        let w = Wait::parse(Some("7"), None).unwrap().unwrap();
        assert_eq!((w.index, w.wait), (7, DEFAULT_WAIT));
        let w = Wait::parse(Some("7"), Some("1h")).unwrap().unwrap();
        assert_eq!(w.wait, MAX_WAIT);
        let w = Wait::parse(Some("7"), Some("2s")).unwrap().unwrap();
        assert_eq!(w.wait, Duration::from_secs(2));
        for _ in 0..100 {
            let d = w.with_jitter();
            assert!(d >= w.wait && d <= w.wait + w.wait / 16, "{d:?}");
        }
        assert!(Wait::parse(Some("x"), None).is_err());
        assert!(Wait::parse(Some("-1"), None).is_err());
        assert!(Wait::parse(Some("3"), Some("soon")).is_err());
    }

    #[test]
    fn the_blocking_budget_leaves_connections_free() {
        assert_eq!(Blocking::new(256).limit, 192);
        assert_eq!(Blocking::new(1).limit, 1);
        let b = Blocking::new(4);
        let held: Vec<_> = (0..3).map(|_| b.enter().unwrap()).collect();
        assert!(b.enter().is_err());
        drop(held);
        assert!(b.enter().is_ok());
    }
}
