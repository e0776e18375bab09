//! Counters of what the network did, in total and per node.

/// Counters of everything the network did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Transmits taken from machines.
    pub datagrams_sent: u64,
    /// Payload bytes of those transmits.
    pub bytes_sent: u64,
    /// Per-receiver copies attempted (a group transmit to N-1 peers counts N-1).
    pub copies: u64,
    /// Copies handed to a machine (duplicates included).
    pub delivered: u64,
    /// Copies lost at random on the wire ([`LinkConfig::loss`](crate::LinkConfig::loss)).
    pub lost: u64,
    /// Transmits of which at least one copy was lost at random (a datagram "lost on the wire"
    /// from the sender's point of view, however many receivers missed it).
    pub datagrams_with_loss: u64,
    /// Copies dropped by a partition.
    pub blocked: u64,
    /// Copies dropped because the receiver was down at send or arrival time.
    pub to_down_node: u64,
    /// Transmits to an address no node has.
    pub unknown_destination: u64,
    /// Extra copies created by duplication.
    pub duplicated: u64,
    /// Copies given an extra reordering delay.
    pub reordered: u64,
    /// Copies corrupted (bit flips or truncation).
    pub corrupted: u64,
    /// `handle_timeout` calls.
    pub timeouts: u64,
    /// Crashes.
    pub crashes: u64,
    /// Machine starts (first starts, restarts and late joins).
    pub starts: u64,
}

/// Network counters of one node (over all its lives).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetStats {
    /// Transmits this node put on the network.
    pub datagrams_sent: u64,
    /// Per-receiver copies of those transmits.
    pub copies_sent: u64,
    /// Copies of this node's transmits lost at random on the wire.
    pub copies_lost: u64,
    /// This node's transmits of which at least one copy was lost at random.
    pub datagrams_with_loss: u64,
    /// Datagrams handed to this node's machine.
    pub datagrams_received: u64,
}
