//! The `chorus` binary.
fn main() {}
