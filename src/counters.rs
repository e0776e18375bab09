//! [`Counters`]: every counter of a node, typed, with the flat names exporters use.

use chorus_protocol::Stats as ProtocolStats;
use chorus_replication::{DurableStats, NodeStats, PubsubStats, ReplicaStats};

use crate::pubsub::Fanout;

/// Every counter of one node, as of the driver's last snapshot (refreshed every 100 ms).
///
/// Read a field for one figure, or [`iter`](Counters::iter) for all of them under their flat,
/// stable snake_case names (`protocol_naks_sent`, `replication_local_writes`,
/// `store_keys`, …): the names the agent's `/metrics` and `/v1/stats` publish. A name is the
/// layer's prefix (`protocol_`, `replication_`, `core_`, `durable_`, `driver_`, `store_`,
/// `pubsub_`)
/// followed by the field's name.
///
/// # Examples
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let hub = chorus::transport::MemoryHub::new(Default::default())?;
/// # let transport = hub.endpoint("10.0.0.1:7400".parse()?)?;
/// let node = chorus::Node::builder().start_with_transport(transport).await?;
/// node.put("k", "v").await?;
/// tokio::time::sleep(std::time::Duration::from_millis(150)).await;
/// let counters = node.counters();
/// assert_eq!(counters.store.keys, 1);
/// assert_eq!(counters.replication.local_writes, 1);
/// // The same figures by name.
/// assert_eq!(counters.get("store_keys"), Some(1));
/// assert_eq!(counters.get("replication_local_writes"), Some(1));
/// assert!(counters.iter().any(|(name, _)| name == "protocol_heartbeats_sent"));
/// node.shutdown().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// The reliable-multicast endpoint's counters (names `protocol_*`).
    pub protocol: ProtocolStats,
    /// The replication layer's counters (names `replication_*`).
    pub replication: ReplicaStats,
    /// The glue between the two: write and sync backlogs, clock safety (names `core_*`).
    pub core: CoreCounters,
    /// The data directory's counters, when the node has one (names `durable_*`; absent
    /// without [`NodeBuilder::data_dir`](crate::NodeBuilder::data_dir)).
    pub durable: Option<DurableStats>,
    /// The driver task's own counters: socket errors, injected drops (names `driver_*`).
    pub driver: DriverCounters,
    /// The local store's size (names `store_*`).
    pub store: StoreCounters,
    /// Published messages: sent, received, handed to subscriptions, dropped (names
    /// `pubsub_*`).
    pub pubsub: PubsubCounters,
}

/// The counters of messages that are not stored (names `pubsub_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PubsubCounters {
    /// Messages this node published (`pubsub_published`).
    pub published: u64,
    /// Valid messages received from peers (`pubsub_received`).
    pub received: u64,
    /// Messages queued for a subscription of this node, one per subscription a message
    /// matched, this node's own included (`pubsub_delivered`).
    pub delivered: u64,
    /// Messages of peers that matched no subscription of this node, dropped
    /// (`pubsub_dropped_no_subscriber`).
    pub dropped_no_subscriber: u64,
    /// Messages of peers dropped because their topic broke the syntax, their payload was over
    /// this node's limit, or they could not be decoded (`pubsub_dropped_invalid`).
    pub dropped_invalid: u64,
    /// Deliveries skipped because a subscription's reader was too slow; it was told
    /// (`pubsub_lagged`).
    pub lagged: u64,
    /// Losses of a peer's messages reported to subscriptions (`pubsub_lost_events`).
    pub lost_events: u64,
    /// Messages (of every kind) those losses covered (`pubsub_lost_messages`).
    pub lost_messages: u64,
    /// Subscriptions open (`pubsub_subscriptions`).
    pub subscriptions: u64,
}

