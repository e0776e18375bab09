//! Forged frames for hostile tests: datagrams a peer can put on the wire without following
//! the protocol, built from the public wire format.

use bytes::Bytes;
use chorus_protocol::proto::{self, frame::Kind};
use chorus_protocol::wire::{self, Header};

/// An empty heartbeat from `header`'s sender: nothing sent (`highest_sent` 0, `low_retained`
/// 1), nothing delivered, wall clock 0. Enough for a receiver to count the sender as a
/// candidate member.
#[must_use]
pub fn heartbeat(header: &Header) -> Bytes {
    let hb = proto::Heartbeat {
        highest_sent: 0,
        low_retained: 1,
        delivered: vec![],
        wall_ms: 0,
        name: Default::default(),
    };
    wire::encode(
        header,
        &proto::Frame {
            kind: Some(Kind::Heartbeat(hb)),
        },
    )
}
