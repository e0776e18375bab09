//! [`Storage`]: the OS thread that owns a node's [`DiskLog`], so that no write, fsync or
//! snapshot ever runs on the driver task.
//!
//! The driver hands it every [`Persist`] item (a channel send, never blocking); the thread
//! takes whatever is queued at once (group commit: one write and at most one fsync for all of
//! it), writes and fsyncs as the policy says, and reports [`Progress`] back through the
//! callback it was given (the driver wakes on it). When the log has grown past its threshold
//! it compacts, a chunk of the store at a time, looking at its queue between chunks, so that
//! acknowledgements keep flowing during a compaction.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Instant;

use chorus_replication::{DurableError, DurableStats, Persist};

use crate::compact::{Compacting, SnapshotSource};
use crate::disk::{DiskLog, FlushMode};

/// What the storage thread reports after it wrote or fsynced.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Every record with `seq <= through` is durable as the fsync policy requires (hand it to
    /// `NodeCore::handle_persisted`).
    pub through: u64,
    /// Set once, when the log failed (hand it to `NodeCore::handle_persist_failed`).
    pub failed: Option<DurableError>,
    /// The log's counters.
    pub stats: DurableStats,
    /// The last report: the thread has stopped and released the data directory.
    pub stopped: bool,
}

/// The handle on a storage thread. Dropping it (or [`close`](Storage::close)) stops the
/// thread once it has written what it was sent.
#[derive(Debug)]
pub struct Storage {
    tx: Option<Sender<Persist>>,
    thread: Option<JoinHandle<()>>,
}

impl Storage {
    /// Starts the thread that owns `log`; it compacts from `source` (the node's store) and
    /// calls `report` with every change of progress, from its own thread.
    ///
    /// # Errors
    /// The operating system could not start a thread.
    pub fn spawn(
        log: DiskLog,
        source: impl SnapshotSource + Send + 'static,
        report: impl FnMut(Progress) + Send + 'static,
    ) -> std::io::Result<Storage> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("chorus-storage".into())
            .spawn(move || {
                Worker {
                    log,
                    rx,
                    report: Box::new(report),
                    reported: (0, DurableStats::default()),
                    failure_reported: false,
                    last_wall_ms: 0,
                    connected: true,
                }
                .run(&source);
            })?;
        Ok(Storage {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Hands one item to the thread. Returns false if the thread is gone (it stopped after a
    /// panic; nothing more will be persisted).
    pub fn send(&self, item: Persist) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(item).is_ok())
    }

    /// Stops taking items; the thread writes what it has, sends its last [`Progress`]
    /// (`stopped`) and ends. Does not wait for it.
    pub fn close(&mut self) {
        self.tx = None;
    }

    /// Waits for the thread to end (after [`close`](Storage::close)); for tests and
    /// synchronous owners.
    pub fn join(mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Worker {
    log: DiskLog,
    rx: Receiver<Persist>,
    report: Box<dyn FnMut(Progress) + Send>,
    /// What was last reported (through, counters).
    reported: (u64, DurableStats),
    failure_reported: bool,
    /// Latest wall time of a record seen: the snapshot's.
    last_wall_ms: u64,
    connected: bool,
}

impl Worker {
    fn run(mut self, source: &dyn SnapshotSource) {
        while self.connected {
            let first = match self.log.poll_timeout() {
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    match self.rx.recv_timeout(wait) {
                        Ok(item) => Some(item),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            self.connected = false;
                            None
                        }
                    }
                }
                None => match self.rx.recv() {
                    Ok(item) => Some(item),
                    Err(_) => {
                        self.connected = false;
                        None
                    }
                },
            };
            self.take(first);
            if self.log.wants_compaction() && self.connected {
                self.compact(source);
            }
        }
        // Whatever was queued is written (a dropped handle is a stop, not a crash: the
        // records reached the thread).
        self.take(None);
        drop(self.rx);
        let progress = Progress {
            through: self.log.through(),
            failed: None,
            stats: self.log.stats(),
            stopped: true,
        };
        // The lock is released before the last report, so that a restart can open the
        // directory as soon as it is told.
        drop(self.log);
        (self.report)(progress);
    }

    /// Appends `first` and everything queued behind it, flushes once, reports.
    fn take(&mut self, first: Option<Persist>) {
        let mut mode = FlushMode::Policy;
        let mut next = first;
        loop {
            match next {
                Some(Persist::Append {
                    seq,
                    record,
                    origin,
                }) => {
                    self.last_wall_ms = self.last_wall_ms.max(record.wall_ms);
                    self.log.append(seq, &record, origin);
                }
                Some(Persist::SyncAll) => mode = FlushMode::SyncAll,
                None => {}
            }
            next = match self.rx.try_recv() {
                Ok(item) => Some(item),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.connected = false;
                    break;
                }
            };
        }
        let result = self.log.flush(Instant::now(), mode);
        self.send_progress(result.err());
    }

    /// Runs a compaction to its end, a chunk at a time, taking what arrives between chunks.
    fn compact(&mut self, source: &dyn SnapshotSource) {
        if self.log.start_compaction(self.last_wall_ms).is_err() {
            self.send_progress(None);
            return;
        }
        while let Ok(Compacting::More) = self.log.continue_compaction(source) {
            self.take(None);
            if !self.connected {
                // Stopping: the compaction is not finished; the old pair stays in use.
                self.log.abandon_compaction();
                break;
            }
        }
        self.send_progress(None);
    }

    fn send_progress(&mut self, error: Option<DurableError>) {
        let through = self.log.through();
        let stats = self.log.stats();
        let failed = match error {
            Some(e) if !self.failure_reported => {
                self.failure_reported = true;
                Some(e)
            }
            _ => None,
        };
        if failed.is_none() && self.reported.0 == through && self.reported.1 == stats {
            return;
        }
        self.reported = (through, stats.clone());
        (self.report)(Progress {
            through,
            failed,
            stats,
            stopped: false,
        });
    }
}
