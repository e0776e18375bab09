//! The datagram format: fixed header, protobuf body, CRC32 (see `docs/protocol.md`).
//!
//! ```text
//! offset size field
//!      0    4 magic "CHRS" (0x43 0x48 0x52 0x53)
//!      4    1 version (1)
//!      5    1 flags (none defined in version 1; senders write 0, receivers ignore)
//!      6    2 key id, big-endian (0 = no key)
//!      8    2 authentication tag length, big-endian (0 in version 1)
//!     10    2 reserved (senders write 0, receivers ignore)
//!     12    4 body length, big-endian
//!     16    8 cluster id, big-endian
//!     24    8 sender node id, big-endian
//!     32    8 sender incarnation, big-endian
//!     40    n body: protobuf `chorus.v1.Frame`
//!   40+n    t authentication tag (t = tag length, 0 when key id = 0)
//! 40+n+t    4 CRC32 (IEEE, as zlib) of bytes [0, 40+n+t), big-endian
//! ```
//!
//! A datagram with a non-zero key id is *sealed* (see [`crate::auth`]): an 8-byte datagram
//! counter follows the fixed header, the body is encrypted and the tag is 16 bytes.
//!
//! [`decode`] checks, in this order: length limits, magic, version, declared lengths, CRC,
//! cluster, authentication fields, then the protobuf body. Every failure is a [`DropReason`].
//! [`open`] is the same for sealed datagrams, with authentication and decryption in place of
//! the authentication-field check.

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;
use prost::encoding::{encode_varint, encoded_len_varint};

use crate::auth::{COUNTER_LEN, Ciphers, Keyring, TAG_LEN};
use crate::proto;
use crate::{ClusterId, Incarnation, NodeId};

/// The four bytes every datagram starts with.
pub const MAGIC: [u8; 4] = *b"CHRS";
/// The only protocol version this implementation speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Size of the CRC trailer.
pub const CRC_LEN: usize = 4;
/// Header + CRC: the smallest possible datagram (with an empty body).
pub const OVERHEAD: usize = HEADER_LEN + CRC_LEN;
/// Smallest MTU an endpoint accepts in its configuration.
pub const MIN_MTU: usize = 256;
/// Largest UDP payload over IPv4.
pub const MAX_UDP_PAYLOAD: usize = 65_507;
/// Upper bound of the bytes a data datagram (batch or repaired batch) needs besides the
/// messages' own `1 + varint(len) + len`.
pub const DATA_OVERHEAD: usize = OVERHEAD + 40;
/// Upper bound of the bytes a fragment datagram (original or repair) needs besides its chunk.
pub const FRAGMENT_OVERHEAD: usize = OVERHEAD + 56;

/// Why a datagram was dropped by [`decode`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, thiserror::Error)]
pub enum DropReason {
    /// Shorter than header + CRC, or than the lengths its header declares.
    #[error("truncated")]
    Truncated,
    /// Longer than the receive limit.
    #[error("oversized")]
    Oversized,
    /// Does not start with [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// Another protocol version.
    #[error("wrong version")]
    WrongVersion,
    /// The CRC does not match.
    #[error("bad checksum")]
    BadChecksum,
    /// Another cluster.
    #[error("wrong cluster")]
    WrongCluster,
    /// Carries a key id or authentication tag while this endpoint has no key, or carries none
    /// while it has one.
    #[error("unauthenticated")]
    Unauthenticated,
    /// Sealed with a key id this endpoint does not accept.
    #[error("unknown key")]
    UnknownKey,
    /// The authentication tag does not verify: another key with the same id, or a tampered
    /// header, counter or body.
    #[error("authentication failed")]
    AuthFailed,
    /// A sealed datagram whose counter was already accepted from this (sender, incarnation),
    /// or is older than the replay window.
    #[error("replayed")]
    Replayed,
    /// The body is not a valid frame, or has bytes after its declared end.
    #[error("malformed")]
    Malformed,
    /// The body holds no frame kind this version knows.
    #[error("unknown frame")]
    UnknownFrame,
}

