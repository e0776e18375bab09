//! chorus-sim: deterministic simulated network.
