//! Transmitting: the order datagrams leave in (control first, then repairs and data as the
//! rate allows, then the goodbye), when the next one is due, and sealing on the way out.

use std::time::Instant;

use crate::proto::{self, frame::Kind};
use crate::send::{Batching, Sent};
use crate::wire;
use crate::{Destination, Transmit};

use super::{Endpoint, Lifecycle};

impl Endpoint {
    /// The next datagram due, if any (see [`Endpoint::poll_transmit`]).
    pub(super) fn next_transmit(&mut self) -> Option<Transmit> {
        if self.lifecycle == Lifecycle::Closed {
            return None;
        }
        if let Some(t) = self.control.pop_front() {
            return self.emit(t);
        }
        let now = self.now;
        let data_due = self
            .window
            .data_due(now, self.cfg.batch_delay, self.batching());
        if self.window.has_repairs() || data_due {
            if !self.bucket.ready(now) {
                self.stats.rate_limited += 1;
                return None;
            }
            if let Some(datagram) = self.window.build_repair(now) {
                self.stats.repairs_sent += 1;
                self.bucket.consume(datagram.len());
                return self.emit(Transmit {
                    destination: Destination::Group,
                    payload: datagram,
                });
            }
            if data_due && let Some((datagram, sent)) = self.window.build_data(now) {
                self.stats.data_datagrams_sent += 1;
                match sent {
                    Sent::Batch { messages } if messages > 1 => self.stats.batches_sent += 1,
                    Sent::Batch { .. } => {}
                    Sent::Fragment => self.stats.fragments_sent += 1,
                }
                self.bucket.consume(datagram.len());
                return self.emit(Transmit {
                    destination: Destination::Group,
                    payload: datagram,
                });
            }
        }
        if self.lifecycle == Lifecycle::Closing
            && self.window.highest_sent() + 1 == self.window.next_seq()
        {
            self.lifecycle = Lifecycle::Closed;
            self.window.clear_repairs();
            self.stats.goodbyes_sent += 1;
            let frame = Kind::Goodbye(proto::Goodbye {
                highest_sent: self.window.highest_sent(),
            });
            let payload = wire::encode(&self.header, &proto::Frame { kind: Some(frame) });
            return self.emit(Transmit {
                destination: Destination::Group,
                payload,
            });
        }
        None
    }

    /// Every datagram leaves through here: sealed when keyed, then counted.
    pub(super) fn emit(&mut self, mut t: Transmit) -> Option<Transmit> {
        if let Some(ciphers) = &self.ciphers {
            let sealed = match self.next_counter.checked_add(1) {
                Some(next) => ciphers
                    .seal(&t.payload, self.next_counter)
                    .map(|d| (d, next)),
                None => None,
            };
            let Some((payload, next)) = sealed else {
                self.stats.seal_failed += 1;
                return None;
            };
            self.next_counter = next;
            t.payload = payload;
        }
        self.stats.datagrams_sent += 1;
        self.stats.bytes_sent += t.payload.len() as u64;
        Some(t)
    }

    /// Whether queued data waits for company ([`Batching::Wait`]) or goes at once because the
    /// endpoint is closing ([`Batching::Flush`]).
    pub(super) fn batching(&self) -> Batching {
        match self.lifecycle {
            Lifecycle::Open => Batching::Wait,
            Lifecycle::Closing | Lifecycle::Closed => Batching::Flush,
        }
    }

    /// When [`Endpoint::poll_transmit`] next has something to send: queued control datagrams
    /// at once; while closing, as soon as the rate allows; repairs and due data when the rate
    /// allows.
    pub(super) fn transmit_deadline(&self) -> Option<Instant> {
        let mut earliest = None;
        let mut consider = |t: Instant| {
            earliest = Some(earliest.map_or(t, |e: Instant| e.min(t)));
        };
        if !self.control.is_empty() {
            consider(self.now);
        }
        if self.lifecycle == Lifecycle::Closing {
            // Flushing for the goodbye: due as soon as the rate allows.
            consider(self.bucket.ready_at().unwrap_or(self.now));
        }
        let data = self
            .window
            .data_deadline(self.cfg.batch_delay, self.batching());
        let paced = if self.window.has_repairs() {
            Some(self.now)
        } else {
            data
        };
        if let Some(at) = paced {
            consider(self.bucket.ready_at().map_or(at, |r| r.max(at)));
        }
        earliest
    }
}
