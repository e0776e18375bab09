//! Chorus: reliable-multicast state replication.
