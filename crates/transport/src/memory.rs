//! An in-memory network for driver tests: a hub of endpoints joined by tokio
//! channels, with seeded per-datagram loss and partitions.
//!
//! It implements the same [`DatagramTransport`] seam as the real socket, so the
//! tokio driver runs over it unchanged. Timing is tokio's (works with a paused
//! clock); delivery is immediate and in order per sender–receiver pair.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::mpsc;

use crate::{DatagramTransport, Destination, Outgoing, Received, TransportError};

/// How a [`MemoryHub`] behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct HubConfig {
    /// The address standing for the group; a send to it is a group send.
    pub group: SocketAddr,
    /// Probability in `[0, 1]` that any one delivery (one receiver of one datagram) is lost.
    pub loss: f64,
    /// Seed of the loss decisions, so a failing run replays.
    pub seed: u64,
    /// Datagrams queued per endpoint before further ones are dropped, as a full socket buffer does.
    pub queue_capacity: usize,
    /// Whether a group send is also delivered to its sender (as multicast loopback does).
    pub loopback: bool,
    /// Largest payload accepted.
    pub max_datagram_size: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            group: SocketAddr::from(([239, 255, 0, 1], 7400)),
            loss: 0.0,
            seed: 0,
            queue_capacity: 4096,
            loopback: true,
            max_datagram_size: 1472,
        }
    }
}

/// Counters of a [`MemoryHub`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HubStats {
    /// Deliveries attempted (a group send to 3 receivers counts 3).
    pub attempted: u64,
    /// Deliveries queued to a receiver.
    pub delivered: u64,
    /// Deliveries dropped by the seeded loss.
    pub dropped_loss: u64,
    /// Deliveries dropped by a partition.
    pub dropped_partition: u64,
    /// Deliveries dropped because the receiver's queue was full.
    pub dropped_full: u64,
    /// Unicast sends to an address no endpoint holds.
    pub dropped_no_endpoint: u64,
}

struct HubInner {
    config: HubConfig,
    endpoints: BTreeMap<SocketAddr, mpsc::Sender<Received>>,
    /// Directed pairs (from, to) whose traffic is dropped.
    cut: BTreeSet<(SocketAddr, SocketAddr)>,
    rng: ChaCha8Rng,
    stats: HubStats,
}

impl HubInner {
    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, datagram: Received) {
        self.stats.attempted += 1;
        if self.cut.contains(&(from, to)) {
            self.stats.dropped_partition += 1;
            return;
        }
        if self.config.loss > 0.0 && self.rng.random_bool(self.config.loss.min(1.0)) {
            self.stats.dropped_loss += 1;
            return;
        }
        let Some(tx) = self.endpoints.get(&to) else {
            self.stats.dropped_no_endpoint += 1;
            return;
        };
        match tx.try_send(datagram) {
            Ok(()) => self.stats.delivered += 1,
            Err(_) => self.stats.dropped_full += 1,
        }
    }
}

/// An in-memory network. Clone it freely; endpoints stop working once every clone is dropped.
#[derive(Clone)]
pub struct MemoryHub {
    inner: Arc<Mutex<HubInner>>,
}

impl std::fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = lock(&self.inner);
        f.debug_struct("MemoryHub")
            .field("config", &inner.config)
            .field("endpoints", &inner.endpoints.keys().collect::<Vec<_>>())
            .field("stats", &inner.stats)
            .finish()
    }
}

