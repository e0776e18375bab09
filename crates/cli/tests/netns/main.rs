//! Multi-host proof in Linux network namespaces (docs/testing.md, "netns suite").
//!
//! Every scenario builds its own private lab with `tests/netns/lab.sh`: one namespace per node,
//! all of them plugged into a bridge that lives in a namespace of its own, so nothing is created
//! in, or sent from, the namespace the test runs in. Each node namespace runs a real
//! `chorus agent` process; its HTTP API listens on 127.0.0.1 *inside* that namespace and the test
//! reaches it over TCP connections opened from a thread that entered the namespace (`setns`).
//! Loss and partitions are kernel iptables rules inside the node namespaces; crashes are SIGKILL.
//! Every scenario ends by comparing full store dumps (`GET /v1/kv?prefix=`) of every node.
//!
//! The suite needs root, `ip`, `iptables` and `python3`; without them each test prints
//! `SKIP netns: ...` and passes, unless `CHORUS_NETNS_REQUIRED=1` is set (CI as root), which
//! turns the skip into a failure. Scenarios run one at a time (a process-wide lock): the machine
//! has two cores and five agents per scenario already keep them busy.//!
//! Layout: `lab` (the [`Lab`](lab::Lab) harness: namespaces, agents in them, HTTP through
//! `setns`), `kernel` (commands inside a namespace, iptables loss and partitions, the UDP probe
//! tool), `store` (store dumps, versions, members, counters),
//! `workload` (pipelined writes from several nodes, counter reports); this file holds the
//! scenarios.

mod kernel;
mod lab;
mod owned;
mod store;
mod workload;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use kernel::finish_udp_tool;
use lab::{AgentSpec, BROADCAST, CLUSTER, GROUP_V4, GROUP_V6, HTTP_ADDR, Lab, Transport, run};
use store::{DROP_COUNTERS, Store, Version, counter, counter_sum};
use workload::{Writes, report_counters, write_from};

/// The lab itself, without Chorus: IPv4 and IPv6 multicast and subnet broadcast cross the
/// bridge between namespaces, and an iptables rule really blocks multicast. When this fails,
/// the scenarios below cannot tell anything about Chorus.
#[test]
fn lab_plumbing() {
    let Some(lab) = Lab::new("plumbing", 3) else {
        return;
    };
    let probe = |group: &str, expect: u64| {
        let recv_args = ["recv", "--group", group, "--count", "5", "--timeout", "3"];
        let receivers: Vec<Child> = [2u8, 3]
            .iter()
            .map(|&node| lab.spawn_udp_tool(node, &recv_args))
            .collect();
        thread::sleep(Duration::from_millis(500));
        lab.udp_tool(1, &["send", "--group", group, "--count", "5"]);
        for receiver in receivers {
            // `recv` exits 1 when fewer than --count arrived; the summary says how many.
            let out = receiver
                .wait_with_output()
                .unwrap_or_else(|e| panic!("udp_tool recv: {e}"));
            let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "udp_tool recv: bad output ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
            let got = summary.get("received").and_then(Value::as_u64);
            assert_eq!(got, Some(expect), "{group}: datagrams received");
        }
        lab.log(&format!(
            "{group}: {expect} of 5 datagrams at each receiver"
        ));
    };
    probe(GROUP_V4, 5);
    probe(GROUP_V6, 5);
    probe(BROADCAST, 5);
    for node in [2u8, 3] {
        lab.iptables(node, "iptables", "-A INPUT -d 224.0.0.0/4 -j DROP");
    }
    probe(GROUP_V4, 0);
}

