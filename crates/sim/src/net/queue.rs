//! The event queue: every future delivery and timer, ordered by `(virtual time, insertion
//! counter)` so that equal times keep their scheduling order and a run replays exactly.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::time::Instant;

use bytes::Bytes;

/// A scheduled event.
pub(super) enum Item {
    /// A copy arrives at node `to`, if it still runs the same `generation`.
    Deliver {
        to: usize,
        generation: u64,
        from: usize,
        payload: Bytes,
        corrupted: bool,
    },
    /// Node `node`'s timer, if it still runs the same `generation` and still wants it.
    Timer { node: usize, generation: u64 },
}

struct Scheduled {
    at: Instant,
    order: u64,
    item: Item,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl Eq for Scheduled {}

impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Scheduled {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// A min-heap of [`Item`]s by time, ties broken by insertion order.
#[derive(Default)]
pub(super) struct EventQueue {
    heap: BinaryHeap<Reverse<Scheduled>>,
    counter: u64,
}

impl EventQueue {
    /// Schedules `item` at `at`, after everything already scheduled at the same time.
    pub(super) fn push(&mut self, at: Instant, item: Item) {
        let order = self.counter;
        self.counter += 1;
        self.heap.push(Reverse(Scheduled { at, order, item }));
    }

    /// Takes the earliest item, unless the queue is empty or it is due after `limit`.
    pub(super) fn pop_due(&mut self, limit: Option<Instant>) -> Option<(Instant, Item)> {
        let Reverse(next) = self.heap.peek()?;
        if limit.is_some_and(|limit| next.at > limit) {
            return None;
        }
        let Reverse(next) = self.heap.pop()?;
        Some((next.at, next.item))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn equal_times_keep_insertion_order_and_limit_holds_back() {
        let t0 = Instant::now();
        let mut queue = EventQueue::default();
        for node in [3, 1, 2] {
            queue.push(
                t0 + Duration::from_millis(5),
                Item::Timer {
                    node,
                    generation: 0,
                },
            );
        }
        queue.push(
            t0,
            Item::Timer {
                node: 9,
                generation: 0,
            },
        );
        let order: Vec<usize> = std::iter::from_fn(|| queue.pop_due(Some(t0)))
            .map(|(_, item)| match item {
                Item::Timer { node, .. } | Item::Deliver { to: node, .. } => node,
            })
            .collect();
        assert_eq!(order, [9]);
        let order: Vec<usize> = std::iter::from_fn(|| queue.pop_due(None))
            .map(|(_, item)| match item {
                Item::Timer { node, .. } | Item::Deliver { to: node, .. } => node,
            })
            .collect();
        assert_eq!(order, [3, 1, 2]);
    }
}