fn lock(inner: &Mutex<HubInner>) -> std::sync::MutexGuard<'_, HubInner> {
    // Nothing in HubInner is left half-updated by a panic worth refusing to go on for.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryHub {
    /// A hub behaving as `config` says.
    ///
    /// # Errors
    ///
    /// [`TransportError::InvalidConfig`] if `loss` is not within `[0, 1]` or `queue_capacity` is 0.
    pub fn new(config: HubConfig) -> Result<Self, TransportError> {
        if !(0.0..=1.0).contains(&config.loss) {
            return Err(TransportError::InvalidConfig(format!(
                "memory hub loss {} is not a probability in [0, 1]",
                config.loss
            )));
        }
        if config.queue_capacity == 0 {
            return Err(TransportError::InvalidConfig(
                "memory hub queue_capacity must be at least 1".to_owned(),
            ));
        }
        Ok(MemoryHub {
            inner: Arc::new(Mutex::new(HubInner {
                rng: ChaCha8Rng::seed_from_u64(config.seed),
                config,
                endpoints: BTreeMap::new(),
                cut: BTreeSet::new(),
                stats: HubStats::default(),
            })),
        })
    }

    /// Attaches an endpoint at `addr`; it receives group sends and unicast to `addr`.
    ///
    /// # Errors
    ///
    /// [`TransportError::AddrInUse`] if another live endpoint holds `addr`.
    pub fn endpoint(&self, addr: SocketAddr) -> Result<MemoryTransport, TransportError> {
        let mut inner = lock(&self.inner);
        if inner.endpoints.contains_key(&addr) {
            return Err(TransportError::AddrInUse {
                addr,
                source: std::io::ErrorKind::AddrInUse.into(),
            });
        }
        let (tx, rx) = mpsc::channel(inner.config.queue_capacity);
        inner.endpoints.insert(addr, tx);
        Ok(MemoryTransport {
            hub: Arc::downgrade(&self.inner),
            addr,
            max_datagram_size: inner.config.max_datagram_size,
            rx: tokio::sync::Mutex::new(rx),
        })
    }

    /// Changes the loss probability (clamped to `[0, 1]`).
    pub fn set_loss(&self, loss: f64) {
        lock(&self.inner).config.loss = loss.clamp(0.0, 1.0);
    }

    /// Drops all traffic between `a` and `b`, both ways, until [`heal`](Self::heal).
    pub fn partition(&self, a: SocketAddr, b: SocketAddr) {
        let mut inner = lock(&self.inner);
        inner.cut.insert((a, b));
        inner.cut.insert((b, a));
    }

    /// Restores traffic between `a` and `b`.
    pub fn heal(&self, a: SocketAddr, b: SocketAddr) {
        let mut inner = lock(&self.inner);
        inner.cut.remove(&(a, b));
        inner.cut.remove(&(b, a));
    }

    /// Counters so far.
    pub fn stats(&self) -> HubStats {
        lock(&self.inner).stats
    }
}

/// One endpoint of a [`MemoryHub`]; a [`DatagramTransport`] for tests.
///
/// Dropping it detaches its address from the hub.
pub struct MemoryTransport {
    hub: Weak<Mutex<HubInner>>,
    addr: SocketAddr,
    max_datagram_size: usize,
    rx: tokio::sync::Mutex<mpsc::Receiver<Received>>,
}

impl std::fmt::Debug for MemoryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTransport")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            lock(&hub).endpoints.remove(&self.addr);
        }
    }
}

impl DatagramTransport for MemoryTransport {
    async fn send_batch(&self, batch: &[Outgoing]) -> Result<usize, TransportError> {
        let hub = self.hub.upgrade().ok_or(TransportError::Closed)?;
        let mut inner = lock(&hub);
        let group = inner.config.group;
        for (i, outgoing) in batch.iter().enumerate() {
            if outgoing.payload.len() > self.max_datagram_size {
                let err = TransportError::DatagramTooLarge {
                    len: outgoing.payload.len(),
                    max: self.max_datagram_size,
                    target: format!("{:?}", outgoing.destination),
                };
                return if i == 0 { Err(err) } else { Ok(i) };
            }
            let to_group = match outgoing.destination {
                Destination::Group => true,
                Destination::Addr(addr) => addr == group,
            };
            if to_group {
                let loopback = inner.config.loopback;
                let targets: Vec<SocketAddr> = inner
                    .endpoints
                    .keys()
                    .copied()
                    .filter(|&to| loopback || to != self.addr)
                    .collect();
                for to in targets {
                    let datagram = Received {
                        payload: outgoing.payload.clone(),
                        source: self.addr,
                        destination: Some(group.ip()),
                        via_group: true,
                    };
                    inner.deliver(self.addr, to, datagram);
                }
            } else if let Destination::Addr(to) = outgoing.destination {
                let datagram = Received {
                    payload: outgoing.payload.clone(),
                    source: self.addr,
                    destination: Some(to.ip()),
                    via_group: false,
                };
                inner.deliver(self.addr, to, datagram);
            }
        }
        Ok(batch.len())
    }

    async fn recv_batch(
        &self,
        out: &mut Vec<Received>,
        max: usize,
    ) -> Result<usize, TransportError> {
        let mut rx = self.rx.lock().await;
        let first = rx.recv().await.ok_or(TransportError::Closed)?;
        out.push(first);
        let mut taken = 1;
        while taken < max {
            match rx.try_recv() {
                Ok(datagram) => {
                    out.push(datagram);
                    taken += 1;
                }
                Err(_) => break,
            }
        }
        Ok(taken)
    }

