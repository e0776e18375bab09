//! [`Counting`]: a global allocator that forwards every call unchanged to the system
//! allocator and counts, for the tests that measure memory:
//!
//! - [`allocations`]: allocation calls by every thread (`alloc`, `alloc_zeroed`, `realloc`);
//! - [`live_bytes`]: heap bytes currently allocated (allocated minus freed, all threads);
//! - [`thread_allocated_bytes`]: bytes the calling thread has allocated since it started.
//!
//! A test binary installs it with
//!
//! ```
//! #[global_allocator]
//! static GLOBAL: chorus_testkit::alloc::Counting = chorus_testkit::alloc::Counting;
//!
//! fn main() {
//!     let before = chorus_testkit::alloc::thread_allocated_bytes();
//!     let buffer = vec![0u8; 100];
//!     assert!(chorus_testkit::alloc::thread_allocated_bytes() >= before + 100);
//!     drop(buffer);
//! }
//! ```
//!
//! Without that, every counter stays 0. The counters are process-wide: tests that compare two
//! readings of [`allocations`] or [`live_bytes`] serialise themselves (libtest runs tests on
//! several threads); [`thread_allocated_bytes`] needs no such care.

// A global allocator is an `unsafe` trait; this one only counts and forwards.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE: AtomicI64 = AtomicI64::new(0);

thread_local! {
    // Const-initialised and without a destructor: reading it never allocates.
    static THREAD_ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

/// Allocation calls so far, by every thread.
#[must_use]
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Heap bytes allocated and not yet freed, by every thread.
#[must_use]
pub fn live_bytes() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

/// Bytes the calling thread has allocated since it started (frees not subtracted; a
/// `realloc` counts its new size).
#[must_use]
pub fn thread_allocated_bytes() -> u64 {
    THREAD_ALLOCATED.try_with(Cell::get).unwrap_or(0)
}

fn size(bytes: usize) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// One allocation of `bytes` bytes (the new size, for a `realloc` from `old` bytes).
fn count(bytes: usize, old: usize) {
    ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
    LIVE.fetch_add(size(bytes) - size(old), Ordering::Relaxed);
    let _ = THREAD_ALLOCATED.try_with(|a| a.set(a.get().saturating_add(bytes as u64)));
}

/// Forwards to [`System`], counting (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator; the counters have no
// effect on the memory handed out, and counting never allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 0);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(size(layout.size()), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size, layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    #[test]
    fn counts_calls_live_bytes_and_this_threads_bytes() {
        let (calls, mine) = (allocations(), thread_allocated_bytes());
        let mut v: Vec<u8> = Vec::with_capacity(1000);
        v.push(1);
        assert!(allocations() > calls);
        assert!(thread_allocated_bytes() >= mine + 1000);
        let other = std::thread::spawn(thread_allocated_bytes)
            .join()
            .unwrap_or_else(|_| panic!("thread panicked"));
        assert!(other < mine + 1000, "{other}: counted per thread");
        // Other test threads allocate too, so live bytes are compared on this thread's own
        // big allocation only.
        let before = live_bytes();
        let big = vec![0u8; 64 << 20];
        assert!(live_bytes() - before > (60 << 20));
        drop(big);
        assert!(live_bytes() - before < (4 << 20));
        drop(v);
    }
}
