//! chorus-sim: a deterministic, in-process simulated network for Chorus' sans-IO state machines.
//!
//! # What it does
//!
//! [`Sim`] runs N nodes, each owning one [`Machine`] (the real `chorus_protocol::Endpoint`, or
//! later the protocol + replication composite), over a **virtual clock** and a **seeded lossy
//! network**. Every node has a virtual address (`10.0.x.y:7400`, see [`node_addr`]);
//! [`Destination::Group`](chorus_protocol::Destination::Group) reaches every other node (never the
//! sender), [`Destination::Addr`](chorus_protocol::Destination::Addr) exactly one.
//!
//! Each directed link has its own independent loss, duplication, reordering, delay (base +
//! jitter) and corruption (bit flips or truncation), see [`LinkConfig`]. The network can be
//! partitioned and healed ([`Sim::partition`], [`Sim::heal`]); nodes can crash (their machine is
//! dropped and everything in flight to them is lost), restart with a fresh machine built by the
//! factory (a new incarnation), or join late ([`Sim::add_node`]).
//!
//! Machines are built by one factory closure `FnMut(&Spawn) -> M`, for the initial nodes,
//! restarts and late joiners alike. [`Spawn`] carries the node index and restart count (use it
//! for the incarnation), plus what a sans-IO machine needs to be built: the current virtual
//! time and a per-(node, restart) seed derived from the simulation seed.
//!
//! Everything is deterministic: the only randomness is one `u64` seed ([`SimConfig::seed`]) fed
//! to ChaCha8, events are ordered by `(virtual time, insertion counter)`, and the wall clock is
//! read exactly **once**, in [`Sim::new`], to obtain the virtual epoch `Instant` (std offers no
//! other way to build an `Instant`); from then on time only moves when the simulator moves it.
//! The same seed and the same test code produce the same [`Sim::digest`] and [`Sim::trace`].
//! Every run is bounded by [`SimConfig::max_events`] and by the deadline given to
//! [`Sim::run_until`] / [`Sim::run_for`]. A `Sim` dropped while its thread panics prints
//! `seed=...` and the replay variable ([`SEED_ENV`]).
//!
//! Tests read what a machine emitted either by reaching into it between steps
//! (`sim.node_mut(i).machine_mut()`), or by installing an observer
//! ([`Sim::set_observer`]) that the simulator calls, with the virtual time and node index, right
//! after every input it hands to a machine — the place to drain `poll_event` and record every
//! event of every node with the time it happened.
//!
//! [`forge`] builds frames a hostile peer sends (for tests that flood a node with them).
//!
//! # What it does not do
//!
//! No sockets, no tokio, no threads, no wall-clock reads after the epoch, no global RNG. It does
//! not model bandwidth, queueing, MTU limits or IP fragmentation: a datagram of any size is one
//! unit that arrives whole, corrupted, or not at all. It does not check any protocol invariant
//! itself; the tests in `tests/` do.

mod endpoint;
pub mod forge;
mod net;
mod seed;

pub use net::{
    DropReason, LinkConfig, NetStats, Node, NodeNetStats, Sim, SimConfig, Spawn, Step, StepKind,
    TraceEvent, node_addr,
};
pub use seed::{SEED_ENV, derive_seed, seed_from_env};

use std::net::SocketAddr;
use std::time::Instant;

/// A sans-IO state machine the simulator can drive (quinn-proto style).
///
/// The simulator calls `handle_*` with input, then drains `poll_transmit` until it returns
/// `None`, then reads `poll_timeout` and wakes the machine with `handle_timeout` once virtual
/// time reaches it. Commands (e.g. `send`) are issued by tests through [`Sim::act`] or
/// [`Sim::node_mut`], after which the simulator drains the machine's transmits the same way.
pub trait Machine {
    /// One datagram arrived from `from` at virtual time `now`.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]);
    /// The deadline last returned by [`Machine::poll_timeout`] has been reached.
    fn handle_timeout(&mut self, now: Instant);
    /// The next datagram to put on the (simulated) wire, if any.
    fn poll_transmit(&mut self, now: Instant) -> Option<chorus_protocol::Transmit>;
    /// When the machine next wants [`Machine::handle_timeout`] to be called.
    fn poll_timeout(&self) -> Option<Instant>;
}
