//! The driver under tokio's paused clock: it reads time only from tokio's clock, so a whole
//! node (over the in-memory transport) runs on virtual time. A shutdown drains (the peer has
//! every write before the goodbye), says goodbye and stops.

use std::net::SocketAddr;
use std::time::Duration;

use chorus::Node;
use chorus_transport::{HubConfig, MemoryHub};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 9, 1, i], 7500))
}

#[tokio::test(start_paused = true)]
async fn a_shutdown_drains_to_the_peer_under_paused_time() {
    let hub = MemoryHub::new(HubConfig {
        loss: 0.2,
        seed: 0x9a05ed,
        ..HubConfig::default()
    })
    .expect("hub");
    let mut nodes = Vec::new();
    for i in 1..=2u8 {
        let node = Node::builder()
            .cluster("paused")
            .node_id(chorus::NodeId(u64::from(i)))
            .start_with_transport(hub.endpoint(addr(i)).expect("endpoint"))
            .await
            .expect("node starts");
        nodes.push(node);
    }
    // Virtual time: these sleeps cost no real time.
    let mut met = false;
    for _ in 0..600 {
        if nodes.iter().all(|n| n.members().len() == 2) {
            met = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(met, "the two nodes never met");
    let started = tokio::time::Instant::now();
    for k in 0..100 {
        nodes[0]
            .put(format!("p/{k:03}"), format!("{k}"))
            .await
            .expect("put");
    }
    nodes[0].shutdown().await.expect("shutdown");
    let took = started.elapsed();
    // The drain waited until the peer had everything (20 % of the datagrams are lost on the
    // way and repaired by NAKs), well before its 3 s deadline.
    assert_eq!(
        nodes[1].scan("p/").len(),
        100,
        "after {took:?} of virtual time"
    );
    assert!(
        took < chorus_replication::DRAIN_MAX,
        "drain hit its deadline: {took:?}"
    );
    // The peer sees it leave (by its goodbye, or by failure detection if the goodbye was
    // among the lost datagrams).
    let mut left = false;
    for _ in 0..3000 {
        if nodes[1].members().len() == 1 {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left, "the peer never saw the node leave");
    nodes[1].shutdown().await.expect("shutdown");
}
