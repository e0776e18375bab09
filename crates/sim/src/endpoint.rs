//! [`Machine`] for the protocol endpoint, so the simulator drives the real `chorus_protocol`.

use std::net::SocketAddr;
use std::time::Instant;

use chorus_protocol::{Endpoint, Transmit};

use crate::Machine;

impl Machine for Endpoint {
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) {
        Endpoint::handle_datagram(self, now, from, datagram);
    }

    fn handle_timeout(&mut self, now: Instant) {
        Endpoint::handle_timeout(self, now);
    }

    fn poll_transmit(&mut self, now: Instant) -> Option<Transmit> {
        Endpoint::poll_transmit(self, now)
    }

    fn poll_timeout(&self) -> Option<Instant> {
        Endpoint::poll_timeout(self)
    }
}
