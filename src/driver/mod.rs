//! The driver task: one per node, owning the sans-IO [`NodeCore`] and the transport.
//!
//! - `mod.rs`: set-up ([`spawn`]) and the event loop;
//! - `shared.rs`: what the handles share with the driver (commands, published state);
//! - `config.rs`: builder → transport and protocol configuration;
//! - `snapshot.rs`: events, member and counter snapshots for readers.

mod config;
mod shared;
mod snapshot;

pub(crate) use config::open_transport;
use config::protocol_config;
pub(crate) use shared::{Command, Shared};

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_replication::{DiskLog, DiskOptions, NodeConfig, NodeCore, Version, WallClock};
use chorus_transport::{DatagramTransport, Destination, Outgoing, Received};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::time::Instant as TokioInstant;

use crate::{Error, NodeBuilder};

/// Most datagrams taken from the socket per receive call, and sent per send call.
const IO_BATCH: usize = 64;
/// How often the counter and member snapshots readers see are refreshed.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(100);
/// Longest a shutting-down node waits for every member to confirm (through heartbeats) that
/// it delivered everything this node sent, answering NAKs meanwhile.
const DRAIN_MAX: Duration = Duration::from_secs(3);
/// How long the node keeps running after its goodbye so that the goodbye gets out.
const GOODBYE_LINGER: Duration = Duration::from_millis(50);
/// Live changes buffered per watcher before it must catch up from the change log.
const WATCH_BUFFER: usize = 16_384;
/// Local writes waiting for room in the send window beyond which the driver takes no new
/// commands (callers of `put` then wait): back-pressure from the slowest member to the writer.
const WRITE_BACKLOG_MAX: usize = 1 << 20;
/// How long the driver stops waiting for watchers after one made no progress while it
/// yielded (an application that stopped reading its watch must not slow the node).
const WATCH_PATIENCE: Duration = Duration::from_millis(100);

/// Starts the driver task for `builder` over `transport`.
pub(crate) fn spawn<T: DatagramTransport>(
    builder: NodeBuilder,
    transport: T,
) -> Result<Arc<Shared>, Error> {
    let now_std = std::time::Instant::now();
    let epoch_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .map_err(|_| Error::Config("the system clock is before 1970".into()))?;
    // Node ids and protocol seeds come from the operating system's generator: two nodes
    // started in the same millisecond by one process must not draw the same id.
    let mut seeder = ChaCha8Rng::from_os_rng();
    let node_id = builder
        .node_id
        .unwrap_or_else(|| seeder.random::<u64>() >> 1);
    // A new incarnation on every start: the wall clock in microseconds is unique per start
    // of one node id unless the clock goes backwards by exactly the same amount.
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(1);
    let seed = seeder.random::<u64>();
    let protocol = protocol_config(&builder, node_id, incarnation, seed, &transport);
    protocol
        .validate()
        .map_err(|e| Error::Config(e.to_string()))?;
    match &protocol.keyring {
        Some(keys) => tracing::info!(
            send_key = %keys.send_id(),
            accepted = ?keys.accepted_ids().iter().map(|k| k.get()).collect::<Vec<_>>(),
            "cluster traffic is authenticated and encrypted"
        ),
        None => tracing::warn!(
            "no cluster key: traffic is neither authenticated nor encrypted, so any host on the \
             network segment can read every value and inject writes; use only on a trusted \
             network, or configure a key (chorus keygen, --key-file)"
        ),
    }
    let wall = WallClock {
        epoch: now_std,
        epoch_ms,
    };
    let config = NodeConfig::new(protocol, wall);
    let core = match &builder.data_dir {
        None => NodeCore::new(config, now_std),
        Some(dir) => {
            let (log, loaded) = DiskLog::open(dir, DiskOptions::new(builder.fsync))?;
            tracing::info!(
                node = node_id,
                dir = %dir.display(),
                entries = loaded.entries.len(),
                generation = loaded.report.generation,
                damaged_regions = loaded.report.corrupt_records,
                torn_tail_bytes = loaded.report.torn_tail_bytes,
                fsync = %builder.fsync,
                "store loaded from the data directory"
            );
            NodeCore::with_durability(config, now_std, Box::new(log), loaded)
        }
    };
    let (write_tx, cmd_rx) = mpsc::channel(1024);
    let (control_tx, control_rx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        node_id,
        incarnation,
        store: core.store().clone(),
        write_tx,
        control_tx,
        in_sync: watch::Sender::new(false),
        changes: broadcast::Sender::new(WATCH_BUFFER),
        members: Mutex::new(Vec::new()),
        counters: Mutex::default(),
        stopped: watch::Sender::new(false),
        task: Mutex::new(None),
    });
    let loss = builder
        .receive_loss
        .filter(|(p, _)| *p > 0.0)
        .map(|(p, s)| (p, ChaCha8Rng::seed_from_u64(s)));
    let driver = Driver {
        core,
        transport,
        shared: shared.clone(),
        loss,
        dropped_by_injection: 0,
        send_errors: 0,
        recv_errors: 0,
        acks: Vec::new(),
        watch_patience_until: TokioInstant::now(),
    };
    // Readers see this node as a member, and the counters, from the moment start returns.
    driver.publish_snapshots();
    let span = tracing::info_span!("node", id = node_id);
    let handle = tokio::spawn(tracing::Instrument::instrument(
        driver.run(cmd_rx, control_rx),
        span,
    ));
    *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle.abort_handle());
    Ok(shared)
}