/// Five nodes on IPv4 multicast; 10 % and then 30 % kernel loss on every receiver; 2000 writes
/// from three writers. Every store ends identical and holds every write.
#[test]
fn scenario_loss() {
    let Some(mut lab) = Lab::new("loss", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();

    lab.set_loss(&nodes, 0.10);
    write_from(&mut lab, &[1, 2, 3], "loss10", 1000, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(90));

    let dropped_10 = lab.set_loss(&nodes, 0.30);
    write_from(&mut lab, &[1, 2, 3], "loss30", 1000, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(120));
    assert_eq!(expected.len(), 2000);

    let dropped_30 = lab.set_loss(&nodes, 0.0);
    assert!(
        dropped_10 > 0 && dropped_30 > dropped_10,
        "the kernel dropped {dropped_10} datagrams at 10 % and {dropped_30} at 30 %"
    );
    let naks: u64 = nodes
        .iter()
        .map(|&n| counter_sum(&lab.stats(n), &["nak"]))
        .sum();
    report_counters(
        &mut lab,
        &nodes,
        &["nak", "repair", "retrans", "lost", "sync"],
    );
    assert!(naks > 0, "30 % loss yet no NAK counted anywhere");
}

/// Five nodes, partition {1,2} | {3,4,5}, independent and conflicting writes on both sides;
/// after healing every node holds the last-writer-wins result.
#[test]
fn scenario_partition() {
    let Some(mut lab) = Lab::new("partition", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    let (side_a, side_b) = ([1u8, 2], [3u8, 4, 5]);
    // The writer of each side in the conflicts below.
    let (writer_a, writer_b) = (2u8, 5u8);
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 3], "base", 200, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));

    lab.partition(&side_a, &side_b);
    let mut view_a = expected.clone();
    let mut view_b = expected.clone();
    write_from(&mut lab, &[1], "side-a", 200, &mut view_a);
    write_from(&mut lab, &[4], "side-b", 200, &mut view_b);

    // The same 100 keys written on both sides, alternating which side writes first, the second
    // write 3 ms after the first. All namespaces share one clock, so the later write carries
    // the higher version: half the keys must go to each side.
    let mut put_versions: BTreeMap<(String, u8), Version> = BTreeMap::new();
    let mut later_write = BTreeMap::new();
    for i in 0..100 {
        let key = format!("conflict/{i:03}");
        let order = if i % 2 == 0 {
            [writer_a, writer_b]
        } else {
            [writer_b, writer_a]
        };
        for (n, writer) in order.into_iter().enumerate() {
            let value = format!("{}-{i}", if writer == writer_a { "a" } else { "b" });
            if n == 1 {
                thread::sleep(Duration::from_millis(3));
                later_write.insert(key.clone(), value.clone());
            }
            let version = lab.put_many(writer, &[(key.clone(), value.clone())])[0];
            put_versions.insert((key.clone(), writer), version);
            if writer == writer_a {
                view_a.insert(key.clone(), value);
            } else {
                view_b.insert(key.clone(), value);
            }
        }
    }
    // Deletes racing rewrites: on base/1/0..9 side A deletes and side B rewrites 5 ms later;
    // on base/1/10..19 side B rewrites and side A deletes 5 ms later. All namespaces share one
    // clock, so the later operation must win in both cases, tombstones included.
    let mut rewrite_wins = BTreeMap::new();
    let mut delete_wins = BTreeSet::new();
    for i in 0..20 {
        let key = format!("base/1/{i:06}");
        let value = format!("rewritten-by-b-{i}");
        if i < 10 {
            lab.delete(writer_a, &key);
            thread::sleep(Duration::from_millis(5));
            lab.put_many(writer_b, &[(key.clone(), value.clone())]);
            rewrite_wins.insert(key.clone(), value.clone());
        } else {
            lab.put_many(writer_b, &[(key.clone(), value.clone())]);
            thread::sleep(Duration::from_millis(5));
            lab.delete(writer_a, &key);
            delete_wins.insert(key.clone());
        }
        view_a.remove(&key);
        view_b.insert(key, value);
    }
    lab.await_stores(&side_a, &view_a, Duration::from_secs(30));
    lab.await_stores(&side_b, &view_b, Duration::from_secs(30));

    // Each side's dump reports the version its own PUT returned.
    let dump_a = lab.dump(side_a[0]);
    let dump_b = lab.dump(side_b[0]);
    for ((key, writer), version) in &put_versions {
        let dump = if *writer == writer_a {
            &dump_a
        } else {
            &dump_b
        };
        assert_eq!(
            dump.entries.get(key).map(|e| e.1),
            Some(*version),
            "{key}: the dump disagrees with the version PUT returned"
        );
    }
    // The expected result after healing: per key, the entry with the highest version of the two
    // sides; the delete races as decided above.
    let mut merged = BTreeMap::new();
    let keys: BTreeSet<&String> = dump_a.entries.keys().chain(dump_b.entries.keys()).collect();
    for key in keys {
        let winner = match (dump_a.entries.get(key), dump_b.entries.get(key)) {
            (Some(a), Some(b)) => std::cmp::max_by_key(a, b, |e| e.1),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => continue,
        };
        merged.insert(key.clone(), winner.0.clone());
    }
    for key in &delete_wins {
        merged.remove(key);
    }
    for (key, value) in &rewrite_wins {
        assert_eq!(
            merged.get(key),
            Some(value),
            "{key}: the later rewrite wins"
        );
    }
    let a_wins = (0..100)
        .filter(|i| merged.get(&format!("conflict/{i:03}")) == Some(&format!("a-{i}")))
        .count();
    lab.log(&format!(
        "conflicts by highest version: side A wins {a_wins} keys, side B {}",
        100 - a_wins
    ));
    for (key, value) in &later_write {
        assert_eq!(
            merged.get(key),
            Some(value),
            "{key}: the later write must carry the higher version"
        );
    }
    assert_eq!(
        a_wins, 50,
        "the sides alternate, so each must win half the keys"
    );

    lab.heal(&nodes);
    lab.await_stores(&nodes, &merged, Duration::from_secs(60));
    report_counters(&mut lab, &nodes, &["digests", "entries", "recover", "lost"]);
}

