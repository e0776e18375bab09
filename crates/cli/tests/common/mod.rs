//! What the end-to-end tests of the `chorus` binary share beyond `chorus-testkit`: the binary
//! under test, a cluster of one's own on loopback multicast ([`Net`]) and its agents, and the
//! agent's HTTP API read as JSON ([`Api`]). Each test binary uses part of it.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;

use chorus_testkit::Agent;
use chorus_testkit::http::request;
use chorus_testkit::net::{free_tcp_port, random_group};
use serde_json::Value;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_chorus");

/// A loopback HTTP address on a port that was free a moment ago.
pub fn local_http() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_tcp_port()))
}

/// A cluster name and a loopback multicast group (TTL 0) no other test uses.
pub struct Net {
    pub cluster: String,
    pub group: SocketAddrV4,
}

impl Net {
    /// A cluster named `{tag}-{random}`.
    pub fn new(tag: &str) -> Net {
        let (r, group) = random_group();
        Net {
            cluster: format!("{tag}-{r:016x}"),
            group,
        }
    }

    /// The arguments of `chorus agent` as node `node` on this group (127.0.0.1, TTL 0), with
    /// its HTTP API on `http`, then `extra`.
    pub fn args(&self, node: u64, http: SocketAddr, extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--cluster",
            &self.cluster,
            "--group",
            &self.group.to_string(),
            "--iface",
            "127.0.0.1",
            "--ttl",
            "0",
            "--node-id",
            &node.to_string(),
            "--http",
            &http.to_string(),
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_string()));
        args
    }

    /// Starts node `node` (with `extra` arguments) on a fresh HTTP port and waits until its
    /// API answers.
    pub fn agent(&self, node: u64, extra: &[&str]) -> Agent {
        self.agent_of(BIN, node, extra)
    }

    /// [`Net::agent`] with another `chorus` binary (e.g. a release build).
    pub fn agent_of(&self, bin: &str, node: u64, extra: &[&str]) -> Agent {
        let http = local_http();
        spawn_agent_of(bin, &self.args(node, http, extra), http)
    }
}

/// The `chorus` command with `args`, logging at `info`, never inheriting a key file from the
/// environment the tests run in.
pub fn agent_command(bin: &str, args: &[String]) -> Command {
    let mut command = Command::new(bin);
    command
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("CHORUS_KEY_FILE");
    command
}

/// Starts `chorus` with `args` (an `agent` command whose HTTP API listens on `http`) and waits
/// until the API answers.
pub fn spawn_agent(args: &[String], http: SocketAddr) -> Agent {
    spawn_agent_of(BIN, args, http)
}

/// [`spawn_agent`] with another `chorus` binary.
pub fn spawn_agent_of(bin: &str, args: &[String], http: SocketAddr) -> Agent {
    Agent::spawn(agent_command(bin, args), http)
}

/// The agent's HTTP API, read as its tests read it.
pub trait Api {
    /// `method path` with `body`: status and body.
    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>);

    /// `GET path`: status and body.
    fn get(&self, path: &str) -> (u16, Vec<u8>) {
        self.call("GET", path, b"")
    }

    /// `PUT /v1/kv/{key}` with `value`; panics unless the status is 200.
    fn put(&self, key: &str, value: &str) {
        let (status, body) = self.call("PUT", &format!("/v1/kv/{key}"), value.as_bytes());
        assert_eq!(status, 200, "PUT {key}: {}", String::from_utf8_lossy(&body));
    }

    /// `DELETE /v1/kv/{key}`; panics unless the status is 200.
    fn delete(&self, key: &str) {
        let (status, body) = self.call("DELETE", &format!("/v1/kv/{key}"), b"");
        assert_eq!(
            status,
            200,
            "DELETE {key}: {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// `GET path` as JSON; panics unless the status is 200.
    fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(
            status,
            200,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("JSON body")
    }

    /// Counter `name` of `/v1/stats`; panics if there is none.
    fn counter(&self, name: &str) -> u64 {
        self.json("/v1/stats")["counters"][name]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {name}"))
    }

    /// Node ids of the other members, sorted.
    fn member_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.json("/v1/members")["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] != "self")
            .map(|m| m["node_id"].as_u64().unwrap())
            .collect();
        ids.sort_unstable();
        ids
    }

    /// The value of `key`, if the agent holds it.
    fn value(&self, key: &str) -> Option<Vec<u8>> {
        let (status, body) = self.get(&format!("/v1/kv/{key}"));
        (status == 200).then_some(body)
    }
}

impl Api for Agent {
    fn call(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        request(self.http, method, path, &[], body)
    }
}
