//! The configuration of a simulation run.

use super::links::LinkConfig;

/// Configuration of a [`Sim`]. Built with [`SimConfig::new`] and the `with_*` methods.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The one seed every random choice of the run flows from.
    pub seed: u64,
    /// Nodes started at virtual time zero (indices `0..nodes`).
    pub nodes: usize,
    /// The link behaviour of every directed link without an override ([`Sim::set_link`]).
    pub link: LinkConfig,
    /// Hard bound on the number of events processed over the whole run; once reached every
    /// run function stops and [`Sim::budget_exhausted`] is true.
    pub max_events: u64,
    /// Bound on transmits drained from one machine after one input; protects the run from a
    /// machine that never stops transmitting (the rest is drained after its next input).
    pub max_transmits_per_poll: usize,
    /// Whether to keep a full [`TraceEvent`] log (the [`Sim::digest`] is always kept).
    pub record_trace: bool,
}

impl SimConfig {
    /// `nodes` nodes on LAN links, seeded with `seed`, at most 10 million events, no trace.
    #[must_use]
    pub fn new(seed: u64, nodes: usize) -> SimConfig {
        SimConfig {
            seed,
            nodes,
            link: LinkConfig::lan(),
            max_events: 10_000_000,
            max_transmits_per_poll: 10_000,
            record_trace: false,
        }
    }

    /// This config with default link behaviour `link`.
    #[must_use]
    pub fn with_link(mut self, link: LinkConfig) -> SimConfig {
        self.link = link;
        self
    }

    /// This config with event budget `max_events`.
    #[must_use]
    pub fn with_max_events(mut self, max_events: u64) -> SimConfig {
        self.max_events = max_events;
        self
    }

    /// This config recording (or not) a full trace.
    #[must_use]
    pub fn with_trace(mut self, record_trace: bool) -> SimConfig {
        self.record_trace = record_trace;
        self
    }
}