/// The decoded fixed header.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Header {
    /// Flags byte (no flag is defined in version 1).
    pub flags: u8,
    /// Key id (0 = none).
    pub key_id: u16,
    /// Cluster id.
    pub cluster: ClusterId,
    /// Sender node id.
    pub node: NodeId,
    /// Sender incarnation.
    pub incarnation: Incarnation,
    /// Datagram counter of a sealed datagram (0 when `key_id` is 0). Written by sealing, not
    /// by the plain encoders.
    pub counter: u64,
}

impl Header {
    /// A version-1 header with no flags and no key.
    pub fn new(cluster: ClusterId, node: NodeId, incarnation: Incarnation) -> Header {
        Header {
            flags: 0,
            key_id: 0,
            cluster,
            node,
            incarnation,
            counter: 0,
        }
    }
}

/// Checks and decodes one datagram.
///
/// `max_len` is the receive limit; `cluster` the only cluster accepted. The body is decoded
/// without copying: `bytes` fields of the returned frame share `datagram`'s buffer.
///
/// # Errors
///
/// The first failed check, as a [`DropReason`]. Never panics, whatever the input.
pub fn decode(
    datagram: &Bytes,
    max_len: usize,
    cluster: ClusterId,
) -> Result<(Header, proto::Frame), DropReason> {
    let header = check(datagram, max_len, cluster)?;
    if header.key_id != 0 {
        return Err(DropReason::Unauthenticated);
    }
    Ok((header, decode_checked(datagram)?))
}

/// The authenticated decoder: checks, authenticates and decrypts one sealed datagram with any
/// key of `keyring`, then decodes its body. Plain datagrams are refused.
///
/// Replay protection needs per-sender memory and is the endpoint's job; this function checks
/// one datagram on its own.
///
/// # Errors
///
/// The first failed check as a [`DropReason`]: those of [`check`], then
/// [`DropReason::Unauthenticated`] for a plain datagram, [`DropReason::UnknownKey`],
/// [`DropReason::AuthFailed`], then the body's. Never panics, whatever the input.
pub fn open(
    datagram: &[u8],
    max_len: usize,
    cluster: ClusterId,
    keyring: &Keyring,
) -> Result<(Header, proto::Frame), DropReason> {
    let header = check(datagram, max_len, cluster)?;
    if header.key_id == 0 {
        return Err(DropReason::Unauthenticated);
    }
    let body = Ciphers::new(keyring).open(datagram, header.key_id, header.counter)?;
    Ok((header, decode_body(body)?))
}

/// Seals a plain datagram (as built by [`encode`], [`encode_data`] or [`encode_fragment`])
/// with `keyring`'s sending key and datagram counter `counter`, as an endpoint with that
/// keyring does before sending. For tests, tools and fuzzing; an endpoint keeps its own
/// counter, which must never repeat under one key for one (node, incarnation).
///
/// Returns `None` if `plain` is not a plain datagram (shorter than header + CRC, or sealed).
pub fn seal(plain: &[u8], keyring: &Keyring, counter: u64) -> Option<Bytes> {
    if plain.len() < OVERHEAD || be_u16(plain, 6) != 0 || be_u16(plain, 8) != 0 {
        return None;
    }
    Ciphers::new(keyring).seal(plain, counter)
}

/// Decodes the body of a plain datagram that already passed [`check`].
pub(crate) fn decode_checked(datagram: &Bytes) -> Result<proto::Frame, DropReason> {
    let body_len = be_u32(datagram, 12) as usize;
    decode_body(datagram.slice(HEADER_LEN..HEADER_LEN + body_len))
}

/// Decodes a (plaintext) body.
pub(crate) fn decode_body(body: Bytes) -> Result<proto::Frame, DropReason> {
    let frame = proto::Frame::decode(body).map_err(|_| DropReason::Malformed)?;
    if frame.kind.is_none() {
        return Err(DropReason::UnknownFrame);
    }
    Ok(frame)
}

