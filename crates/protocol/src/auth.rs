//! Authenticated encryption of datagrams: cluster keys, sealing, opening, replay windows.
//!
//! A sealed datagram (key id ≠ 0) is XChaCha20-Poly1305 encrypted:
//!
//! ```text
//! offset size field
//!      0   40 fixed header (see `wire`), key id ≠ 0, tag length 16, body length n
//!     40    8 datagram counter, big-endian (≥ 1, grows by one per datagram sent)
//!     48    n ciphertext of the protobuf body
//!   48+n   16 Poly1305 tag
//!   64+n    4 CRC32 of bytes [0, 64+n)
//! ```
//!
//! The associated data is bytes `[0, 48)` (header and counter); the 24-byte nonce is
//! `node id ‖ incarnation ‖ counter` (all big-endian), so it never repeats under one key as long
//! as (node id, incarnation) is never reused: the counter grows by one per datagram within an
//! incarnation and cannot wrap (2^64 datagrams), and a new incarnation starts a new nonce space.
//! See `docs/security.md` for the full argument.
//!
//! Why XChaCha20-Poly1305: its 192-bit nonce holds the (node, incarnation, counter) triple
//! exactly, with no hashing and no birthday bound; it is pure Rust and constant-time on every
//! CPU (AES-GCM is only constant-time and fast with AES-NI, and its 96-bit nonce could not hold
//! the triple).

use std::fmt;
use std::num::NonZeroU16;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

use crate::wire::{DropReason, HEADER_LEN};

/// Length of the Poly1305 tag of a sealed datagram.
pub const TAG_LEN: usize = 16;
/// Length of the datagram counter that follows the fixed header of a sealed datagram.
pub const COUNTER_LEN: usize = 8;
/// Bytes a sealed datagram has beyond the plain one (counter + tag).
pub const SEAL_OVERHEAD: usize = COUNTER_LEN + TAG_LEN;
/// Length of a cluster key's secret.
pub const KEY_LEN: usize = 32;
/// Most keys a [`Keyring`] holds (the sending key and those accepted during a rotation).
pub const MAX_KEYS: usize = 4;
/// Counters a replay window remembers below the highest one seen.
pub const REPLAY_WINDOW: u64 = 1024;

/// Identifier of a cluster key, carried in every sealed datagram's header (never 0: key id 0
/// means "no key").
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct KeyId(pub NonZeroU16);

impl KeyId {
    /// The key id `id`, or `None` for 0.
    pub fn new(id: u16) -> Option<KeyId> {
        NonZeroU16::new(id).map(KeyId)
    }

    /// The raw value.
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One cluster key: an id and a 256-bit secret. `Debug` shows the id only.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    id: KeyId,
    secret: [u8; KEY_LEN],
}

impl Key {
    /// A key with this id and secret (which must come from a cryptographically secure RNG,
    /// e.g. `chorus keygen`).
    pub fn new(id: KeyId, secret: [u8; KEY_LEN]) -> Key {
        Key { id, secret }
    }

    /// Its id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Its secret.
    pub fn secret(&self) -> &[u8; KEY_LEN] {
        &self.secret
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why a [`Keyring`] could not be built or installed.
#[derive(Clone, Copy, PartialEq, Eq, Debug, thiserror::Error)]
pub enum KeyringError {
    /// No key was given.
    #[error("a keyring needs at least one key")]
    Empty,
    /// Two keys share an id.
    #[error("key id {0} appears twice")]
    DuplicateId(KeyId),
    /// More than [`MAX_KEYS`] keys.
    #[error("at most {MAX_KEYS} keys may be accepted at once")]
    TooMany,
    /// The sending key is not among the keys.
    #[error("the sending key {0} is not in the keyring")]
    UnknownSendKey(KeyId),
    /// [`Endpoint::set_keyring`](crate::Endpoint::set_keyring) on an endpoint started without
    /// a keyring: turning encryption on changes the datagram budget and needs a restart.
    #[error("this endpoint was started without a keyring; restart it with one")]
    NotKeyed,
}

/// The keys of a cluster: one to send with, and every key accepted on receipt (the sending key
/// included). During a rotation a node accepts the old and the new key.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Keyring {
    send: KeyId,
    keys: Vec<Key>,
}

impl Keyring {
    /// A keyring with a single key, used to send and accepted on receipt.
    pub fn single(key: Key) -> Keyring {
        Keyring {
            send: key.id,
            keys: vec![key],
        }
    }

