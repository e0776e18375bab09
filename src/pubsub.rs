//! Messages that are not stored: [`Subscription`], the stream [`Node::subscribe`] returns,
//! what it yields ([`Delivery`], [`Message`]), and the table of a node's subscriptions that
//! the driver fans published messages out to.
//!
//! [`Node::subscribe`]: crate::Node::subscribe

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use chorus_protocol::NodeId;
use chorus_replication::{Publication, TopicFilter};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::Error;

/// Most items (messages and loss reports) a subscription holds for its reader; beyond it,
/// or beyond [`SUBSCRIPTION_QUEUE_BYTES`], new messages for it are skipped and the reader is
/// told how many ([`Error::Lagged`]).
pub const SUBSCRIPTION_QUEUE: usize = 1024;
/// Most payload bytes a subscription holds for its reader (see [`SUBSCRIPTION_QUEUE`]).
pub const SUBSCRIPTION_QUEUE_BYTES: usize = 16 << 20;
/// Most subscriptions one node holds at a time ([`Error::TooManySubscriptions`] beyond).
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// One published message, as a [`Subscription`] yields it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The node that published it (this node's own id for its own publications).
    pub from: NodeId,
    /// The topic it was published on.
    pub topic: String,
    /// Its bytes.
    pub payload: Bytes,
}

/// What a [`Subscription`] yields: a message, or the news that some of a sender's messages
/// will never arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Delivery {
    /// A message on a topic the subscription matches; per sender in the order it was
    /// published, exactly once.
    Message(Message),
    /// The network lost `count` messages of `from` for good (the sender no longer held them
    /// when this node asked for them again, or it left or restarted first). They were
    /// messages of every kind (writes, anti-entropy, publications on any topic), so `count`
    /// is an upper bound on the publications this subscription missed, which may be none.
    /// It comes at its place in `from`'s stream: the messages before it came before the
    /// loss, the ones after it after.
    Lost {
        /// Whose messages.
        from: NodeId,
        /// How many of them (of every kind).
        count: u64,
    },
}

/// What the driver puts in a subscription's queue.
#[derive(Debug)]
enum Item {
    Delivery(Delivery),
    /// The driver skipped this many deliveries for this subscription (its queue was full).
    Lagged(u64),
}

/// The messages published on the topics of one [`TopicFilter`], from the moment
/// [`Node::subscribe`](crate::Node::subscribe) returned: this node's own publications and
/// every peer's, per sender in the order they were published and exactly once, or with a
/// [`Delivery::Lost`] where the network lost some for good. No order across senders. Nothing
/// published before the subscription, or while this node was down, is ever delivered:
/// messages are not stored.
///
/// A [`Stream`] of `Result<Delivery, Error>` (cancel safe). A reader that falls behind by
/// more than [`SUBSCRIPTION_QUEUE`] items or [`SUBSCRIPTION_QUEUE_BYTES`] does not slow the
/// node down: the messages it has no room for are skipped, and it gets one
/// `Err(`[`Error::Lagged`]`)` saying how many, at the place they were skipped; the stream
/// goes on after it (as tokio's `BroadcastStream`). The stream ends (`None`) when the node
/// stops, after what was queued. Dropping it unsubscribes.
///
/// # Examples
///
/// ```
/// use futures_util::StreamExt;
/// use chorus::{Delivery, Node};
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
/// # let transport = hub.endpoint("10.0.0.1:7400".parse()?)?;
/// let node = Node::builder().start_with_transport(transport).await?;
/// let mut chat = node.subscribe("chat/*")?;
/// node.publish("chat/lobby", "hello").await?;
/// node.publish("news", "not for chat/*").await?;
/// node.publish("chat/dev", "hi").await?;
/// for expected in ["hello", "hi"] {
///     match chat.next().await.expect("running")? {
///         Delivery::Message(m) => assert_eq!((m.from, m.payload), (node.node_id(), expected.into())),
///         other => panic!("{other:?}"),
///     }
/// }
/// node.shutdown().await?;
/// assert!(chat.next().await.is_none());
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Subscription {
    filter: TopicFilter,
    rx: mpsc::Receiver<Item>,
    /// Payload bytes in `rx` (the driver adds, the reader subtracts).
    queued: Arc<AtomicUsize>,
}

impl Subscription {
    /// The filter this subscription follows.
    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }
}

impl Stream for Subscription {
    type Item = Result<Delivery, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        this.rx.poll_recv(cx).map(|item| {
            item.map(|item| match item {
                Item::Delivery(d) => {
                    if let Delivery::Message(m) = &d {
                        this.queued.fetch_sub(m.payload.len(), Ordering::Relaxed);
                    }
                    Ok(d)
                }
                Item::Lagged(skipped) => Err(Error::Lagged { skipped }),
            })
        })
    }
}