/// Checks everything but the body and the authentication tag: lengths, magic, version, CRC,
/// cluster, and that a sealed datagram (key id ≠ 0) has a 16-byte tag and a plain one none.
/// Says nothing about authenticity.
///
/// # Errors
///
/// The first failed check, in the documented order.
pub fn check(datagram: &[u8], max_len: usize, cluster: ClusterId) -> Result<Header, DropReason> {
    let len = datagram.len();
    if len < OVERHEAD {
        return Err(DropReason::Truncated);
    }
    if len > max_len {
        return Err(DropReason::Oversized);
    }
    if datagram[..4] != MAGIC {
        return Err(DropReason::BadMagic);
    }
    if datagram[4] != VERSION {
        return Err(DropReason::WrongVersion);
    }
    let key_id = be_u16(datagram, 6);
    let tag_len = usize::from(be_u16(datagram, 8));
    let body_len = be_u32(datagram, 12) as usize;
    let counter_len = if key_id != 0 { COUNTER_LEN } else { 0 };
    let declared = OVERHEAD + counter_len + body_len + tag_len;
    if declared > len {
        return Err(DropReason::Truncated);
    }
    if declared < len {
        return Err(DropReason::Malformed);
    }
    let crc_at = len - CRC_LEN;
    if crc32fast::hash(&datagram[..crc_at]) != be_u32(datagram, crc_at) {
        return Err(DropReason::BadChecksum);
    }
    let header = Header {
        flags: datagram[5],
        key_id,
        cluster: ClusterId(be_u64(datagram, 16)),
        node: NodeId(be_u64(datagram, 24)),
        incarnation: Incarnation(be_u64(datagram, 32)),
        counter: if key_id != 0 {
            be_u64(datagram, HEADER_LEN)
        } else {
            0
        },
    };
    if header.cluster != cluster {
        return Err(DropReason::WrongCluster);
    }
    let expected_tag = if key_id != 0 { TAG_LEN } else { 0 };
    if tag_len != expected_tag {
        return Err(DropReason::Unauthenticated);
    }
    Ok(header)
}

/// Encodes a datagram around any frame (used for control frames; data uses the writers below).
pub fn encode(header: &Header, frame: &proto::Frame) -> Bytes {
    let mut writer = Writer::new(header, frame.encoded_len());
    // Encoding into a growable BytesMut cannot run out of space.
    let _ = frame.encode(&mut writer.buf);
    writer.finish()
}

/// Encodes a batch of whole messages `first_seq, first_seq + 1, ...` as a `Data` frame, or as a
/// `Repair` frame around it when `repair_low` is given (the hot path: no intermediate structs,
/// byte-identical to [`encode`] of the equivalent frame).
pub fn encode_data<'a, I>(
    header: &Header,
    first_seq: u64,
    messages: I,
    repair_low: Option<u64>,
) -> Bytes
where
    I: Iterator<Item = &'a Bytes> + Clone,
{
    let data_len = varint_field_len(first_seq)
        + messages
            .clone()
            .map(|m| bytes_field_len(m.len()))
            .sum::<usize>();
    let mut writer = Writer::new(header, data_len + 40);
    let buf = &mut writer.buf;
    match repair_low {
        Some(low) => {
            let repair_len =
                varint_field_len(low) + 1 + encoded_len_varint(data_len as u64) + data_len;
            put_key(buf, 5, LEN);
            encode_varint(repair_len as u64, buf);
            put_varint_field(buf, 1, low);
            put_key(buf, 2, LEN);
        }
        None => put_key(buf, 1, LEN),
    }
    encode_varint(data_len as u64, buf);
    put_varint_field(buf, 1, first_seq);
    for message in messages {
        put_key(buf, 2, LEN);
        encode_varint(message.len() as u64, buf);
        buf.put_slice(message);
    }
    writer.finish()
}

/// Encodes one fragment as a `Fragment` frame, or as a `Repair` frame around it when
/// `repair_low` is given (byte-identical to [`encode`] of the equivalent frame).
pub fn encode_fragment(
    header: &Header,
    seq: u64,
    total_len: u32,
    offset: u32,
    chunk: &[u8],
    repair_low: Option<u64>,
) -> Bytes {
    let frag_len = varint_field_len(seq)
        + varint_field_len(u64::from(total_len))
        + varint_field_len(u64::from(offset))
        + bytes_field_len(chunk.len());
    let mut writer = Writer::new(header, frag_len + 40);
    let buf = &mut writer.buf;
    match repair_low {
        Some(low) => {
            let repair_len =
                varint_field_len(low) + 1 + encoded_len_varint(frag_len as u64) + frag_len;
            put_key(buf, 5, LEN);
            encode_varint(repair_len as u64, buf);
            put_varint_field(buf, 1, low);
            put_key(buf, 3, LEN);
        }
        None => put_key(buf, 2, LEN),
    }
    encode_varint(frag_len as u64, buf);
    put_varint_field(buf, 1, seq);
    put_varint_field(buf, 2, u64::from(total_len));
    put_varint_field(buf, 3, u64::from(offset));
    put_key(buf, 4, LEN);
    encode_varint(chunk.len() as u64, buf);
    buf.put_slice(chunk);
    writer.finish()
}

