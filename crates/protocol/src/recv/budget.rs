//! The one receive budget of an endpoint and what each held thing is charged.

use bytes::Bytes;

/// Bytes charged for each held message or fragment chunk besides its payload: its map slot
/// and `Bytes` handle, rounded up.
pub(crate) const ENTRY_OVERHEAD: usize = 64;
/// Bytes charged for each partial reassembly besides its chunks.
pub(crate) const REASSEMBLY_OVERHEAD: usize = 128;
/// Bytes charged to the receive budget ([`Config::receive_budget_bytes`](crate::Config)) for
/// the state of each sender an endpoint keeps (member or candidate): the table slot, the
/// stream and its indexes, rounded up. See `docs/protocol.md` §3.2.1.
pub const SENDER_OVERHEAD: usize = 1024;

/// The one receive memory budget of an endpoint, over every sender.
#[derive(Debug)]
pub(crate) struct Budget {
    used: usize,
    max: usize,
}

impl Budget {
    pub(crate) fn new(max: usize) -> Budget {
        Budget { used: 0, max }
    }

    pub(crate) fn used(&self) -> usize {
        self.used
    }

    /// Whether `bytes` more can be charged.
    pub(crate) fn fits(&self, bytes: usize) -> bool {
        bytes <= self.max - self.used.min(self.max)
    }

    /// Charges `bytes` if they fit; returns whether they were charged.
    pub(crate) fn try_charge(&mut self, bytes: usize) -> bool {
        if !self.fits(bytes) {
            return false;
        }
        self.used += bytes;
        true
    }

    /// Gives back `bytes` charged earlier.
    pub(crate) fn release(&mut self, bytes: usize) {
        debug_assert!(bytes <= self.used, "released {bytes} of {}", self.used);
        self.used = self.used.saturating_sub(bytes);
    }
}

/// What a payload held from a datagram costs, and the payload to hold: one shorter than half
/// of the buffer it shares (the datagram body, `shared` bytes) is copied out, so that it holds
/// only its own bytes; a longer one keeps sharing the buffer and is charged all of it.
pub(super) fn keep(payload: Bytes, shared: usize) -> (Bytes, usize) {
    if payload.len().saturating_mul(2) < shared {
        let own = Bytes::copy_from_slice(&payload);
        let charge = own.len() + ENTRY_OVERHEAD;
        (own, charge)
    } else {
        let charge = shared.max(payload.len()) + ENTRY_OVERHEAD;
        (payload, charge)
    }
}

/// The charge [`keep`] would make, without copying.
pub(crate) fn keep_charge(len: usize, shared: usize) -> usize {
    if len.saturating_mul(2) < shared {
        len + ENTRY_OVERHEAD
    } else {
        shared.max(len) + ENTRY_OVERHEAD
    }
}

/// A held payload and what it is charged.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) payload: Bytes,
    pub(super) charge: usize,
}
