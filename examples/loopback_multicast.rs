//! Two transports exchange a bounded number of IPv4 multicast datagrams over the
//! loopback (interface 127.0.0.1, TTL 0: nothing leaves this host) and print
//! what each received. Exits by itself within a few seconds.
//!
//! ```text
//! cargo run --example loopback_multicast
//! ```

use std::time::Duration;

use chorus_transport::{DatagramTransport, Outgoing, Received, TransportConfig, UdpTransport};

const ROUNDS: usize = 5;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let group = "239.255.77.7:47400".parse()?;
    // Both bind 0.0.0.0:47400 (SO_REUSEPORT) and join the group on `lo`.
    let alice = UdpTransport::bind(TransportConfig::loopback_multicast(group))?;
    let bob = UdpTransport::bind(TransportConfig::loopback_multicast(group))?;
    println!(
        "group {group} on `{}`; GSO up to {} datagrams per send, GRO up to {}",
        alice.interface().map_or("?", |i| i.name.as_str()),
        alice.max_gso_segments(),
        alice.gro_segments()
    );

    let batch = |who: &str| -> Vec<Outgoing> {
        (0..ROUNDS)
            .map(|i| Outgoing::to_group(format!("{who} says hello #{i}")))
            .collect()
    };
    alice.send_batch(&batch("alice")).await?;
    bob.send_batch(&batch("bob")).await?;

    // Multicast loopback is on, so each also hears itself: 2 × ROUNDS each.
    for (name, node) in [("alice", &alice), ("bob", &bob)] {
        let got = receive(node, 2 * ROUNDS, Duration::from_secs(3)).await?;
        println!("{name} received {} datagrams:", got.len());
        for d in &got {
            println!(
                "  {:<22} from {} to {} ({})",
                String::from_utf8_lossy(&d.payload),
                d.source,
                d.destination.map_or("?".to_owned(), |ip| ip.to_string()),
                if d.via_group { "group" } else { "unicast" },
            );
        }
    }
    Ok(())
}

/// Receives until `want` datagrams arrived or `limit` passed.
async fn receive(
    node: &UdpTransport,
    want: usize,
    limit: Duration,
) -> Result<Vec<Received>, chorus_transport::TransportError> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < want {
        match tokio::time::timeout_at(deadline, node.recv_batch(&mut got, want)).await {
            Ok(result) => {
                result?;
            }
            Err(_) => {
                eprintln!("timed out with {} of {want} datagrams", got.len());
                break;
            }
        }
    }
    Ok(got)
}