/// The checksum of the wire format: CRC32 (IEEE 802.3 polynomial, reflected, as zlib).
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Bytes one message adds to a `Data` frame.
pub(crate) fn message_cost(len: usize) -> usize {
    bytes_field_len(len)
}

const LEN: u8 = 2;

struct Writer {
    buf: BytesMut,
}

impl Writer {
    fn new(header: &Header, body_hint: usize) -> Writer {
        let mut buf = BytesMut::with_capacity(OVERHEAD + body_hint);
        buf.put_slice(&MAGIC);
        buf.put_u8(VERSION);
        buf.put_u8(header.flags);
        buf.put_u16(0); // key id: the encoders build plain datagrams; sealing sets it
        buf.put_u16(0); // authentication tag length
        buf.put_u16(0); // reserved
        buf.put_u32(0); // body length, patched in finish()
        buf.put_u64(header.cluster.0);
        buf.put_u64(header.node.0);
        buf.put_u64(header.incarnation.0);
        Writer { buf }
    }

    fn finish(mut self) -> Bytes {
        let body_len = (self.buf.len() - HEADER_LEN) as u32;
        self.buf[12..16].copy_from_slice(&body_len.to_be_bytes());
        let crc = crc32fast::hash(&self.buf);
        self.buf.put_u32(crc);
        self.buf.freeze()
    }
}

fn put_key(buf: &mut BytesMut, field: u8, wire_type: u8) {
    buf.put_u8((field << 3) | wire_type);
}

fn put_varint_field(buf: &mut BytesMut, field: u8, value: u64) {
    if value != 0 {
        put_key(buf, field, 0);
        encode_varint(value, buf);
    }
}

fn varint_field_len(value: u64) -> usize {
    if value == 0 {
        0
    } else {
        1 + encoded_len_varint(value)
    }
}

