//! The driver task: one per node, owning the sans-IO [`NodeCore`] and the transport. It only
//! moves bytes and commands: datagrams in and out, commands in, persist items to the storage
//! thread (`chorus_storage::Storage`) and its progress back, events out to the handles.
//! Shutdown, drain, linger, back-pressure and acknowledgement are the core's. It reads the
//! clock once per loop iteration, from tokio's clock only (so it runs under paused time).
//!
//! - `mod.rs`: set-up ([`spawn`]) and the event loop;
//! - `shared.rs`: what the handles share with the driver (commands, published state);
//! - `config.rs`: builder → transport and protocol configuration;
//! - `snapshot.rs`: events, member and counter snapshots for readers.

mod config;
mod shared;
mod snapshot;

pub(crate) use config::open_transport;
use config::{node_name, protocol_config};
pub(crate) use shared::{Command, Shared};

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_replication::{
    CoreError, DurableError, Lifecycle, NodeConfig, NodeCore, RestoreMode, RestoreReport, Version,
    WallClock,
};
use chorus_storage::{DiskLog, DiskOptions, Progress, Storage};
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
/// Live changes buffered per watcher before it must catch up from the change log.
const WATCH_BUFFER: usize = 16_384;
/// Member events buffered per subscriber of `Node::member_events` before it lags.
const MEMBER_EVENT_BUFFER: usize = 1024;
/// How long the driver stops waiting for watchers after one made no progress while it
/// yielded (an application that stopped reading its watch must not slow the node).
const WATCH_PATIENCE: Duration = Duration::from_millis(100);

/// Starts the driver task for `builder` over `transport`.
pub(crate) fn spawn<T: DatagramTransport>(
    builder: NodeBuilder,
    transport: T,
) -> Result<Arc<Shared>, Error> {
    // The one clock of the node (tokio's: paused in tests that pause it), and the wall clock
    // read once, for the mapping of `now` to unix time and for the incarnation.
    let now = TokioInstant::now().into_std();
    let epoch_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .map_err(|_| Error::Config("the system clock is before 1970".into()))?;
    let epoch_ms = epoch_us / 1000;
    // Node ids and protocol seeds come from the operating system's generator: two nodes
    // started in the same millisecond by one process must not draw the same id.
    let mut seeder = ChaCha8Rng::from_os_rng();
    let node_id = builder
        .node_id
        .unwrap_or_else(|| seeder.random::<u64>() >> 1);
    // A new incarnation on every start: the wall clock in microseconds is unique per start
    // of one node id unless the clock goes backwards by exactly the same amount.
    let incarnation = epoch_us.max(1);
    let seed = seeder.random::<u64>();
    let name = node_name(&builder)?;
    let mut protocol = protocol_config(&builder, node_id, incarnation, seed, &transport);
    protocol.name = name.clone();
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
        epoch: now,
        epoch_ms,
    };
    let config = NodeConfig::new(protocol, wall);
    let (core, log) = match &builder.data_dir {
        None => (NodeCore::new(config, now), None),
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
            let mut core = NodeCore::restore(config, now, loaded);
            core.handle_durable_stats(log.stats());
            (core, Some(log))
        }
    };
    // The storage thread reports its progress here; the driver wakes on it.
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    let storage = match log {
        None => None,
        Some(log) => {
            let report = move |p: Progress| {
                // The driver gone: nobody waits for acknowledgements any more.
                let _ = progress_tx.send(p);
            };
            let storage = Storage::spawn(log, core.store().clone(), report).map_err(|e| {
                Error::Durability(DurableError::Io {
                    op: "start the storage thread for",
                    path: builder.data_dir.clone().unwrap_or_default(),
                    source: Arc::new(e),
                })
            })?;
            Some(storage)
        }
    };
    let (write_tx, cmd_rx) = mpsc::channel(1024);
    let (control_tx, control_rx) = mpsc::channel(64);
    let shared = Arc::new(Shared {
        node_id,
        incarnation,
        name: name.as_ref().map(|n| n.as_str().to_owned()),
        store: core.store().clone(),
        write_tx,
        control_tx,
        in_sync: watch::Sender::new(false),
        changes: broadcast::Sender::new(WATCH_BUFFER),
        member_events: broadcast::Sender::new(MEMBER_EVENT_BUFFER),
        members: Mutex::new(Vec::new()),
        counters: Mutex::default(),
        stopped: watch::Sender::new(false),
        subscriptions: Mutex::default(),
        task: Mutex::new(None),
    });
    let loss = builder
        .receive_loss
        .filter(|(p, _)| *p > 0.0)
        .map(|(p, s)| (p, ChaCha8Rng::seed_from_u64(s)));
    let mut driver = Driver {
        core,
        transport,
        shared: shared.clone(),
        loss,
        dropped_by_injection: 0,
        send_errors: 0,
        recv_errors: 0,
        replies: HashMap::new(),
        restore_replies: HashMap::new(),
        next_ticket: 0,
        storage,
        progress_rx,
        shutdown_replies: Vec::new(),
        watch_patience_until: TokioInstant::from_std(now),
        known: HashMap::new(),
    };
    // Readers see this node as a member, and the counters, from the moment start returns.
    driver.publish_snapshots();
    let span = match &name {
        Some(name) => tracing::info_span!("node", id = node_id, name = name.as_str()),
        None => tracing::info_span!("node", id = node_id),
    };
    let handle = tokio::spawn(tracing::Instrument::instrument(
        driver.run(cmd_rx, control_rx),
        span,
    ));
    *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(handle.abort_handle());
    Ok(shared)
}

