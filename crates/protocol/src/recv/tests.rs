//! Tests of one receive stream: gaps and NAK lists, memory charges, sequence bounds.

use super::budget::ENTRY_OVERHEAD;
use super::*;

fn out_parts() -> (VecDeque<Event>, Stats, Budget) {
    (VecDeque::new(), Stats::default(), Budget::new(1 << 20))
}

#[test]
fn missing_lists_gaps_between_buffered() {
    let (mut ev, mut st, mut b) = out_parts();
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut b,
        delivered: (0, 0),
        shared: 0,
    };
    let mut s = RecvStream::new(NodeId(1), Incarnation(1));
    for seq in [1, 4, 5, 8] {
        s.on_message(seq, Bytes::from_static(b"x"), &mut out);
    }
    s.on_highest_sent(10);
    let m = s.missing(0, usize::MAX);
    let ranges: Vec<(u64, u64)> = m.ranges.iter().map(|r| (r.first, r.last)).collect();
    assert_eq!(ranges, vec![(2, 3), (6, 7), (9, 10)]);
    assert_eq!(out.budget.used(), 3 * (1 + ENTRY_OVERHEAD));
    s.advance_to(7, &mut out);
    // 2-3 lost, 4 and 5 delivered, 6 lost; 7 still missing.
    assert_eq!(s.next_expected, 7);
    assert_eq!(out.budget.used(), 1 + ENTRY_OVERHEAD);
    assert_eq!(st.lost_messages, 3);
}

#[test]
fn partial_missing_respects_in_flight_tail() {
    let (mut ev, mut st, mut b) = out_parts();
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut b,
        delivered: (0, 0),
        shared: 0,
    };
    let mut s = RecvStream::new(NodeId(1), Incarnation(1));
    let frag = |offset: u32| proto::Fragment {
        seq: 3,
        total_len: 100,
        offset,
        chunk: Bytes::from(vec![1u8; 10]),
    };
    s.on_fragment(&frag(0), &mut out).unwrap();
    s.on_fragment(&frag(20), &mut out).unwrap();
    // Only bytes 10..20 are known missing while the message is still in flight.
    let m = s.missing(0, usize::MAX);
    assert!(m.ranges.is_empty());
    assert_eq!(
        m.partial[0].missing,
        vec![proto::ByteRange {
            offset: 10,
            len: 10
        }]
    );
    s.on_highest_sent(3);
    let m = s.missing(0, usize::MAX);
    assert_eq!(
        m.partial[0].missing,
        vec![
            proto::ByteRange {
                offset: 10,
                len: 10
            },
            proto::ByteRange {
                offset: 30,
                len: 70
            }
        ]
    );
    assert_eq!(
        s.on_fragment(
            &proto::Fragment {
                total_len: 99,
                ..frag(40)
            },
            &mut out
        ),
        Err(DropReason::Malformed)
    );
}

fn frag(seq: u64, total_len: u32, offset: u32, chunk: &[u8]) -> proto::Fragment {
    proto::Fragment {
        seq,
        total_len,
        offset,
        chunk: Bytes::copy_from_slice(chunk),
    }
}

#[test]
fn reassembly_memory_follows_bytes_received_not_declared_length() {
    let (mut ev, mut st, mut b) = out_parts();
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut b,
        delivered: (0, 0),
        shared: 1300,
    };
    let mut s = RecvStream::new(NodeId(1), Incarnation(1));
    // One 1200-byte chunk near the end of a message declared 1 MiB long.
    let total = 1 << 20;
    s.on_fragment(&frag(1, total, total - 1200, &[7; 1200]), &mut out)
        .unwrap();
    let charged = REASSEMBLY_OVERHEAD + 1300 + ENTRY_OVERHEAD;
    assert_eq!((out.budget.used(), s.held_bytes()), (charged, charged));
    let r = &s.partial[&1];
    assert_eq!(r.received, 1200);
    assert!(r.chunks.values().all(|c| c.payload.len() == 1200));
    // A budget with no room for it refuses the first chunk of another message.
    let mut small = Budget::new(charged + 100);
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut small,
        delivered: (0, 0),
        shared: 1300,
    };
    let mut s = RecvStream::new(NodeId(2), Incarnation(1));
    s.on_fragment(&frag(1, total, 0, &[7; 1200]), &mut out)
        .unwrap();
    s.on_fragment(&frag(2, total, 0, &[7; 1200]), &mut out)
        .unwrap();
    assert_eq!(out.stats.buffer_full, 1);
    assert_eq!(out.budget.used(), charged);
}

#[test]
fn held_payloads_pay_for_what_they_pin() {
    let (mut ev, mut st, mut b) = out_parts();
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut b,
        delivered: (0, 0),
        shared: 1000,
    };
    let mut s = RecvStream::new(NodeId(1), Incarnation(1));
    s.on_message(1, Bytes::from_static(b"a"), &mut out);
    // Out of order: held. A 1-byte slice of a 1000-byte body is copied out; an empty
    // message is not free; a 600-byte one keeps sharing its body and pays for all of it.
    let body = Bytes::from(vec![9u8; 1000]);
    s.on_message(3, body.slice(10..11), &mut out);
    s.on_message(4, Bytes::new(), &mut out);
    s.on_message(5, body.slice(0..600), &mut out);
    let expect = (1 + ENTRY_OVERHEAD) + ENTRY_OVERHEAD + (1000 + ENTRY_OVERHEAD);
    assert_eq!(out.budget.used(), expect);
    assert_eq!(s.held_bytes(), expect);
    let copied = &s.buffered[&3].payload;
    assert!(!std::ptr::eq(copied.as_ptr(), body[10..].as_ptr()));
    s.on_message(2, Bytes::from_static(b"b"), &mut out);
    assert_eq!(out.budget.used(), 0);
    assert_eq!(s.next_expected, 6);
}

#[test]
fn sequence_numbers_stop_short_of_u64_max() {
    let (mut ev, mut st, mut b) = out_parts();
    let mut out = Out {
        events: &mut ev,
        stats: &mut st,
        budget: &mut b,
        delivered: (0, 0),
        shared: 0,
    };
    let mut s = RecvStream::new(NodeId(1), Incarnation(1));
    s.start_at(MAX_SEQ);
    assert_eq!(
        s.on_fragment(&frag(u64::MAX, 1, 0, b"x"), &mut out),
        Err(DropReason::Malformed)
    );
    s.on_fragment(&frag(MAX_SEQ, 1, 0, b"x"), &mut out).unwrap();
    assert_eq!(s.next_expected, u64::MAX);
    // Nothing can follow, and nothing is missing.
    s.on_highest_sent(u64::MAX);
    assert!(!s.has_gap());
    s.on_message(MAX_SEQ, Bytes::from_static(b"y"), &mut out);
    s.advance_to(u64::MAX, &mut out);
    s.finish(&mut out);
    assert_eq!(out.stats.messages_delivered, 1);
    assert_eq!(out.stats.duplicates, 1);
}