/// `kill -9` a node while two writers stream, restart it while they still do: it resyncs. Then 50 000 keys and a late
/// joiner that catches all of them up.
#[test]
fn scenario_restart_and_late_join() {
    let Some(mut lab) = Lab::new("restart", 4) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1], "before", 300, &mut expected);
    // Two writers stream 10 000 writes; node 3 dies in the middle and comes back while they
    // are still writing.
    let stream = Writes::start(&mut lab, &[1, 2], "stream", 10_000, &mut expected);
    thread::sleep(Duration::from_millis(300));
    let spec = lab.kill9(3);
    thread::sleep(Duration::from_millis(300));
    lab.start_agent(3, spec);
    assert!(
        !stream.is_finished(),
        "the writers finished before node 3 was back: not a mid-stream restart"
    );
    stream.finish(&mut lab);
    write_from(&mut lab, &[1], "after", 300, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    lab.await_health(3, Duration::from_secs(30));

    let bulk = 50_000 - expected.len();
    write_from(&mut lab, &[1, 2], "bulk", bulk, &mut expected);
    assert_eq!(expected.len(), 50_000);
    lab.await_stores(&nodes, &expected, Duration::from_secs(120));
    lab.add_node(5);
    let joined = Instant::now();
    lab.start_agent(5, AgentSpec::new(Transport::V4));
    lab.await_health(5, Duration::from_secs(120));
    let held = lab.dump(5).entries.len();
    lab.log(&format!(
        "node 5 reports in sync holding {held} of {} keys",
        expected.len()
    ));
    // /v1/health is what a load balancer or a deploy script waits for: 200 must mean the
    // late joiner already holds the cluster's state.
    assert_eq!(
        held,
        expected.len(),
        "node 5 answered /v1/health 200 before it held every key"
    );
    lab.await_stores(&[1, 2, 3, 4, 5], &expected, Duration::from_secs(120));
    lab.log(&format!(
        "late joiner holds all {} keys {:.1}s after it started",
        expected.len(),
        joined.elapsed().as_secs_f64()
    ));
    report_counters(&mut lab, &[5], &["digests", "entries", "requests", "lost"]);
}

/// The same cluster over IPv6 multicast (`ff15::77`), with 10 % loss.
#[test]
fn scenario_ipv6() {
    let Some(mut lab) = Lab::new("ipv6", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V6));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    lab.set_loss(&nodes, 0.10);
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 4], "v6", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    let dropped = lab.set_loss(&nodes, 0.0);
    assert!(
        dropped > 0,
        "ip6tables dropped nothing: the loss did not apply"
    );
}

/// Keys by default off the loopback: on eth0, an agent with neither a key nor `--insecure`
/// refuses to start and says how to make a key; agents given a key made by `chorus keygen`
/// form the cluster and replicate.
#[test]
fn scenario_keys_by_default() {
    let Some(mut lab) = Lab::new("keys", 2) else {
        return;
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns(1), env!("CARGO_BIN_EXE_chorus")])
        .args(["agent", "--cluster", CLUSTER, "--http", HTTP_ADDR])
        .args(["--group", GROUP_V4, "--iface", "eth0", "--ttl", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run an unkeyed agent: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "unkeyed agent on eth0: {stderr}"
    );
    for fix in ["chorus keygen", "--key-file", "--insecure"] {
        assert!(
            stderr.contains(fix),
            "the refusal does not say {fix:?}: {stderr}"
        );
    }
    lab.log("unkeyed agent on eth0 refused");

    let key = lab.dir.join("cluster.key");
    run(Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("keygen")
        .arg(&key));
    let nodes = [1u8, 2];
    for node in nodes {
        let mut spec = AgentSpec::new(Transport::V4);
        spec.keys = Some(key.clone());
        lab.start_agent(node, spec);
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 2], "keyed", 200, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));
}

/// Broadcast mode, then unicast peers with every multicast datagram dropped by iptables.
#[test]
fn scenario_broadcast_and_peers() {
    let Some(mut lab) = Lab::new("bcast", 4) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::Broadcast));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 3], "bcast", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    for node in nodes {
        lab.stop_agent(node);
    }

    for node in nodes {
        lab.iptables(node, "iptables", "-A INPUT -d 224.0.0.0/4 -j DROP");
        lab.iptables(node, "iptables", "-A OUTPUT -d 224.0.0.0/4 -j DROP");
    }
    lab.log("multicast blocked on every node");
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::Peers(nodes.to_vec())));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    // The restarted agents start empty (no persistence): only the new writes are expected.
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[2, 4], "peers", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
}