fn bytes_field_len(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header::new(ClusterId(7), NodeId(1), Incarnation(2))
    }

    #[test]
    fn hand_encoded_data_matches_prost() {
        let msgs = [
            Bytes::from_static(b"a"),
            Bytes::from_static(b""),
            Bytes::from(vec![9u8; 300]),
        ];
        let got = encode_data(&header(), 5, msgs.iter(), None);
        let frame = proto::Frame {
            kind: Some(proto::frame::Kind::Data(proto::Data {
                first_seq: 5,
                messages: msgs.to_vec(),
            })),
        };
        assert_eq!(got, encode(&header(), &frame));
        let (h, decoded) = decode(&got, 65_507, ClusterId(7)).unwrap();
        assert_eq!(h, header());
        assert_eq!(decoded, frame);
    }

    #[test]
    fn hand_encoded_repair_fragment_matches_prost() {
        let got = encode_fragment(&header(), 9, 5000, 1300, b"xyz", Some(3));
        let frame = proto::Frame {
            kind: Some(proto::frame::Kind::Repair(proto::Repair {
                low_retained: 3,
                payload: Some(proto::repair::Payload::Fragment(proto::Fragment {
                    seq: 9,
                    total_len: 5000,
                    offset: 1300,
                    chunk: Bytes::from_static(b"xyz"),
                })),
            })),
        };
        assert_eq!(got, encode(&header(), &frame));
        let got = encode_data(&header(), 4, [Bytes::from_static(b"q")].iter(), Some(2));
        let frame = proto::Frame {
            kind: Some(proto::frame::Kind::Repair(proto::Repair {
                low_retained: 2,
                payload: Some(proto::repair::Payload::Data(proto::Data {
                    first_seq: 4,
                    messages: vec![Bytes::from_static(b"q")],
                })),
            })),
        };
        assert_eq!(got, encode(&header(), &frame));
    }

    #[test]
    fn overheads_are_upper_bounds() {
        let big = u64::MAX;
        let h = Header::new(ClusterId(big), NodeId(big), Incarnation(big));
        let chunk = vec![0u8; 65_000];
        let d = encode_fragment(&h, big, u32::MAX, u32::MAX, &chunk, Some(big));
        assert!(d.len() <= FRAGMENT_OVERHEAD + chunk.len(), "{}", d.len());
        let msg = Bytes::from(chunk);
        let d = encode_data(&h, big, [msg.clone()].iter(), Some(big));
        assert!(
            d.len() <= DATA_OVERHEAD + message_cost(msg.len()),
            "{}",
            d.len()
        );
    }

    #[test]
    fn every_check_has_its_reason() {
        let good = encode_data(&header(), 1, [Bytes::from_static(b"hi")].iter(), None);
        let max = 65_507;
        let c = ClusterId(7);
        assert!(decode(&good, max, c).is_ok());
        assert_eq!(
            decode(&good.slice(..10), max, c).unwrap_err(),
            DropReason::Truncated
        );
        assert_eq!(
            decode(&good.slice(..good.len() - 1), max, c).unwrap_err(),
            DropReason::Truncated
        );
        assert_eq!(
            decode(&good, good.len() - 1, c).unwrap_err(),
            DropReason::Oversized
        );
        let mutate = |at: usize, v: u8| {
            let mut m = good.to_vec();
            m[at] = v;
            Bytes::from(m)
        };
        assert_eq!(
            decode(&mutate(0, b'X'), max, c).unwrap_err(),
            DropReason::BadMagic
        );
        assert_eq!(
            decode(&mutate(4, 2), max, c).unwrap_err(),
            DropReason::WrongVersion
        );
        assert_eq!(
            decode(&mutate(HEADER_LEN + 2, 0xFF), max, c).unwrap_err(),
            DropReason::BadChecksum
        );
        assert_eq!(
            decode(&good, max, ClusterId(8)).unwrap_err(),
            DropReason::WrongCluster
        );
        let mut longer = good.to_vec();
        longer.push(0);
        assert_eq!(
            decode(&Bytes::from(longer), max, c).unwrap_err(),
            DropReason::Malformed
        );
        // Valid CRC around an invalid body.
        let mut w = Writer::new(&header(), 4);
        w.buf.put_slice(&[0x0A, 0x05, 0x08]);
        assert_eq!(
            decode(&w.finish(), max, c).unwrap_err(),
            DropReason::Malformed
        );
        // Valid CRC around a frame kind from the future (field 20).
        let mut w = Writer::new(&header(), 4);
        w.buf.put_slice(&[0xA2, 0x01, 0x00]);
        assert_eq!(
            decode(&w.finish(), max, c).unwrap_err(),
            DropReason::UnknownFrame
        );
        // Sealed: the plain decoder refuses it, the authenticated one opens it.
        let key = crate::Key::new(crate::KeyId::new(3).unwrap(), [9; 32]);
        let ring = Keyring::single(key);
        let sealed = Ciphers::new(&ring).seal(&good, 1).unwrap();
        assert_eq!(
            decode(&sealed, max, c).unwrap_err(),
            DropReason::Unauthenticated
        );
        assert_eq!(
            open(&sealed, max, c, &ring).unwrap().1,
            decode(&good, max, c).unwrap().1
        );
        assert_eq!(
            open(&good, max, c, &ring).unwrap_err(),
            DropReason::Unauthenticated
        );
        // A tag length that does not match the key id.
        let mut m = good.to_vec();
        m[9] = 0; // tag length stays 0 ...
        m[6..8].copy_from_slice(&0u16.to_be_bytes());
        let mut t = m[..m.len() - 4].to_vec();
        t[8..10].copy_from_slice(&1u16.to_be_bytes());
        t.push(0); // ... now 1 byte of tag on a plain datagram
        let crc = crc32(&t);
        t.extend_from_slice(&crc.to_be_bytes());
        assert_eq!(
            decode(&Bytes::from(t), max, c).unwrap_err(),
            DropReason::Unauthenticated
        );
    }
}
