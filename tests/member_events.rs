//! `Node::member_events` over the in-memory network under tokio's paused clock: a node sees
//! peers join, restart, fall silent (suspected, then gone) and say goodbye, each event with
//! the member's id, incarnation, name and address; `members()` shows names and real
//! addresses.

use std::net::SocketAddr;
use std::time::Duration;

use chorus::{LeaveReason, MemberEvent, MemberEventKind, MemberEvents, Node, NodeId};
use chorus_transport::{HubConfig, MemoryHub};
use futures_util::StreamExt;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 9, 2, i], 7500))
}

async fn start(hub: &MemoryHub, id: u64, name: &str, at: u8) -> Node {
    Node::builder()
        .cluster("member-events")
        .node_id(NodeId(id))
        .node_name(name)
        .start_with_transport(hub.endpoint(addr(at)).expect("free address"))
        .await
        .expect("node starts")
}

/// The next event, within 30 s of virtual time.
async fn next(events: &mut MemberEvents) -> MemberEvent {
    tokio::time::timeout(Duration::from_secs(30), events.next())
        .await
        .expect("an event within 30 s")
        .expect("the node is running")
        .expect("no lag")
}

fn own_incarnation(node: &Node) -> u64 {
    node.members()
        .into_iter()
        .find(|m| m.node_id == node.node_id())
        .expect("a node lists itself")
        .incarnation
}

#[tokio::test(start_paused = true)]
async fn a_node_sees_joins_restarts_timeouts_and_goodbyes_with_names() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let a = start(&hub, 1, "alpha", 1).await;
    let mut events = a.member_events();

    // B joins.
    let b = start(&hub, 2, "bravo", 2).await;
    let joined = next(&mut events).await;
    assert_eq!(
        joined,
        MemberEvent {
            kind: MemberEventKind::Joined,
            node_id: NodeId(2),
            incarnation: own_incarnation(&b),
            name: Some("bravo".into()),
            addr: addr(2),
        }
    );
    let members = a.members();
    let names: Vec<(u64, Option<&str>, SocketAddr)> = members
        .iter()
        .map(|m| (m.node_id.0, m.name.as_deref(), m.addr))
        .collect();
    assert_eq!(
        names,
        [(1, Some("alpha"), addr(1)), (2, Some("bravo"), addr(2))]
    );

    // B crashes and comes back at once with a new incarnation (and another name and address).
    let first_life = own_incarnation(&b);
    b.abort();
    let b = start(&hub, 2, "bravo-2", 3).await;
    let restarted = next(&mut events).await;
    assert_eq!(
        restarted.kind,
        MemberEventKind::Restarted {
            previous: first_life
        }
    );
    assert_eq!(restarted.incarnation, own_incarnation(&b));
    assert!(restarted.incarnation > first_life);
    assert_eq!(restarted.name.as_deref(), Some("bravo-2"));
    assert_eq!(restarted.addr, addr(3));

    // B crashes for good: suspected, then gone, still named.
    let second_life = own_incarnation(&b);
    b.abort();
    let suspected = next(&mut events).await;
    assert_eq!(
        (suspected.kind, suspected.node_id, suspected.incarnation),
        (MemberEventKind::Suspected, NodeId(2), second_life)
    );
    assert_eq!(suspected.name.as_deref(), Some("bravo-2"));
    let left = next(&mut events).await;
    assert_eq!(left.kind, MemberEventKind::Left(LeaveReason::Timeout));
    assert_eq!((left.node_id, left.incarnation), (NodeId(2), second_life));
    assert_eq!(
        (left.name.as_deref(), left.addr),
        (Some("bravo-2"), addr(3))
    );
    assert_eq!(a.members().len(), 1);

    // C joins and says goodbye.
    let c = start(&hub, 3, "charlie", 4).await;
    let joined = next(&mut events).await;
    assert_eq!(
        (joined.kind, joined.node_id),
        (MemberEventKind::Joined, NodeId(3))
    );
    let c_life = own_incarnation(&c);
    c.shutdown().await.expect("shutdown");
    let left = next(&mut events).await;
    assert_eq!(left.kind, MemberEventKind::Left(LeaveReason::Goodbye));
    assert_eq!(
        (
            left.node_id,
            left.incarnation,
            left.name.as_deref(),
            left.addr
        ),
        (NodeId(3), c_life, Some("charlie"), addr(4))
    );

    // The stream ends when the node stops.
    a.shutdown().await.expect("shutdown");
    assert!(events.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_node_without_a_name_asked_for_uses_the_host_name_and_a_bad_name_is_refused() {
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let node = Node::builder()
        .start_with_transport(hub.endpoint(addr(1)).expect("free address"))
        .await
        .expect("node starts");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| chorus::NodeName::new(h).is_ok());
    assert_eq!(node.node_name(), host.as_deref());
    assert_eq!(node.members()[0].name.as_deref(), host.as_deref());
    node.shutdown().await.expect("shutdown");
    for bad in ["", "two\nlines", &"x".repeat(chorus::MAX_NODE_NAME + 1)] {
        let err = Node::builder()
            .node_name(bad)
            .start_with_transport(hub.endpoint(addr(2)).expect("free address"))
            .await
            .expect_err("a bad name is refused");
        assert!(matches!(err, chorus::Error::Config(_)), "{bad:?}: {err}");
    }
}
