//! Owned (ephemeral) keys across namespaces: `PUT /v1/kv/{key}?owned=true` on one node, then
//! the owner is killed (`kill -9`: the key is gone on every other node within the leave
//! timeout + 1 s), stopped gracefully (gone at once), and partitioned away (gone on the other
//! side, back when it heals). Node names and self's real address ride along.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::{AgentSpec, Lab, Transport};

/// The LAN preset's `leave_after`: silence after which a member is declared gone.
const LEAVE_AFTER: Duration = Duration::from_secs(5);

/// Puts `key` = `value` on `node` as an owned key.
fn put_owned(lab: &mut Lab, node: u8, key: &str, value: &str) {
    let (status, body) = lab.http(
        node,
        "PUT",
        &format!("/v1/kv/{key}?owned=true"),
        value.as_bytes(),
    );
    assert_eq!(
        status,
        200,
        "node {node}: PUT {key}?owned=true: {}",
        String::from_utf8_lossy(&body)
    );
}

fn holds(lab: &mut Lab, node: u8, key: &str) -> bool {
    lab.dump(node).entries.contains_key(key)
}

/// Waits until every node of `nodes` holds `key` (`present`) or not; returns how long it
/// took, or panics after `timeout`.
fn await_key(lab: &mut Lab, nodes: &[u8], key: &str, present: bool, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let pending: Vec<u8> = nodes
            .iter()
            .copied()
            .filter(|&n| holds(lab, n, key) != present)
            .collect();
        if pending.is_empty() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{key} still {} on nodes {pending:?} after {timeout:?}",
            if present { "missing" } else { "present" }
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to `node`'s agent; waits (at most 10 s) for it to exit.
fn terminate(lab: &mut Lab, node: u8) {
    let mut agent = lab
        .agents
        .remove(&node)
        .unwrap_or_else(|| panic!("no agent on node {node}"));
    let pid = agent.child.id().to_string();
    let sent = Command::new("kill").args(["-TERM", &pid]).status();
    assert!(
        matches!(sent, Ok(s) if s.success()),
        "kill -TERM {pid}: {sent:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = agent.child.kill();
            panic!("node {node} ignored SIGTERM\n{}", lab.log_tail(node));
        }
        thread::sleep(Duration::from_millis(20));
    }
    lab.log(&format!("node {node}: SIGTERM, exited"));
}

#[test]
fn scenario_owned_keys() {
    let Some(mut lab) = Lab::new("owned", 3) else {
        return;
    };
    let nodes = [1u8, 2, 3];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));

    // Bound to 0.0.0.0 on eth0, a node shows the address it sends from; peers know its name
    // (the lab's agents run with the host's name).
    let members = lab.get_json(1, "/v1/members");
    let me = &members["members"][0];
    assert_eq!(me["state"], "self");
    let addr = me["addr"].as_str().unwrap_or_default().to_owned();
    assert!(
        addr.starts_with(&format!("{}:", Lab::addr(1))),
        "self's address {addr} is not eth0's {}",
        Lab::addr(1)
    );
    assert!(members["members"][1]["name"].is_string(), "{members}");

    // kill -9: gone everywhere else within the leave timeout + 1 s.
    put_owned(&mut lab, 3, "svc/n3", "10.0.0.3:80");
    await_key(&mut lab, &nodes, "svc/n3", true, Duration::from_secs(10));
    let killed = Instant::now();
    lab.kill9(3);
    let took = await_key(
        &mut lab,
        &[1, 2],
        "svc/n3",
        false,
        LEAVE_AFTER + Duration::from_secs(3),
    );
    let since_kill = killed.elapsed();
    lab.log(&format!(
        "kill -9 of the owner: its key gone on nodes 1 and 2 {:.2}s later",
        since_kill.as_secs_f64()
    ));
    assert!(
        since_kill <= LEAVE_AFTER + Duration::from_secs(1),
        "the key outlived its owner by {since_kill:?} (waited {took:?})"
    );

    // A graceful stop: gone at once.
    put_owned(&mut lab, 2, "svc/n2", "10.0.0.2:80");
    await_key(&mut lab, &[1, 2], "svc/n2", true, Duration::from_secs(10));
    let stopped = Instant::now();
    terminate(&mut lab, 2);
    await_key(&mut lab, &[1], "svc/n2", false, Duration::from_secs(3));
    lab.log(&format!(
        "graceful stop of the owner: its key gone on node 1 {:.2}s after SIGTERM",
        stopped.elapsed().as_secs_f64()
    ));
    assert!(
        stopped.elapsed() < LEAVE_AFTER,
        "the key went only with the failure detector"
    );

    // A partition: the owner's key goes on the other side, and comes back when it heals.
    lab.start_agent(2, AgentSpec::new(Transport::V4));
    lab.start_agent(3, AgentSpec::new(Transport::V4));
    lab.await_members(&nodes, Duration::from_secs(20));
    put_owned(&mut lab, 1, "svc/n1", "10.0.0.1:80");
    await_key(&mut lab, &nodes, "svc/n1", true, Duration::from_secs(10));
    lab.partition(&[1], &[2, 3]);
    await_key(
        &mut lab,
        &[2, 3],
        "svc/n1",
        false,
        LEAVE_AFTER + Duration::from_secs(5),
    );
    assert!(holds(&mut lab, 1, "svc/n1"), "the owner lost its own key");
    lab.heal(&nodes);
    let healed = Instant::now();
    await_key(&mut lab, &nodes, "svc/n1", true, Duration::from_secs(30));
    lab.log(&format!(
        "partition healed: the owner's key back everywhere {:.2}s later",
        healed.elapsed().as_secs_f64()
    ));
    lab.assert_alive();
}