/// The driver's side of one subscription.
#[derive(Debug)]
struct Subscriber {
    filter: TopicFilter,
    tx: mpsc::Sender<Item>,
    queued: Arc<AtomicUsize>,
    /// Deliveries skipped since the last `Lagged` the reader was given.
    skipped: u64,
}

/// What became of one offer to a subscriber.
enum Offer {
    Queued,
    Skipped,
    Gone,
}

impl Subscriber {
    /// Queues `delivery` (`bytes` of payload) unless the queue is over its bounds; a lag is
    /// reported first, in its place.
    fn offer(&mut self, delivery: Delivery, bytes: usize) -> Offer {
        if self.tx.is_closed() {
            return Offer::Gone;
        }
        let queued = self.queued.load(Ordering::Relaxed);
        if queued > 0 && queued + bytes > SUBSCRIPTION_QUEUE_BYTES {
            self.skipped += 1;
            return Offer::Skipped;
        }
        if !self.report_lag() {
            self.skipped += 1;
            return Offer::Skipped;
        }
        match self.tx.try_send(Item::Delivery(delivery)) {
            Ok(()) => {
                self.queued.fetch_add(bytes, Ordering::Relaxed);
                Offer::Queued
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.skipped += 1;
                Offer::Skipped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Offer::Gone,
        }
    }

    /// Tells the reader how many deliveries were skipped, if any and if there is room;
    /// returns whether nothing skipped is left untold.
    fn report_lag(&mut self) -> bool {
        if self.skipped == 0 {
            return true;
        }
        if self.tx.try_send(Item::Lagged(self.skipped)).is_ok() {
            self.skipped = 0;
            return true;
        }
        false
    }
}

/// The counters of the fan-out to subscriptions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fanout {
    /// Messages queued for a subscription (one per subscription a message matched).
    pub(crate) delivered: u64,
    /// Messages of peers that matched no subscription of this node.
    pub(crate) no_subscriber: u64,
    /// Deliveries skipped because a subscription's queue was full.
    pub(crate) lagged: u64,
    /// Subscriptions open now.
    pub(crate) subscriptions: u64,
}

/// The subscriptions of one node (in [`Shared`](crate::driver::Shared), behind a mutex:
/// handles add to it, the driver fans out through it).
#[derive(Debug, Default)]
pub(crate) struct Subscriptions {
    subscribers: Vec<Subscriber>,
    /// The node stopped: no new subscription, and every stream has ended.
    closed: bool,
    /// Some subscriber has a lag to report.
    lagging: bool,
    stats: Fanout,
}

impl Subscriptions {
    /// A new subscription to `filter`.
    pub(crate) fn subscribe(&mut self, filter: TopicFilter) -> Result<Subscription, Error> {
        if self.closed {
            return Err(Error::Closed);
        }
        self.subscribers.retain(|s| !s.tx.is_closed());
        if self.subscribers.len() >= MAX_SUBSCRIPTIONS {
            return Err(Error::TooManySubscriptions {
                max: MAX_SUBSCRIPTIONS,
            });
        }
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        self.subscribers.push(Subscriber {
            filter: filter.clone(),
            tx,
            queued: queued.clone(),
            skipped: 0,
        });
        self.stats.subscriptions = self.subscribers.len() as u64;
        Ok(Subscription { filter, rx, queued })
    }

    /// Hands `publication` to every subscription whose filter matches its topic; `own`: it
    /// is this node's own.
    pub(crate) fn deliver(&mut self, publication: Publication, own: bool) {
        let Publication {
            from,
            topic,
            payload,
        } = publication;
        let bytes = payload.len();
        let message = Message {
            from: NodeId(from),
            topic,
            payload,
        };
        let mut matched = false;
        self.fan_out(|s| {
            let wanted = s.filter.matches(&message.topic);
            matched |= wanted;
            wanted.then(|| (Delivery::Message(message.clone()), bytes))
        });
        if !matched && !own {
            self.stats.no_subscriber += 1;
        }
    }

    /// Tells every subscription that `count` messages of `from` were lost.
    pub(crate) fn lost(&mut self, from: u64, count: u64) {
        let lost = Delivery::Lost {
            from: NodeId(from),
            count,
        };
        self.fan_out(|_| Some((lost.clone(), 0)));
    }

    /// Reports pending lags of readers that made room since.
    pub(crate) fn report_lags(&mut self) {
        if self.lagging {
            self.lagging = false;
            for s in &mut self.subscribers {
                self.lagging |= !s.report_lag();
            }
        }
    }

    /// Ends every subscription (after what is queued) and refuses new ones.
    pub(crate) fn close(&mut self) {
        self.closed = true;
        self.subscribers.clear();
        self.stats.subscriptions = 0;
    }

    pub(crate) fn stats(&self) -> Fanout {
        self.stats
    }