/// The counters of the glue between protocol and replication (names `core_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreCounters {
    /// Local write messages waiting for room in the send window (`core_write_backlog`).
    pub write_backlog: usize,
    /// Anti-entropy messages waiting for room in the send window (`core_sync_backlog`).
    pub sync_backlog: usize,
    /// Anti-entropy messages dropped because the sync backlog was full (`core_sync_dropped`);
    /// anti-entropy sends them again later.
    pub sync_dropped: u64,
    /// Messages the protocol refused as too large, a configuration error (`core_too_large`).
    pub too_large: u64,
    /// How far (ms) a write stamped now would be ahead of the most advanced live peer's
    /// clock, or of this node's own when no peer reported one; negative when behind. Its
    /// name `core_clock_ahead_ms` reports 0 when behind.
    pub clock_ahead_ms: i64,
    /// Whether local writes are refused because of it
    /// ([`Error::ClockAhead`](crate::Error::ClockAhead); `core_clock_refusing`, 0 or 1).
    pub clock_refusing: bool,
    /// Owned keys of gone owners this node deleted, as deputy or backup
    /// (`core_owned_deleted`; see `docs/replication.md`, Owned keys).
    pub owned_deleted: u64,
    /// This node's owned keys written again after another node deleted them while it ran
    /// (`core_owned_reasserted`).
    pub owned_reasserted: u64,
    /// Times this node stopped deleting a gone owner's keys that kept coming back
    /// (`core_owned_gave_up`).
    pub owned_gave_up: u64,
}

/// The driver task's own counters (names `driver_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DriverCounters {
    /// Received datagrams dropped on purpose by the test hook `inject_receive_loss`
    /// (`driver_injected_drops`).
    pub injected_drops: u64,
    /// Datagrams the socket refused to send (`driver_send_errors`); NAK repair recovers
    /// them like any loss.
    pub send_errors: u64,
    /// Failed socket receive calls (`driver_recv_errors`).
    pub recv_errors: u64,
}

/// The local store's size (names `store_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Live keys (`store_keys`; tombstones not counted).
    pub keys: u64,
    /// The local revision (`store_revision`), as [`Node::revision`](crate::Node::revision).
    pub revision: u64,
}

impl Counters {
    /// Assembles the snapshot from the state machine's statistics and the driver's own.
    pub(crate) fn new(
        stats: NodeStats,
        driver: DriverCounters,
        store: StoreCounters,
        fanout: Fanout,
    ) -> Counters {
        // Exhaustive: a new field of `NodeStats` cannot be forgotten here.
        let NodeStats {
            protocol,
            replication,
            write_backlog,
            sync_backlog,
            sync_dropped,
            too_large,
            durable,
            clock_ahead_ms,
            clock_refusing,
            pubsub,
            owned,
        } = stats;
        let PubsubStats {
            published,
            received,
            invalid,
            lost_events,
            lost_messages,
        } = pubsub;
        let Fanout {
            delivered,
            no_subscriber,
            lagged,
            subscriptions,
        } = fanout;
        let chorus_replication::OwnedStats {
            deleted: owned_deleted,
            reasserted: owned_reasserted,
            gave_up: owned_gave_up,
        } = owned;
        Counters {
            protocol,
            replication,
            core: CoreCounters {
                write_backlog,
                sync_backlog,
                sync_dropped,
                too_large,
                clock_ahead_ms,
                clock_refusing,
                owned_deleted,
                owned_reasserted,
                owned_gave_up,
            },
            durable,
            driver,
            store,
            pubsub: PubsubCounters {
                published,
                received,
                delivered,
                dropped_no_subscriber: no_subscriber,
                dropped_invalid: invalid,
                lagged,
                lost_events,
                lost_messages,
                subscriptions,
            },
        }
    }