/// What woke the loop; handled at the top of the next iteration, after the one clock read.
enum Wake {
    Timer,
    Datagrams,
    ReceiveFailed,
    /// A write command (more may be waiting: taken too, for one group commit).
    Write(Command),
    /// Every handle is gone, or a shutdown was asked for.
    Shutdown(Option<oneshot::Sender<()>>),
    Control(Command),
    Progress(Progress),
}

/// A write's reply, held until the core acknowledges the write.
type Reply = oneshot::Sender<Result<Version, Error>>;
/// A restore's reply, held likewise.
type RestoreReply = oneshot::Sender<Result<RestoreReport, Error>>;

struct Driver<T> {
    core: NodeCore,
    transport: T,
    shared: Arc<Shared>,
    loss: Option<(f64, ChaCha8Rng)>,
    dropped_by_injection: u64,
    send_errors: u64,
    recv_errors: u64,
    /// Write replies by ticket, until the core's `Acked`.
    replies: HashMap<u64, Reply>,
    /// Restore replies by ticket (with the report), until the core's `Acked`.
    restore_replies: HashMap<u64, (RestoreReport, RestoreReply)>,
    next_ticket: u64,
    /// The storage thread of a node with a data directory.
    storage: Option<Storage>,
    progress_rx: mpsc::UnboundedReceiver<Progress>,
    /// Who asked for the shutdown (answered once the node stopped).
    shutdown_replies: Vec<oneshot::Sender<()>>,
    /// Until when the driver does not yield to lagging watchers (see `let_watchers_catch_up`).
    watch_patience_until: TokioInstant,
    /// The last known name and address of every member, for the member events of those that
    /// left (one entry per member: removed when it leaves).
    known: HashMap<chorus_protocol::NodeId, snapshot::Known>,
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
        let mut woke: Option<Wake> = None;
        tracing::info!(incarnation = self.shared.incarnation, "node started");
        loop {
            // The one clock read of this iteration.
            let now = TokioInstant::now();
            let now_std = now.into_std();
            match woke.take() {
                None => {}
                Some(Wake::Timer) => self.core.handle_timeout(now_std),
                Some(Wake::Datagrams) => self.receive(now_std, &mut received),
                Some(Wake::ReceiveFailed) => {}
                Some(Wake::Write(cmd)) => {
                    self.command(now_std, cmd);
                    // Group commit: take the commands already waiting (up to a shutdown),
                    // so that one write and fsync of the storage thread covers them all.
                    for _ in 1..IO_BATCH {
                        if !self.core.accepts_writes() {
                            break;
                        }
                        match cmd_rx.try_recv() {
                            Ok(Command::Shutdown { reply }) => {
                                self.shutdown(now_std, Some(reply));
                                break;
                            }
                            Ok(cmd) => self.command(now_std, cmd),
                            Err(_) => break,
                        }
                    }
                }
                Some(Wake::Shutdown(reply)) => self.shutdown(now_std, reply),
                Some(Wake::Control(cmd)) => self.command(now_std, cmd),
                Some(Wake::Progress(p)) => self.progress(p),
            }
            self.persist();
            self.flush(now_std, &mut outgoing).await;
            self.drain_events();
            if now >= next_snapshot {
                self.publish_snapshots();
                next_snapshot = now + SNAPSHOT_EVERY;
            }
            let running = self.core.lifecycle() == Lifecycle::Running;
            if self.core.lifecycle() == Lifecycle::Closed {
                break;
            }
            if running {
                self.let_watchers_catch_up(now).await;
            }
            let timer = self
                .core
                .poll_timeout()
                .map(TokioInstant::from_std)
                .unwrap_or_else(|| now + Duration::from_secs(1))
                .min(next_snapshot);
            let durable = self.storage.is_some();
            woke = Some(tokio::select! {
                cmd = control_rx.recv(), if running => match cmd {
                    Some(Command::Shutdown { reply }) => Wake::Shutdown(Some(reply)),
                    Some(cmd) => Wake::Control(cmd),
                    None => Wake::Shutdown(None),
                },
                cmd = cmd_rx.recv(), if self.core.accepts_writes() => match cmd {
                    Some(Command::Shutdown { reply }) => Wake::Shutdown(Some(reply)),
                    Some(cmd) => Wake::Write(cmd),
                    // Every handle is gone: shut down as if asked.
                    None => Wake::Shutdown(None),
                },
                res = self.transport.recv_batch(&mut received, IO_BATCH) => match res {
                    Ok(_) => Wake::Datagrams,
                    Err(e) => {
                        self.recv_errors += 1;
                        tracing::warn!(error = %e, "receive failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        Wake::ReceiveFailed
                    }
                },
                Some(p) = self.progress_rx.recv(), if durable => Wake::Progress(p),
                () = tokio::time::sleep_until(timer) => Wake::Timer,
            });
        }
        // Answer commands that raced with shutdown (writes are refused as closed).
        cmd_rx.close();
        control_rx.close();
        let now = TokioInstant::now().into_std();
        while let Ok(cmd) = cmd_rx.try_recv().or_else(|_| control_rx.try_recv()) {
            match cmd {
                Command::Shutdown { reply } => self.shutdown_replies.push(reply),
                other => self.command(now, other),
            }
        }
        // The core's last persist item is a sync of everything: hand it over, then wait for
        // the storage thread to report it and stop (releasing the data directory).
        self.persist();
        if let Some(mut storage) = self.storage.take() {
            storage.close();
            while let Some(p) = self.progress_rx.recv().await {
                let stopped = p.stopped;
                self.progress(p);
                if stopped {
                    break;
                }
            }
        }
        self.drain_events();
        self.shared.subscriptions().close();
        for (_, reply) in self.replies.drain() {
            let _ = reply.send(Err(Error::Durability(DurableError::Failed(
                "the storage thread stopped before the write was durable".into(),
            ))));
        }
        for (_, (_, reply)) in self.restore_replies.drain() {
            let _ = reply.send(Err(Error::Durability(DurableError::Failed(
                "the storage thread stopped before the restore was durable".into(),
            ))));
        }
        self.publish_snapshots();
        self.shared.in_sync.send_replace(false);
        self.shared.stopped.send_replace(true);
        for reply in self.shutdown_replies.drain(..) {
            let _ = reply.send(());
        }
        tracing::info!("node stopped");
    }