    /// A keyring accepting `keys` and sending with the one whose id is `send`.
    ///
    /// # Errors
    ///
    /// [`KeyringError::Empty`], [`KeyringError::TooMany`], [`KeyringError::DuplicateId`] or
    /// [`KeyringError::UnknownSendKey`].
    pub fn new(send: KeyId, keys: Vec<Key>) -> Result<Keyring, KeyringError> {
        if keys.is_empty() {
            return Err(KeyringError::Empty);
        }
        if keys.len() > MAX_KEYS {
            return Err(KeyringError::TooMany);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(KeyringError::DuplicateId(key.id));
            }
        }
        if !keys.iter().any(|k| k.id == send) {
            return Err(KeyringError::UnknownSendKey(send));
        }
        Ok(Keyring { send, keys })
    }

    /// The id of the key datagrams are sealed with.
    pub fn send_id(&self) -> KeyId {
        self.send
    }

    /// The ids of every accepted key.
    pub fn accepted_ids(&self) -> Vec<KeyId> {
        self.keys.iter().map(|k| k.id).collect()
    }
}

/// Ready-to-use ciphers of a [`Keyring`].
pub(crate) struct Ciphers {
    send: (KeyId, XChaCha20Poly1305),
    accept: Vec<(KeyId, XChaCha20Poly1305)>,
}

