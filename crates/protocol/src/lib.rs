//! chorus-protocol: sans-IO reliable multicast.