    /// Every counter under its flat snake_case name, sorted by name.
    ///
    /// The names are stable: exporters (the agent's `/metrics` and `/v1/stats`) publish them
    /// as they are.
    pub fn iter(&self) -> impl Iterator<Item = (String, u64)> {
        let layers: [(&str, Vec<(&'static str, u64)>); 7] = [
            ("protocol", self.protocol.counters()),
            ("replication", self.replication.counters()),
            ("core", self.core.counters()),
            (
                "durable",
                self.durable
                    .as_ref()
                    .map(DurableStats::counters)
                    .unwrap_or_default(),
            ),
            ("driver", self.driver.counters()),
            ("store", self.store.counters()),
            ("pubsub", self.pubsub.counters()),
        ];
        let mut all: Vec<(String, u64)> = layers
            .into_iter()
            .flat_map(|(layer, counters)| {
                counters
                    .into_iter()
                    .map(move |(name, value)| (format!("{layer}_{name}"), value))
            })
            .collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all.into_iter()
    }

    /// The counter called `name` (as [`iter`](Counters::iter) names it), if there is one.
    ///
    /// `durable_*` counters are `None` without a data directory.
    pub fn get(&self, name: &str) -> Option<u64> {
        let (layer, field) = name.split_once('_')?;
        let counters = match layer {
            "protocol" => self.protocol.counters(),
            "replication" => self.replication.counters(),
            "core" => self.core.counters(),
            "durable" => self.durable.as_ref()?.counters(),
            "driver" => self.driver.counters(),
            "store" => self.store.counters(),
            "pubsub" => self.pubsub.counters(),
            _ => return None,
        };
        counters
            .into_iter()
            .find(|(n, _)| *n == field)
            .map(|(_, v)| v)
    }
}

impl CoreCounters {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let CoreCounters {
            write_backlog,
            sync_backlog,
            sync_dropped,
            too_large,
            clock_ahead_ms,
            clock_refusing,
            owned_deleted,
            owned_reasserted,
            owned_gave_up,
        } = *self;
        vec![
            ("write_backlog", write_backlog as u64),
            ("sync_backlog", sync_backlog as u64),
            ("sync_dropped", sync_dropped),
            ("too_large", too_large),
            ("clock_ahead_ms", u64::try_from(clock_ahead_ms).unwrap_or(0)),
            ("clock_refusing", u64::from(clock_refusing)),
            ("owned_deleted", owned_deleted),
            ("owned_reasserted", owned_reasserted),
            ("owned_gave_up", owned_gave_up),
        ]
    }
}

impl DriverCounters {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let DriverCounters {
            injected_drops,
            send_errors,
            recv_errors,
        } = *self;
        vec![
            ("injected_drops", injected_drops),
            ("send_errors", send_errors),
            ("recv_errors", recv_errors),
        ]
    }
}

impl PubsubCounters {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let PubsubCounters {
            published,
            received,
            delivered,
            dropped_no_subscriber,
            dropped_invalid,
            lagged,
            lost_events,
            lost_messages,
            subscriptions,
        } = *self;
        vec![
            ("published", published),
            ("received", received),
            ("delivered", delivered),
            ("dropped_no_subscriber", dropped_no_subscriber),
            ("dropped_invalid", dropped_invalid),
            ("lagged", lagged),
            ("lost_events", lost_events),
            ("lost_messages", lost_messages),
            ("subscriptions", subscriptions),
        ]
    }
}

impl StoreCounters {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        let StoreCounters { keys, revision } = *self;
        vec![("keys", keys), ("revision", revision)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_is_found_again_by_get_and_names_are_sorted_and_unique() {
        let mut counters = Counters::default();
        counters.replication.local_writes = 3;
        counters.core.clock_ahead_ms = -5;
        counters.core.clock_refusing = true;
        counters.driver.send_errors = 2;
        counters.store.keys = 7;
        counters.pubsub.dropped_no_subscriber = 9;
        counters.durable = Some(DurableStats {
            fsyncs: 4,
            ..DurableStats::default()
        });
        let all: Vec<(String, u64)> = counters.iter().collect();
        assert!(
            all.windows(2).all(|w| w[0].0 < w[1].0),
            "sorted, no duplicates"
        );
        for (name, value) in &all {
            assert_eq!(counters.get(name), Some(*value), "{name}");
        }
        assert_eq!(counters.get("replication_local_writes"), Some(3));
        assert_eq!(
            counters.get("core_clock_ahead_ms"),
            Some(0),
            "behind reads 0"
        );
        assert_eq!(counters.get("core_clock_refusing"), Some(1));
        assert_eq!(counters.get("driver_send_errors"), Some(2));
        assert_eq!(counters.get("store_keys"), Some(7));
        assert_eq!(counters.get("pubsub_dropped_no_subscriber"), Some(9));
        assert_eq!(counters.get("durable_fsyncs"), Some(4));
        assert_eq!(counters.get("no_such_counter"), None);
        assert_eq!(counters.get("store_nothing"), None);

        counters.durable = None;
        assert_eq!(counters.get("durable_fsyncs"), None);
        assert!(
            counters
                .iter()
                .all(|(name, _)| !name.starts_with("durable_"))
        );
    }
}
