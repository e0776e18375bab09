//! The whole public API, reached through `chorus::` alone: every type a public signature uses
//! is exported by the root crate, so an application needs no other Chorus crate. (This file
//! names no `chorus_*` crate; only tokio and the `Stream` traits come from elsewhere.) It
//! fails to compile when a signature starts using a type the root does not export.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;

use chorus::transport::{DatagramTransport, HubConfig, MemoryHub, MemoryTransport};
use chorus::{
    Bytes, Change, ClockCause, CoreCounters, Counters, DEFAULT_GROUP, DriverCounters, DurableError,
    DurableStats, Entry, Error, Fsync, Hlc, Interface, KEY_LEN, Key, KeyId, Keyring, KeyringError,
    MemberInfo, MemberState, Mode, Node, NodeBuilder, NodeId, Op, ParseFsyncError, Preset,
    ProtocolStats, ReplicaStats, ReplicationError, StoreCounters, TransportError, Version, Watch,
};

/// Every builder setting, by type.
fn builder(keyring: Keyring) -> NodeBuilder {
    let group: SocketAddr = DEFAULT_GROUP;
    Node::builder()
        .cluster("public-api")
        .group(group)
        .interface("127.0.0.1")
        .ttl(0)
        .mode(Mode::Multicast {
            group,
            interface: Interface::loopback_v4(),
            ttl: 0,
            loopback: true,
        })
        .node_id(NodeId(1))
        .preset(Preset::Lossy)
        .max_members(std::num::NonZeroUsize::new(16).expect("not zero"))
        .receive_budget_bytes(8 << 20)
        .fsync(Fsync::Interval(Duration::from_millis(10)))
        .keyring(keyring)
        .inject_receive_loss(0.0, 1)
}

/// Every error variant and what it carries, by type.
fn describe(e: &Error) -> String {
    match e {
        Error::Transport(t) => {
            let t: &TransportError = t;
            t.to_string()
        }
        Error::Replication(r) => {
            let r: &ReplicationError = r;
            r.to_string()
        }
        Error::Compacted { requested, oldest } => format!("{requested} {oldest}"),
        Error::Timeout(d) => format!("{d:?}"),
        Error::Closed => "closed".into(),
        Error::Durability(d) => {
            let d: &DurableError = d;
            d.to_string()
        }
        Error::Config(c) => c.clone(),
        Error::ClockAhead {
            offset_ms,
            bound_ms,
            cause,
        } => {
            let cause: ClockCause = *cause;
            format!("{offset_ms} {bound_ms} {cause:?}")
        }
        other => other.to_string(),
    }
}

/// Every counter type, by type.
fn figures(c: &Counters) -> u64 {
    let Counters {
        protocol,
        replication,
        core,
        durable,
        driver,
        store,
    } = c;
    let protocol: &ProtocolStats = protocol;
    let replication: &ReplicaStats = replication;
    let core: &CoreCounters = core;
    let durable: Option<&DurableStats> = durable.as_ref();
    let driver: &DriverCounters = driver;
    let store: &StoreCounters = store;
    protocol.heartbeats_sent
        + replication.local_writes
        + core.sync_dropped
        + durable.map_or(0, |d| d.fsyncs)
        + driver.send_errors
        + store.keys
}

/// Handles and watches move between tasks and sit in `select!` without pinning.
#[test]
fn handles_and_watches_are_send_sync_and_unpin() {
    fn check<T: Send + Sync + Unpin + 'static>() {}
    check::<Node>();
    check::<NodeBuilder>();
    check::<Watch>();
    check::<Counters>();
    check::<Error>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_api_through_chorus_alone() {
    let policy: Result<Fsync, ParseFsyncError> = "always".parse();
    assert_eq!(policy.ok(), Some(Fsync::Always));
    let key = Key::new(KeyId::new(1).expect("not zero"), [7; KEY_LEN]);
    let keyring = Keyring::single(key.clone());
    let refused: Result<Keyring, KeyringError> =
        Keyring::new(KeyId::new(2).expect("nz"), vec![key]);
    assert!(refused.is_err(), "the send key must be among the keys");
    // A builder set up for sockets, started over an in-memory network instead.
    let hub = MemoryHub::new(HubConfig::default()).expect("hub");
    let transport: MemoryTransport = hub
        .endpoint("10.7.0.1:7400".parse().expect("addr"))
        .expect("free");
    assert!(transport.max_datagram_size() > 0);
    let a: Node = builder(keyring.clone())
        .start_with_transport(transport)
        .await
        .expect("starts");
    let b = Node::builder()
        .cluster("public-api")
        .node_id(NodeId(2))
        .preset(Preset::Lossy)
        .keyring(keyring)
        .start_with_transport(
            hub.endpoint("10.7.0.2:7400".parse().expect("addr"))
                .expect("free"),
        )
        .await
        .expect("starts");
    assert_eq!(a.node_id(), NodeId(1));

    let mut watch: Watch = b.watch("api/");
    assert_eq!(watch.prefix(), "api/");
    let v1: Version = a.put("api/one", "1").await.expect("put");
    let _: Hlc = v1.hlc;
    let v2 = a
        .batch(vec![
            Op::put("api/two", Bytes::from_static(b"2")),
            Op::delete("api/one"),
        ])
        .await
        .expect("batch");
    a.delete("api/two").await.expect("delete");
    let mut seen: Vec<Change> = Vec::new();
    while seen.len() < 4 {
        let next = tokio::time::timeout(Duration::from_secs(20), watch.next())
            .await
            .expect("in time")
            .expect("running")
            .expect("no error");
        seen.push(next);
    }
    assert_eq!(seen[1].version, v2);
    assert_eq!(watch.revision(), seen[3].revision);
    let mut from = b.watch_from("api/", 0).await.expect("in the log");
    assert!(from.next().await.is_some());

    a.put("api/three", "3").await.expect("put");
    let entry: Entry = a.get("api/three").expect("written");
    assert_eq!(entry.value, "3");
    assert_eq!(a.scan("api/").len(), 1);
    assert!(a.revision() >= entry.revision);

    b.wait_in_sync(Duration::from_secs(20))
        .await
        .expect("in sync");
    assert!(b.is_in_sync());
    let members: Vec<MemberInfo> = b.members();
    let states: Vec<MemberState> = members.iter().map(|m| m.state).collect();
    assert!(states.contains(&MemberState::Local));
    tokio::time::sleep(Duration::from_millis(150)).await;
    let counters = a.counters();
    assert!(figures(&counters) > 0);
    assert_eq!(counters.get("store_keys"), Some(counters.store.keys));
    assert!(counters.iter().count() > 50);

    b.abort();
    a.shutdown().await.expect("shutdown");
    let closed = a.put("api/late", "x").await.expect_err("shut down");
    assert_eq!(describe(&closed), "closed");
}