/// Hostile datagrams from an attacker namespace: random bytes, truncated, bit-flipped and
/// replayed real frames, frames of another cluster. Agents stay up, drops are counted by
/// reason, stores do not change, the cluster still replicates afterwards.
#[test]
fn scenario_hostile() {
    const ATTACKER: u8 = 9;
    const OBSERVER: u8 = 10;
    let Some(mut lab) = Lab::new("hostile", 3) else {
        return;
    };
    let nodes = [1u8, 2, 3];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    lab.add_node(ATTACKER);
    lab.add_node(OBSERVER);
    let capture = lab
        .dir
        .join("cluster-frames.hex")
        .to_string_lossy()
        .into_owned();
    let foreign = lab
        .dir
        .join("foreign-frames.hex")
        .to_string_lossy()
        .into_owned();

    // Real frames of the cluster, captured while it works.
    let capture_args = [
        "capture",
        "--group",
        GROUP_V4,
        "--count",
        "150",
        "--timeout",
        "10",
        "--out",
        &capture,
    ];
    let capturing = lab.spawn_udp_tool(OBSERVER, &capture_args);
    thread::sleep(Duration::from_millis(500));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 2], "before", 400, &mut expected);
    let captured = finish_udp_tool(capturing, &capture_args);
    lab.log(&format!("cluster frames: {captured}"));
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));

    // Frames of another cluster: a real agent with another --cluster, briefly. Its traffic hits
    // the cluster's group too.
    let foreign_args = [
        "capture",
        "--group",
        GROUP_V4,
        "--count",
        "30",
        "--timeout",
        "10",
        "--out",
        &foreign,
        "--from",
        "10.77.0.9",
    ];
    let capturing = lab.spawn_udp_tool(OBSERVER, &foreign_args);
    thread::sleep(Duration::from_millis(300));
    lab.start_agent(
        ATTACKER,
        AgentSpec {
            cluster: "intruder".to_owned(),
            transport: Transport::V4,
            keys: None,
        },
    );
    lab.put_many(ATTACKER, &[("intruder/key".to_owned(), "x".to_owned())]);
    let captured = finish_udp_tool(capturing, &foreign_args);
    lab.log(&format!("foreign cluster frames: {captured}"));
    lab.stop_agent(ATTACKER);

    let before: Vec<Store> = nodes.iter().map(|&n| lab.dump(n)).collect();
    let stats_before: Vec<BTreeMap<String, u64>> = nodes.iter().map(|&n| lab.stats(n)).collect();
    let sent = lab.udp_tool(
        ATTACKER,
        &[
            "attack",
            "--group",
            GROUP_V4,
            "--capture",
            &capture,
            "--foreign",
            &foreign,
            "--count",
            "3000",
            "--seed",
            "6",
        ],
    );
    lab.log(&format!("attack sent {sent}"));
    thread::sleep(Duration::from_secs(2));
    lab.assert_alive();
    for (i, &node) in nodes.iter().enumerate() {
        assert!(
            lab.dump(node) == before[i],
            "node {node}: the store changed under attack"
        );
        lab.await_health(node, Duration::from_secs(10));
        let after = lab.stats(node);
        let delta =
            |name: &str| counter(&after, name).saturating_sub(counter(&stats_before[i], name));
        let by_reason: Vec<String> = DROP_COUNTERS
            .iter()
            .chain(&["protocol_duplicates", "protocol_duplicate_fragments"])
            .filter(|name| delta(name) > 0)
            .map(|name| format!("{name}+{}", delta(name)))
            .collect();
        lab.log(&format!(
            "node {node}: during the attack {}",
            by_reason.join(" ")
        ));
        // Random bytes fail the magic, cut frames their length, flipped bits the CRC, the
        // intruder's frames the cluster id; replays are recognised as duplicates or as the
        // node's own datagrams.
        for reason in [
            "protocol_bad_magic",
            "protocol_truncated",
            "protocol_bad_checksum",
            "protocol_wrong_cluster",
        ] {
            assert!(delta(reason) > 0, "node {node}: {reason} did not grow");
        }
        let replays = delta("protocol_duplicates")
            + delta("protocol_duplicate_fragments")
            + delta("protocol_own_datagrams");
        assert!(replays > 0, "node {node}: no replayed frame recognised");
    }

    // The cluster still replicates.
    write_from(&mut lab, &[3], "after", 100, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));
}