    fn shutdown(&mut self, now: std::time::Instant, reply: Option<oneshot::Sender<()>>) {
        self.shutdown_replies.extend(reply);
        self.core.shutdown(now);
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
    async fn let_watchers_catch_up(&mut self, now: TokioInstant) {
        let mut behind = self.shared.changes.len();
        if behind <= WATCH_BUFFER / 4 || now < self.watch_patience_until {
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
        self.watch_patience_until = now + WATCH_PATIENCE;
    }

    /// Hands what the core wants persisted to the storage thread (never blocks).
    fn persist(&mut self) {
        let Some(storage) = &self.storage else {
            return;
        };
        let mut gone = false;
        while let Some(item) = self.core.poll_persist() {
            gone |= !storage.send(item);
        }
        if gone {
            self.core
                .handle_persist_failed(DurableError::Failed("the storage thread stopped".into()));
        }
    }

    /// The storage thread's progress, handed to the core (which acknowledges writes).
    fn progress(&mut self, p: Progress) {
        self.core.handle_persisted(p.through);
        if let Some(e) = p.failed {
            self.core.handle_persist_failed(e);
        }
        self.core.handle_durable_stats(p.stats);
    }

    /// Answers the write command `ticket` (an `Acked` of the core).
    pub(super) fn acknowledge(&mut self, ticket: u64, result: Result<Version, CoreError>) {
        if let Some(reply) = self.replies.remove(&ticket) {
            let _ = reply.send(result.map_err(Error::from));
        } else if let Some((report, reply)) = self.restore_replies.remove(&ticket) {
            let _ = reply.send(result.map(|_| report).map_err(Error::from));
        }
    }

    /// A restore: the reply waits for the core's `Acked` of its ticket, like a write's.
    fn restore(
        &mut self,
        now: std::time::Instant,
        entries: Vec<(String, chorus_replication::Entry)>,
        mode: RestoreMode,
        reply: RestoreReply,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        // The report is known at once; the answer waits for the `Acked` (at once when
        // refused, then with the error).
        match self.core.restore_entries(now, entries, mode, ticket) {
            Ok(report) => {
                self.restore_replies.insert(ticket, (report, reply));
            }
            Err(_) => {
                self.restore_replies
                    .insert(ticket, (RestoreReport::default(), reply));
            }
        }
    }

    fn receive(&mut self, now: std::time::Instant, received: &mut Vec<Received>) {
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

    /// A write: the reply waits for the core's `Acked` of its ticket.
    fn write(
        &mut self,
        now: std::time::Instant,
        checks: Vec<chorus_replication::Check>,
        ops: Vec<chorus_replication::Op>,
        reply: Reply,
    ) {
        let ticket = self.next_ticket;
        self.next_ticket = self.next_ticket.wrapping_add(1);
        self.replies.insert(ticket, reply);
        // The result comes back as an `Acked` (at once when refused).
        let _ = self.core.batch_checked(now, checks, ops, ticket);
    }

    fn command(&mut self, now: std::time::Instant, cmd: Command) {
        match cmd {
            Command::Write { checks, ops, reply } => self.write(now, checks, ops, reply),
            Command::Restore {
                entries,
                mode,
                reply,
            } => self.restore(now, entries, mode, reply),
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
            Command::Shutdown { reply } => self.shutdown_replies.push(reply),
            Command::Publish {
                topic,
                payload,
                reply,
            } => {
                let result = self.core.publish(now, &topic, payload);
                let _ = reply.send(result.map_err(Error::from));
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
