//! Workloads: pipelined writes from several nodes at once, and counter reports.

use std::collections::BTreeMap;
use std::io;
use std::thread;
use std::time::Instant;

use chorus_testkit::http::Connection;

use crate::lab::Lab;

/// A writer thread's result: node, its connection back, the responses.
pub(crate) type WriterResult = (u8, Connection, io::Result<Vec<(u16, Vec<u8>)>>);

/// Writes in flight: one thread per writer node, each on that node's connection.
pub(crate) struct Writes {
    pub(crate) writers: Vec<u8>,
    pub(crate) total: usize,
    pub(crate) start: Instant,
    pub(crate) threads: Vec<thread::JoinHandle<WriterResult>>,
}

impl Writes {
    /// Starts writing `total` distinct keys `prefix/<writer>/<i>`, split between the writers,
    /// all writers at the same time; records them in `expected`.
    pub(crate) fn start(
        lab: &mut Lab,
        writers: &[u8],
        prefix: &str,
        total: usize,
        expected: &mut BTreeMap<String, String>,
    ) -> Writes {
        let mut threads = Vec::new();
        for (j, &writer) in writers.iter().enumerate() {
            let count = total / writers.len() + usize::from(j < total % writers.len());
            let writes: Vec<(String, String)> = (0..count)
                .map(|i| {
                    (
                        format!("{prefix}/{writer}/{i:06}"),
                        format!("{prefix}-value-{writer}-{i}"),
                    )
                })
                .collect();
            expected.extend(writes.iter().cloned());
            let mut http = lab
                .agents
                .get_mut(&writer)
                .and_then(|a| a.http.take())
                .unwrap_or_else(|| panic!("node {writer}: not connected"));
            threads.push(thread::spawn(move || {
                let requests: Vec<(String, Vec<u8>)> = writes
                    .into_iter()
                    .map(|(k, v)| (format!("/v1/kv/{k}"), v.into_bytes()))
                    .collect();
                let result = http.pipeline("PUT", &requests);
                (writer, http, result)
            }));
        }
        Writes {
            writers: writers.to_vec(),
            total,
            start: Instant::now(),
            threads,
        }
    }

    /// Whether every writer is done.
    pub(crate) fn is_finished(&self) -> bool {
        self.threads.iter().all(thread::JoinHandle::is_finished)
    }

    /// Waits for the writers (each request is bounded by the connection's 30 s timeouts) and
    /// asserts that every write was accepted.
    pub(crate) fn finish(self, lab: &mut Lab) {
        for handle in self.threads {
            let (writer, http, result) = handle
                .join()
                .unwrap_or_else(|_| panic!("writer thread panicked"));
            let responses = result.unwrap_or_else(|e| panic!("node {writer}: writes failed: {e}"));
            for (status, body) in &responses {
                assert!(
                    *status < 300,
                    "node {writer}: PUT answered {status}: {}",
                    String::from_utf8_lossy(body)
                );
            }
            if let Some(agent) = lab.agents.get_mut(&writer) {
                agent.http = Some(http);
            }
        }
        let secs = self.start.elapsed().as_secs_f64();
        lab.log(&format!(
            "{} writes from nodes {:?} in {secs:.1}s ({:.0}/s)",
            self.total,
            self.writers,
            self.total as f64 / secs.max(1e-3)
        ));
    }
}

/// [`Writes::start`] then [`Writes::finish`].
pub(crate) fn write_from(
    lab: &mut Lab,
    writers: &[u8],
    prefix: &str,
    total: usize,
    expected: &mut BTreeMap<String, String>,
) {
    Writes::start(lab, writers, prefix, total, expected).finish(lab);
}

/// Prints the interesting counters of every listed node.
pub(crate) fn report_counters(lab: &mut Lab, nodes: &[u8], words: &[&str]) {
    for &node in nodes {
        let stats = lab.stats(node);
        let shown: Vec<String> = stats
            .iter()
            .filter(|(name, v)| **v > 0 && words.iter().any(|w| name.contains(w)))
            .map(|(name, v)| format!("{name}={v}"))
            .collect();
        lab.log(&format!("node {node} counters: {}", shown.join(" ")));
    }
}