/// A shutdown in progress: first drain (wait until every member has what we sent), then
/// goodbye.
struct Closing {
    deadline: TokioInstant,
    said_goodbye: bool,
    reply: Option<oneshot::Sender<()>>,
}

impl Closing {
    fn new(reply: Option<oneshot::Sender<()>>) -> Closing {
        Closing {
            deadline: TokioInstant::now() + DRAIN_MAX,
            said_goodbye: false,
            reply,
        }
    }
}

/// A write's reply and its result, held until the write is durable.
type Ack = (
    oneshot::Sender<Result<Version, Error>>,
    Result<Version, Error>,
);

struct Driver<T> {
    core: NodeCore,
    transport: T,
    shared: Arc<Shared>,
    loss: Option<(f64, ChaCha8Rng)>,
    dropped_by_injection: u64,
    send_errors: u64,
    recv_errors: u64,
    /// Write replies held until the writes are durable (group commit).
    acks: Vec<Ack>,
    /// Until when the driver does not yield to lagging watchers (see `let_watchers_catch_up`).
    watch_patience_until: TokioInstant,
}

impl<T: DatagramTransport> Driver<T> {
    async fn run(
        mut self,
        mut cmd_rx: mpsc::Receiver<Command>,
        mut control_rx: mpsc::Receiver<Command>,
    ) {
        let mut received: Vec<Received> = Vec::with_capacity(IO_BATCH);
        let mut outgoing: Vec<Outgoing> = Vec::with_capacity(IO_BATCH);
        let mut next_snapshot = TokioInstant::now();
        let mut closing: Option<Closing> = None;
        tracing::info!(incarnation = self.shared.incarnation, "node started");
        loop {
            let now = std::time::Instant::now();
            self.persist(now, false);
            self.flush(now, &mut outgoing).await;
            self.drain_events();
            if TokioInstant::now() >= next_snapshot {
                self.publish_snapshots();
                next_snapshot = TokioInstant::now() + SNAPSHOT_EVERY;
            }
            if let Some(c) = &mut closing {
                let now_t = TokioInstant::now();
                if !c.said_goodbye
                    && (now_t >= c.deadline
                        || (self.core.endpoint().window_len() == 0 && !self.core.has_backlog()))
                {
                    // Everything sent is stable at every member (or we gave up waiting).
                    self.core.close(std::time::Instant::now());
                    c.said_goodbye = true;
                    c.deadline = now_t + GOODBYE_LINGER;
                    continue;
                }
                if c.said_goodbye && now_t >= c.deadline {
                    break;
                }
            }
            if closing.is_none() {
                self.let_watchers_catch_up().await;
            }
            let timer = self
                .core
                .poll_timeout()
                .map(TokioInstant::from_std)
                .unwrap_or_else(|| TokioInstant::now() + Duration::from_secs(1));
            let timer = match &closing {
                Some(c) => timer
                    .min(c.deadline)
                    .min(TokioInstant::now() + Duration::from_millis(20)),
                None => timer.min(next_snapshot),
            };
            tokio::select! {
                cmd = control_rx.recv(), if closing.is_none() => match cmd {
                    Some(Command::Shutdown { reply }) => closing = Some(Closing::new(Some(reply))),
                    Some(cmd) => self.command(cmd),
                    None => closing = Some(Closing::new(None)),
                },
                cmd = cmd_rx.recv(),
                    if closing.is_none() && self.core.write_backlog_bytes() < WRITE_BACKLOG_MAX =>
                match cmd {
                    Some(Command::Shutdown { reply }) => closing = Some(Closing::new(Some(reply))),
                    Some(cmd) => {
                        self.command(cmd);
                        // Group commit: take the commands already waiting (up to a shutdown),
                        // so one fsync at the top of the loop covers them all.
                        for _ in 1..IO_BATCH {
                            match cmd_rx.try_recv() {
                                Ok(Command::Shutdown { reply }) => {
                                    closing = Some(Closing::new(Some(reply)));
                                    break;
                                }
                                Ok(cmd) => self.command(cmd),
                                Err(_) => break,
                            }
                        }
                    }
                    // Every handle is gone: shut down as if asked.
                    None => closing = Some(Closing::new(None)),
                },
                res = self.transport.recv_batch(&mut received, IO_BATCH) => {
                    match res {
                        Ok(_) => self.receive(&mut received),
                        Err(e) => {
                            self.recv_errors += 1;
                            tracing::warn!(error = %e, "receive failed");
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                () = tokio::time::sleep_until(timer) => {
                    self.core.handle_timeout(std::time::Instant::now());
                }
            }
        }
        // Answer commands that raced with shutdown, then publish the final state.
        cmd_rx.close();
        control_rx.close();
        while let Ok(cmd) = cmd_rx.try_recv().or_else(|_| control_rx.try_recv()) {
            match cmd {
                Command::Shutdown { reply } => {
                    let _ = reply.send(());
                }
                other => self.command(other),
            }
        }
        self.persist(std::time::Instant::now(), true);
        self.drain_events();
        self.publish_snapshots();
        self.shared.in_sync.send_replace(false);
        self.shared.stopped.send_replace(true);
        if let Some(reply) = closing.and_then(|c| c.reply) {
            let _ = reply.send(());
        }
        tracing::info!("node stopped");
    }

    /// Yields to the runtime while the slowest watcher is more than a quarter of its live
    /// buffer behind, before taking more datagrams or commands.
    ///
    /// Without this a busy driver starves its watchers: tokio runs a woken watcher task only
    /// when the driver yields, and the driver yields only when its cooperative budget runs out,
    /// after having delivered thousands of changes for the watcher's 128. Under sustained load
    /// (or the burst after a repair) watchers then fell out of the change log and ended with
    /// `Compacted`. A watcher that makes no progress over a yield (its owner stopped reading)
    /// is not waited for again for `WATCH_PATIENCE`.
    async fn let_watchers_catch_up(&mut self) {
        let mut behind = self.shared.changes.len();
        if behind <= WATCH_BUFFER / 4 || TokioInstant::now() < self.watch_patience_until {
            return;
        }
        for _ in 0..256 {
            tokio::task::yield_now().await;
            let now_behind = self.shared.changes.len();
            if now_behind <= WATCH_BUFFER / 4 {
                return;
            }
            if now_behind >= behind {
                break;
            }
            behind = now_behind;
        }
        self.watch_patience_until = TokioInstant::now() + WATCH_PATIENCE;
    }

    /// Makes the changes applied so far durable (one fsync for every write handled since the
    /// last call, under `Fsync::Always`), then acknowledges the writes held for it. With
    /// `force`, fsyncs whatever the policy (shutdown).
    fn persist(&mut self, now: std::time::Instant, force: bool) {
        let result = if force {
            self.core.sync_durable(now)
        } else {
            self.core.flush_durable(now)
        };
        for (reply, res) in self.acks.drain(..) {
            let res = match (&result, res) {
                (Err(e), Ok(_)) => Err(Error::Durability(e.clone())),
                (_, res) => res,
            };
            let _ = reply.send(res);
        }
    }

    fn receive(&mut self, received: &mut Vec<Received>) {
        let now = std::time::Instant::now();
        for datagram in received.drain(..) {
            if let Some((p, rng)) = &mut self.loss
                && rng.random_bool(*p)
            {
                self.dropped_by_injection += 1;
                continue;
            }
            self.core
                .handle_datagram(now, datagram.source, &datagram.payload);
        }
    }

    fn command(&mut self, cmd: Command) {
        let now = std::time::Instant::now();
        let closed = Error::from;
        match cmd {
            Command::Write { ops, reply } => {
                let result = self.core.batch(now, ops).map_err(closed);
                self.acks.push((reply, result));
            }
            Command::ChangesSince {
                revision,
                prefix,
                reply,
            } => {
                let result =
                    self.core
                        .changes_since(revision, &prefix)
                        .map_err(|c| Error::Compacted {
                            requested: revision,
                            oldest: c.oldest_available,
                        });
                let _ = reply.send(result);
            }
            Command::Shutdown { reply } => {
                let _ = reply.send(());
            }
        }
    }

    /// Hands every datagram the state machine has ready to the transport, in batches.
    async fn flush(&mut self, now: std::time::Instant, outgoing: &mut Vec<Outgoing>) {
        loop {
            while outgoing.len() < IO_BATCH {
                let Some(t) = self.core.poll_transmit(now) else {
                    break;
                };
                let destination = match t.destination {
                    chorus_protocol::Destination::Group => Destination::Group,
                    chorus_protocol::Destination::Addr(a) => Destination::Addr(a),
                };
                outgoing.push(Outgoing {
                    destination,
                    payload: t.payload,
                });
            }
            if outgoing.is_empty() {
                return;
            }
            let mut sent = 0;
            while sent < outgoing.len() {
                match self.transport.send_batch(&outgoing[sent..]).await {
                    Ok(n) => sent += n.max(1),
                    Err(e) => {
                        // The datagram is dropped; NAK repair recovers it like any loss.
                        self.send_errors += 1;
                        tracing::debug!(error = %e, "send failed");
                        sent += 1;
                    }
                }
            }
            outgoing.clear();
        }
    }
}
