//! chorus-replication: sans-IO replicated key-value store.