    /// Offers what `make` gives for each subscriber; forgets the ones whose reader is gone.
    fn fan_out(&mut self, mut make: impl FnMut(&Subscriber) -> Option<(Delivery, usize)>) {
        let mut gone = false;
        for s in &mut self.subscribers {
            let Some((delivery, bytes)) = make(s) else {
                continue;
            };
            match s.offer(delivery, bytes) {
                Offer::Queued => self.stats.delivered += 1,
                Offer::Skipped => {
                    self.stats.lagged += 1;
                    self.lagging = true;
                }
                Offer::Gone => gone = true,
            }
        }
        if gone {
            self.subscribers.retain(|s| !s.tx.is_closed());
            self.stats.subscriptions = self.subscribers.len() as u64;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn publication(from: u64, topic: &str, payload: &'static str) -> Publication {
        Publication {
            from,
            topic: topic.into(),
            payload: Bytes::from_static(payload.as_bytes()),
        }
    }

    #[tokio::test]
    async fn fan_out_filters_counts_and_reports_lag_in_place() {
        let mut subs = Subscriptions::default();
        let mut chat = subs
            .subscribe(TopicFilter::parse("chat/*").unwrap())
            .unwrap();
        let mut exact = subs.subscribe(TopicFilter::parse("jobs").unwrap()).unwrap();
        subs.deliver(publication(2, "chat/a", "1"), false);
        subs.deliver(publication(2, "jobs", "2"), false);
        subs.deliver(publication(2, "other", "3"), false);
        subs.deliver(publication(1, "mine", "4"), true);
        let stats = subs.stats();
        assert_eq!((stats.delivered, stats.no_subscriber), (2, 1));
        let first = chat.next().await.unwrap().unwrap();
        assert!(matches!(first, Delivery::Message(m) if m.payload == "1"));
        let first = exact.next().await.unwrap().unwrap();
        assert!(matches!(first, Delivery::Message(m) if m.topic == "jobs"));

        // Fill `chat` to the brim, then skip three: the lag comes after what was queued.
        for _ in 0..SUBSCRIPTION_QUEUE {
            subs.deliver(publication(2, "chat/a", "x"), false);
        }
        for _ in 0..3 {
            subs.deliver(publication(2, "chat/a", "skipped"), false);
        }
        assert_eq!(subs.stats().lagged, 3);
        for _ in 0..SUBSCRIPTION_QUEUE {
            assert!(matches!(chat.next().await, Some(Ok(Delivery::Message(_)))));
        }
        subs.report_lags();
        assert!(matches!(
            chat.next().await,
            Some(Err(Error::Lagged { skipped: 3 }))
        ));
        subs.lost(2, 5);
        assert_eq!(
            chat.next().await.unwrap().unwrap(),
            Delivery::Lost {
                from: NodeId(2),
                count: 5
            }
        );

        // A dropped subscription is forgotten; close ends the others.
        drop(exact);
        subs.deliver(publication(2, "jobs", "gone"), false);
        assert_eq!(subs.stats().subscriptions, 1);
        subs.close();
        assert!(chat.next().await.is_none());
        assert!(matches!(
            subs.subscribe(TopicFilter::parse("x").unwrap()),
            Err(Error::Closed)
        ));
    }

    #[tokio::test]
    async fn the_byte_budget_skips_too() {
        let mut subs = Subscriptions::default();
        let mut big = subs.subscribe(TopicFilter::parse("*").unwrap()).unwrap();
        let payload = Bytes::from(vec![0u8; SUBSCRIPTION_QUEUE_BYTES / 2 + 1]);
        for _ in 0..3 {
            subs.deliver(
                Publication {
                    from: 2,
                    topic: "t".into(),
                    payload: payload.clone(),
                },
                false,
            );
        }
        assert_eq!(subs.stats().lagged, 2);
        assert!(matches!(big.next().await, Some(Ok(Delivery::Message(_)))));
        subs.deliver(publication(2, "t", "small"), false);
        assert!(matches!(
            big.next().await,
            Some(Err(Error::Lagged { skipped: 2 }))
        ));
        assert!(matches!(big.next().await, Some(Ok(Delivery::Message(m))) if m.payload == "small"));
    }

    #[test]
    fn the_number_of_subscriptions_is_bounded() {
        let mut subs = Subscriptions::default();
        let filter = TopicFilter::parse("*").unwrap();
        let kept: Vec<Subscription> = (0..MAX_SUBSCRIPTIONS)
            .map(|_| subs.subscribe(filter.clone()).unwrap())
            .collect();
        assert!(matches!(
            subs.subscribe(filter.clone()),
            Err(Error::TooManySubscriptions { .. })
        ));
        drop(kept);
        assert!(subs.subscribe(filter).is_ok());
    }
}
