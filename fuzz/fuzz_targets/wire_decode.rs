//! Fuzzes the header + frame decoder: it must return a drop reason or a frame, never panic.
//! The first input byte selects whether the CRC is repaired, so that mutated bodies reach the
//! protobuf decoder instead of all failing the checksum.
#![no_main]

use bytes::Bytes;
use chorus_protocol::ClusterId;
use chorus_protocol::wire::{self, CRC_LEN, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

const CLUSTER: ClusterId = ClusterId(1);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut datagram = rest.to_vec();
    if mode & 1 == 1 && datagram.len() >= HEADER_LEN + CRC_LEN {
        // Make the header self-consistent: magic, version, cluster, lengths and CRC.
        datagram[..4].copy_from_slice(&wire::MAGIC);
        datagram[4] = wire::VERSION;
        datagram[6..10].fill(0);
        datagram[16..24].copy_from_slice(&CLUSTER.0.to_be_bytes());
        let body = (datagram.len() - HEADER_LEN - CRC_LEN) as u32;
        datagram[12..16].copy_from_slice(&body.to_be_bytes());
        let crc_at = datagram.len() - CRC_LEN;
        let crc = wire::crc32(&datagram[..crc_at]);
        datagram[crc_at..].copy_from_slice(&crc.to_be_bytes());
    }
    let datagram = Bytes::from(datagram);
    if let Ok((header, frame)) = wire::decode(&datagram, 65_507, CLUSTER) {
        // Whatever decodes must re-encode into something that decodes the same.
        let again = wire::encode(&header, &frame);
        let (h2, f2) = wire::decode(&again, usize::MAX, CLUSTER).expect("re-encoded frame decodes");
        assert_eq!((header, frame), (h2, f2));
    }
});

