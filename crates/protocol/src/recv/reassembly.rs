//! Reassembly of one fragmented message: chunks kept as they came, charged to the budget,
//! assembled once every byte is in.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};

use crate::proto;

use super::MAX_NAK_BYTE_RANGES;
use super::budget::{Budget, ENTRY_OVERHEAD, Held, REASSEMBLY_OVERHEAD, keep, keep_charge};

/// What [`Reassembly::insert`] did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Inserted {
    /// Every byte of the chunk was held already.
    Duplicate,
    /// The new bytes do not fit the budget; nothing changed.
    NoRoom,
    /// New bytes are held; the stream's charge changed by `+added - released`.
    Added { added: usize, released: usize },
}

/// A fragmented message being received. Memory follows the bytes received, never the
/// declared `total_len`: chunks are kept as they came and assembled once all are in.
#[derive(Debug)]
pub(super) struct Reassembly {
    pub(super) total_len: u32,
    /// Received chunks by offset, disjoint (adjacent ones are not merged).
    pub(super) chunks: BTreeMap<u32, Held>,
    /// Bytes held (the sum of the chunks' lengths).
    pub(super) received: u32,
    pub(super) max_end: u32,
    /// What this reassembly is charged: [`REASSEMBLY_OVERHEAD`] plus its chunks' charges.
    pub(super) charge: usize,
    /// Chunks looked at by `insert` (a test measure of its cost).
    #[cfg(test)]
    pub(super) visited: usize,
}

impl Reassembly {
    pub(super) fn new(total_len: u32) -> Reassembly {
        Reassembly {
            total_len,
            chunks: BTreeMap::new(),
            received: 0,
            max_end: 0,
            charge: REASSEMBLY_OVERHEAD,
            #[cfg(test)]
            visited: 0,
        }
    }

    /// Adds the bytes `[offset, offset + chunk.len())` that are not held yet, charging them
    /// to `budget`. O(log n + chunks it replaces): held chunks entirely inside the new one
    /// give way to it, and it is trimmed where it overlaps its neighbours.
    pub(super) fn insert(
        &mut self,
        offset: u32,
        chunk: Bytes,
        shared: usize,
        budget: &mut Budget,
    ) -> Inserted {
        // The caller checked `offset + len <= total_len <= u32::MAX`.
        let (start, end) = (offset, offset + chunk.len() as u32);
        let mut covered = 0u32;
        let mut inside = Vec::new();
        let (mut from, mut to) = (start, end);
        for (&a, held) in self.chunks.range(..end).rev() {
            #[cfg(test)]
            {
                self.visited += 1;
            }
            let b = a + held.payload.len() as u32;
            if b <= start {
                break;
            }
            covered += b.min(end) - a.max(start);
            if start <= a && b <= end {
                inside.push((a, held.charge));
            } else if a < start {
                from = b;
            } else {
                to = a;
            }
        }
        if covered == end - start {
            return Inserted::Duplicate;
        }
        let piece = chunk.slice((from - offset) as usize..(to - offset) as usize);
        let charge = keep_charge(piece.len(), shared);
        let released: usize = inside.iter().map(|(_, c)| c).sum();
        if !budget.fits(charge.saturating_sub(released)) {
            return Inserted::NoRoom;
        }
        for (a, _) in &inside {
            if let Some(old) = self.chunks.remove(a) {
                self.received -= old.payload.len() as u32;
            }
        }
        budget.release(released);
        let (piece, charge) = keep(piece, shared);
        budget.try_charge(charge);
        self.received += piece.len() as u32;
        self.chunks.insert(
            from,
            Held {
                payload: piece,
                charge,
            },
        );
        self.charge = self.charge + charge - released;
        self.max_end = self.max_end.max(end);
        Inserted::Added {
            added: charge,
            released,
        }
    }

    pub(super) fn complete(&self) -> bool {
        self.received == self.total_len
    }

    /// The whole message and what it is charged once held as one payload.
    pub(super) fn assemble(mut self) -> (Bytes, usize) {
        if self.chunks.len() == 1
            && let Some((_, only)) = self.chunks.pop_first()
        {
            return (only.payload, only.charge);
        }
        let mut buf = BytesMut::with_capacity(self.total_len as usize);
        for held in self.chunks.values() {
            buf.extend_from_slice(&held.payload);
        }
        (buf.freeze(), self.total_len as usize + ENTRY_OVERHEAD)
    }

    /// Byte ranges missing below `limit`.
    pub(super) fn missing(&self, limit: u32) -> Vec<proto::ByteRange> {
        let mut out = Vec::new();
        let mut cursor = 0u32;
        for (&a, held) in &self.chunks {
            if cursor >= limit || out.len() == MAX_NAK_BYTE_RANGES {
                break;
            }
            if a > cursor {
                out.push(proto::ByteRange {
                    offset: cursor,
                    len: a.min(limit) - cursor,
                });
            }
            cursor = cursor.max(a + held.payload.len() as u32);
        }
        if cursor < limit && out.len() < MAX_NAK_BYTE_RANGES {
            out.push(proto::ByteRange {
                offset: cursor,
                len: limit - cursor,
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    pub(super) fn fragment_insert_is_not_quadratic_and_reassembles_any_overlap() {
        // Every other byte first, backwards (the worst order for a sorted interval list),
        // then the rest: each insert looks at O(1) neighbours.
        let n: u32 = 20_000;
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let mut budget = Budget::new(usize::MAX);
        let mut r = Reassembly::new(n);
        let mut inserts = 0;
        for start in [0u32, 1] {
            for i in (start..n).step_by(2).rev() {
                let at = i as usize;
                let piece = Bytes::copy_from_slice(&data[at..at + 1]);
                assert!(matches!(
                    r.insert(i, piece, 1, &mut budget),
                    Inserted::Added { .. }
                ));
                inserts += 1;
            }
        }
        assert!(r.complete());
        assert!(
            r.visited <= 3 * inserts,
            "{} visits for {inserts}",
            r.visited
        );
        assert_eq!(budget.used() + REASSEMBLY_OVERHEAD, r.charge);
        let (whole, _) = r.assemble();
        assert_eq!(whole.as_ref(), data.as_slice());

        // Random overlapping chunks against a model; the charge always matches.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..200 {
            let len = rng.random_range(1..400u32);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let mut budget = Budget::new(usize::MAX);
            let mut r = Reassembly::new(len);
            let mut have = vec![false; len as usize];
            while !r.complete() {
                let a = rng.random_range(0..len);
                let b = rng.random_range(a + 1..=len.min(a + 40));
                let new = have[a as usize..b as usize].iter().any(|h| !h);
                let got = r.insert(
                    a,
                    Bytes::copy_from_slice(&data[a as usize..b as usize]),
                    64,
                    &mut budget,
                );
                assert_eq!(matches!(got, Inserted::Added { .. }), new);
                assert_eq!(got == Inserted::Duplicate, !new);
                have[a as usize..b as usize].fill(true);
                assert_eq!(r.received as usize, have.iter().filter(|h| **h).count());
                assert_eq!(budget.used() + REASSEMBLY_OVERHEAD, r.charge);
            }
            assert_eq!(r.assemble().0.as_ref(), data.as_slice());
        }
    }
}
