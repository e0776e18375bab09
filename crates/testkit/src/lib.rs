//! chorus-testkit: the pieces Chorus' tests used to write again in every file.
//!
//! # What it holds
//!
//! - [`http`]: a minimal blocking HTTP/1.1 client: one request per connection
//!   ([`http::request`], [`http::try_request`]) or a keep-alive [`http::Connection`] with
//!   pipelining, over any `TcpStream` (e.g. one opened inside a network namespace).
//! - [`agent`]: [`Agent`], a guard for a child process with an HTTP API (a `chorus agent`):
//!   spawned with its output in a log file, ready once its API answers, SIGKILLed on drop.
//! - [`alloc`]: [`alloc::Counting`], a global allocator that forwards to the system allocator
//!   and counts allocations, live heap bytes and bytes allocated per thread.
//! - [`net`]: a loopback multicast group of one's own ([`net::random_group`]) and free ports.
//! - [`wait_until`]: bounded polling of a condition.
//! - [`TempDir`] (the `tempfile` crate's, re-exported) and [`temp_dir`] to name one.
//!
//! # What it does not do
//!
//! It depends on no Chorus crate (every crate of the workspace can use it as a
//! dev-dependency without a cycle) and on nothing but `std` and `tempfile`. It is for tests
//! only: nothing here is hardened against a hostile peer. Nothing here sends a datagram; the
//! groups it hands out are for loopback multicast with TTL 0 (docs/testing.md).

pub mod agent;
pub mod alloc;
pub mod http;
pub mod net;

use std::time::{Duration, Instant};

pub use agent::{Agent, Ready};
pub use tempfile::{self, TempDir};

/// A fresh directory under the system temp dir named `chorus-{tag}-XXXXXX`, removed (with
/// everything in it) when the returned guard drops.
///
/// # Panics
/// If the directory cannot be created.
#[must_use]
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("chorus-{tag}-"))
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temp dir for {tag}: {e}"))
}

/// Checks `done` every `every` until it holds (`true`) or `timeout` has passed (`false`;
/// `done` is checked one last time at the deadline).
pub fn poll_until(timeout: Duration, every: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Waits until `done` holds, checking every 50 ms.
///
/// # Panics
/// After `timeout`, with a message naming `what`.
pub fn wait_until(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    assert!(
        poll_until(timeout, Duration::from_millis(50), done),
        "timed out after {timeout:?} waiting for {what}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_dir_is_named_and_removed() {
        let dir = temp_dir("kit");
        let path = dir.path().to_path_buf();
        assert!(path.is_dir());
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(name.starts_with("chorus-kit-"), "{name}");
        std::fs::write(path.join("f"), b"x").unwrap_or_else(|e| panic!("{e}"));
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn polling_stops_when_done_or_at_the_deadline() {
        let mut calls = 0;
        assert!(poll_until(Duration::from_secs(5), Duration::ZERO, || {
            calls += 1;
            calls == 3
        }));
        assert_eq!(calls, 3);
        let start = Instant::now();
        assert!(!poll_until(
            Duration::from_millis(30),
            Duration::from_millis(5),
            || false
        ));
        assert!(start.elapsed() >= Duration::from_millis(30));
    }
}