impl fmt::Debug for Ciphers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ciphers")
            .field("send", &self.send.0)
            .field(
                "accept",
                &self.accept.iter().map(|a| a.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Ciphers {
    pub(crate) fn new(keyring: &Keyring) -> Ciphers {
        let accept: Vec<(KeyId, XChaCha20Poly1305)> = keyring
            .keys
            .iter()
            .map(|k| (k.id, XChaCha20Poly1305::new(&k.secret.into())))
            .collect();
        // `Keyring` guarantees the sending key is among its keys; the fallback is never taken.
        let send_cipher = keyring
            .keys
            .iter()
            .find(|k| k.id == keyring.send)
            .map(|k| XChaCha20Poly1305::new(&k.secret.into()))
            .unwrap_or_else(|| accept[0].1.clone());
        Ciphers {
            send: (keyring.send, send_cipher),
            accept,
        }
    }

    /// Turns a plain datagram (header, body, CRC, as built by `wire`) into a sealed one under
    /// the sending key with datagram counter `counter`. `None` only if `plain` is not a
    /// well-formed plain datagram (never for the encoders' output).
    pub(crate) fn seal(&self, plain: &[u8], counter: u64) -> Option<bytes::Bytes> {
        use bytes::BufMut;
        let body = plain.get(HEADER_LEN..plain.len().checked_sub(crate::wire::CRC_LEN)?)?;
        let mut buf = bytes::BytesMut::with_capacity(plain.len() + SEAL_OVERHEAD);
        buf.put_slice(&plain[..HEADER_LEN]);
        buf[6..8].copy_from_slice(&self.send.0.get().to_be_bytes());
        buf[8..10].copy_from_slice(&(TAG_LEN as u16).to_be_bytes());
        buf.put_u64(counter);
        buf.put_slice(body);
        let nonce = nonce(&buf, counter);
        let (aad, text) = buf.split_at_mut(HEADER_LEN + COUNTER_LEN);
        let tag = self
            .send
            .1
            .encrypt_in_place_detached(&nonce, aad, text)
            .ok()?;
        buf.put_slice(&tag);
        let crc = crc32fast::hash(&buf);
        buf.put_u32(crc);
        Some(buf.freeze())
    }

    /// Authenticates and decrypts a datagram that passed `wire::check` with a non-zero key id.
    /// Returns the plaintext body.
    ///
    /// # Errors
    ///
    /// [`DropReason::UnknownKey`] if the key id is not accepted, [`DropReason::AuthFailed`] if
    /// the tag does not verify (wrong key, tampered header, counter or body).
    pub(crate) fn open(
        &self,
        datagram: &[u8],
        key_id: u16,
        counter: u64,
    ) -> Result<bytes::Bytes, DropReason> {
        let cipher = self
            .accept
            .iter()
            .find(|(id, _)| id.get() == key_id)
            .map(|(_, c)| c)
            .ok_or(DropReason::UnknownKey)?;
        let start = HEADER_LEN + COUNTER_LEN;
        let tag_at = datagram
            .len()
            .checked_sub(crate::wire::CRC_LEN + TAG_LEN)
            .filter(|&at| at >= start)
            .ok_or(DropReason::Truncated)?;
        let mut text = bytes::BytesMut::from(&datagram[start..tag_at]);
        let nonce = nonce(datagram, counter);
        let tag = Tag::from_slice(&datagram[tag_at..tag_at + TAG_LEN]);
        cipher
            .decrypt_in_place_detached(&nonce, &datagram[..start], &mut text, tag)
            .map_err(|_| DropReason::AuthFailed)?;
        Ok(text.freeze())
    }
}

/// `node id ‖ incarnation ‖ counter`, taken from the header bytes [24, 40) and the counter.
fn nonce(header: &[u8], counter: u64) -> XNonce {
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(&header[24..40]);
    n[16..].copy_from_slice(&counter.to_be_bytes());
    XNonce::from(n)
}

/// The counters accepted from one (sender, incarnation): the highest, and a bitmap of the
/// [`REPLAY_WINDOW`] below it (RFC 6479 style). Older counters are refused.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ReplayWindow {
    top: u64,
    /// Bit `k` (word `k / 64`, bit `k % 64`) set ⇔ counter `top - k` was accepted.
    bits: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl ReplayWindow {
    /// The window of a stream first heard at `counter`: it and everything below count as
    /// seen, so datagrams captured before this receiver heard the sender cannot be replayed
    /// to it either (a datagram merely reordered across that first one is lost, and repaired
    /// like any loss).
    pub(crate) fn starting_at(counter: u64) -> ReplayWindow {
        ReplayWindow {
            top: counter,
            bits: [u64::MAX; (REPLAY_WINDOW / 64) as usize],
        }
    }

    /// Whether `counter` is new (not accepted before, not older than the window). Read-only.
    pub(crate) fn is_fresh(&self, counter: u64) -> bool {
        if counter == 0 {
            return false;
        }
        if counter > self.top {
            return true;
        }
        let k = self.top - counter;
        k < REPLAY_WINDOW && !self.bit(k)
    }

    /// Records `counter` as accepted (call after [`ReplayWindow::is_fresh`] and authentication).
    pub(crate) fn accept(&mut self, counter: u64) {
        if counter > self.top {
            self.shift(counter - self.top);
            self.top = counter;
        }
        let k = self.top - counter;
        if k < REPLAY_WINDOW {
            self.bits[(k / 64) as usize] |= 1 << (k % 64);
        }
    }

    fn bit(&self, k: u64) -> bool {
        self.bits[(k / 64) as usize] & (1 << (k % 64)) != 0
    }

    /// Moves every bit `k` to `k + by` (older), dropping those that leave the window.
    fn shift(&mut self, by: u64) {
        let words = self.bits.len();
        if by >= REPLAY_WINDOW {
            self.bits = [0; (REPLAY_WINDOW / 64) as usize];
            return;
        }
        let (w, b) = ((by / 64) as usize, (by % 64) as u32);
        for i in (0..words).rev() {
            let lo = i.checked_sub(w).map_or(0, |j| self.bits[j]);
            let carry = if b == 0 {
                0
            } else {
                i.checked_sub(w + 1).map_or(0, |j| self.bits[j] >> (64 - b))
            };
            self.bits[i] = (lo << b) | carry;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_accepts_each_counter_once() {
        let mut w = ReplayWindow::default();
        assert!(!w.is_fresh(0));
        for c in [5u64, 3, 4, 1, 70, 66, 2, 1000, 200] {
            assert!(w.is_fresh(c), "{c}");
            w.accept(c);
            assert!(!w.is_fresh(c), "{c} twice");
        }
        for c in [1u64, 2, 3, 4, 5, 66, 70, 200, 1000] {
            assert!(!w.is_fresh(c), "{c} replayed");
        }
        for c in [6u64, 65, 67, 199, 999] {
            assert!(w.is_fresh(c), "{c} never seen");
        }
        // Sliding: after 1000 + 1024, counter 1000 left the window, so anything at or below
        // the window's bottom is refused, seen or not.
        w.accept(2024);
        assert!(!w.is_fresh(1000));
        assert!(!w.is_fresh(999));
        assert!(w.is_fresh(1001));
        w.accept(1001);
        assert!(!w.is_fresh(1001));
        w.accept(1_000_000);
        assert!(!w.is_fresh(2024));
        assert!(w.is_fresh(999_999));
    }

    #[test]
    fn replay_window_matches_a_set_model() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut w = ReplayWindow::default();
        let mut seen = std::collections::BTreeSet::new();
        let mut top = 0u64;
        for _ in 0..20_000 {
            let c = if rng.random_bool(0.7) {
                top + rng.random_range(1..200)
            } else {
                top.saturating_sub(rng.random_range(0..1100)).max(1)
            };
            let fresh = c > top || (top - c < REPLAY_WINDOW && !seen.contains(&c));
            assert_eq!(w.is_fresh(c), fresh, "counter {c} top {top}");
            if fresh {
                w.accept(c);
                seen.insert(c);
                top = top.max(c);
            }
        }
    }

    #[test]
    fn a_window_started_at_a_counter_refuses_everything_below() {
        let mut w = ReplayWindow::starting_at(500);
        for c in [1u64, 10, 499, 500] {
            assert!(!w.is_fresh(c), "{c}");
        }
        assert!(w.is_fresh(501));
        w.accept(503);
        assert!(w.is_fresh(501) && w.is_fresh(502) && !w.is_fresh(500));
    }

    #[test]
    fn keyring_rules() {
        let k = |id: u16| Key::new(KeyId::new(id).unwrap(), [id as u8; KEY_LEN]);
        let id = |i: u16| KeyId::new(i).unwrap();
        assert_eq!(Keyring::new(id(1), vec![]), Err(KeyringError::Empty));
        assert_eq!(
            Keyring::new(id(1), vec![k(1), k(1)]),
            Err(KeyringError::DuplicateId(id(1)))
        );
        assert_eq!(
            Keyring::new(id(3), vec![k(1), k(2)]),
            Err(KeyringError::UnknownSendKey(id(3)))
        );
        assert_eq!(
            Keyring::new(id(1), (1..=5).map(k).collect()),
            Err(KeyringError::TooMany)
        );
        let ring = Keyring::new(id(2), vec![k(1), k(2)]).unwrap();
        assert_eq!(ring.send_id(), id(2));
        assert_eq!(ring.accepted_ids(), vec![id(1), id(2)]);
        assert!(!format!("{:?}", k(9)).contains("9, 9"));
        assert!(KeyId::new(0).is_none());
    }
}
