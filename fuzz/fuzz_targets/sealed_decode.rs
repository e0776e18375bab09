//! Fuzzes the authenticated decoder (`wire::open`): it must return a drop reason or a frame,
//! never panic. Even first bytes feed arbitrary input straight in. Odd ones build a
//! self-consistent plain datagram from the rest, seal it, and (bit 1 of the first byte) flip
//! one byte anywhere before the CRC, repairing the CRC as an attacker can: a flipped datagram
//! must never open, an untouched one must open to exactly what the plain decoder makes of it.
#![no_main]

use bytes::Bytes;
use chorus_protocol::wire::{self, CRC_LEN, HEADER_LEN};
use chorus_protocol::{ClusterId, Key, KeyId, Keyring};
use libfuzzer_sys::fuzz_target;

const CLUSTER: ClusterId = ClusterId(1);

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some(id) = KeyId::new(1) else { return };
    let ring = Keyring::single(Key::new(id, [7; 32]));
    if mode & 1 == 0 || rest.len() < HEADER_LEN + CRC_LEN + 2 {
        let _ = wire::open(rest, 65_507, CLUSTER, &ring);
        return;
    }
    let (pick, rest) = rest.split_at(2);
    let mut plain = rest.to_vec();
    plain[..4].copy_from_slice(&wire::MAGIC);
    plain[4] = wire::VERSION;
    plain[6..10].fill(0);
    plain[16..24].copy_from_slice(&CLUSTER.0.to_be_bytes());
    let body = (plain.len() - HEADER_LEN - CRC_LEN) as u32;
    plain[12..16].copy_from_slice(&body.to_be_bytes());
    let crc_at = plain.len() - CRC_LEN;
    let crc = wire::crc32(&plain[..crc_at]);
    plain[crc_at..].copy_from_slice(&crc.to_be_bytes());
    let plain = Bytes::from(plain);
    let counter = u64::from(u16::from_be_bytes([pick[0], pick[1]])) + 1;
    let sealed = wire::seal(&plain, &ring, counter).expect("a plain datagram seals");
    let mut datagram = sealed.to_vec();
    let flipped = mode & 2 != 0;
    if flipped {
        let crc_at = datagram.len() - CRC_LEN;
        let at = usize::from(u16::from_be_bytes([pick[0], pick[1]])) % crc_at;
        datagram[at] ^= (mode >> 2) | 1;
        let crc = wire::crc32(&datagram[..crc_at]);
        datagram[crc_at..].copy_from_slice(&crc.to_be_bytes());
    }
    let opened = wire::open(&datagram, 65_507, CLUSTER, &ring);
    if flipped {
        assert!(opened.is_err(), "an altered sealed datagram opened");
    } else {
        let expected = wire::decode(&plain, 65_507, CLUSTER).map(|(_, f)| f);
        assert_eq!(opened.map(|(_, f)| f), expected);
    }
});