    fn local_addr(&self) -> Result<SocketAddr, TransportError> {
        Ok(self.addr)
    }

    fn max_datagram_size(&self) -> usize {
        self.max_datagram_size
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], port))
    }

    async fn recv_all(t: &MemoryTransport) -> Vec<Received> {
        let mut out = Vec::new();
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(20), t.recv_batch(&mut out, 64)).await
        {
        }
        out
    }

    #[tokio::test]
    async fn group_send_reaches_everyone_and_loopback_is_configurable() {
        let hub = MemoryHub::new(HubConfig::default()).unwrap();
        let a = hub.endpoint(addr(1)).unwrap();
        let b = hub.endpoint(addr(2)).unwrap();
        let sent = a
            .send_batch(&[Outgoing::to_group("x"), Outgoing::to_addr(addr(2), "u")])
            .await
            .unwrap();
        assert_eq!(sent, 2);
        let at_a = recv_all(&a).await;
        let at_b = recv_all(&b).await;
        assert_eq!(
            at_a.len(),
            1,
            "loopback delivers the group send to its sender"
        );
        assert_eq!(at_b.len(), 2);
        assert!(at_b[0].via_group && at_b[0].source == addr(1));
        assert!(!at_b[1].via_group && at_b[1].payload == "u");

        let hub = MemoryHub::new(HubConfig {
            loopback: false,
            ..HubConfig::default()
        })
        .unwrap();
        let a = hub.endpoint(addr(1)).unwrap();
        a.send_batch(&[Outgoing::to_group("x")]).await.unwrap();
        assert!(recv_all(&a).await.is_empty());
    }

    #[tokio::test]
    async fn seeded_loss_replays_and_is_counted() {
        let run = |seed| async move {
            let hub = MemoryHub::new(HubConfig {
                loss: 0.3,
                seed,
                loopback: false,
                ..HubConfig::default()
            })
            .unwrap();
            let a = hub.endpoint(addr(1)).unwrap();
            let b = hub.endpoint(addr(2)).unwrap();
            let batch: Vec<_> = (0..200u32)
                .map(|i| Outgoing::to_group(i.to_be_bytes().to_vec()))
                .collect();
            a.send_batch(&batch).await.unwrap();
            let got: Vec<Bytes> = recv_all(&b).await.into_iter().map(|r| r.payload).collect();
            (got, hub.stats())
        };
        let (first, stats) = run(7).await;
        let (again, _) = run(7).await;
        let (other, _) = run(8).await;
        assert_eq!(first, again, "same seed, same losses");
        assert_ne!(first, other, "another seed, other losses");
        assert_eq!(stats.delivered as usize, first.len());
        assert_eq!(stats.delivered + stats.dropped_loss, 200);
        assert!((30..90).contains(&stats.dropped_loss), "{stats:?}");
    }

    use bytes::Bytes;

    #[tokio::test]
    async fn partition_heal_full_queue_and_closed_hub() {
        let hub = MemoryHub::new(HubConfig {
            queue_capacity: 2,
            ..HubConfig::default()
        })
        .unwrap();
        let a = hub.endpoint(addr(1)).unwrap();
        let b = hub.endpoint(addr(2)).unwrap();
        assert!(matches!(
            hub.endpoint(addr(2)),
            Err(TransportError::AddrInUse { .. })
        ));
        hub.partition(addr(1), addr(2));
        a.send_batch(&[Outgoing::to_addr(addr(2), "p")])
            .await
            .unwrap();
        assert!(recv_all(&b).await.is_empty());
        hub.heal(addr(1), addr(2));
        let three = vec![Outgoing::to_addr(addr(2), "q"); 3];
        a.send_batch(&three).await.unwrap();
        assert_eq!(recv_all(&b).await.len(), 2);
        let stats = hub.stats();
        assert_eq!((stats.dropped_partition, stats.dropped_full), (1, 1));

        let big = Outgoing::to_group(vec![0u8; 1473]);
        assert!(matches!(
            a.send_batch(&[big]).await,
            Err(TransportError::DatagramTooLarge { len: 1473, .. })
        ));

        drop(hub);
        assert!(matches!(
            a.send_batch(&[Outgoing::to_group("z")]).await,
            Err(TransportError::Closed)
        ));
        let mut out = Vec::new();
        assert!(matches!(
            b.recv_batch(&mut out, 1).await,
            Err(TransportError::Closed)
        ));
    }
}
