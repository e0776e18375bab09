//! The agent's members API end to end, on loopback multicast: node names (`--node-name`) in
//! `/v1/members`, `chorus members` and the metrics labels; self's real address; and
//! `/v1/members/watch` as server-sent events (a snapshot, then joined and left).

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use chorus_testkit::wait_until;
use serde_json::Value;

mod common;

use common::{Api, BIN, Net};

/// An open `GET /v1/members/watch` on `agent`, read event by event.
struct EventStream {
    stream: TcpStream,
    buffer: String,
}

impl EventStream {
    fn open(agent: &chorus_testkit::Agent) -> EventStream {
        let mut stream = TcpStream::connect(agent.http).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        write!(
            stream,
            "GET /v1/members/watch HTTP/1.1\r\nHost: {}\r\n\r\n",
            agent.http
        )
        .unwrap();
        EventStream {
            stream,
            buffer: String::new(),
        }
    }

    /// The data of the next event of type `kind` (skipping others), within `timeout`.
    fn next_of(&mut self, kind: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        let marker = format!("event: {kind}\ndata: ");
        loop {
            if let Some(at) = self.buffer.find(&marker) {
                let rest = &self.buffer[at + marker.len()..];
                if let Some(end) = rest.find('\n') {
                    let data: Value = serde_json::from_str(&rest[..end]).unwrap();
                    self.buffer = rest[end..].to_owned();
                    return data;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {kind} event within {timeout:?}; got:\n{}",
                self.buffer
            );
            let mut buf = [0u8; 4096];
            match self.stream.read(&mut buf) {
                Ok(0) => panic!("event stream closed; got:\n{}", self.buffer),
                Ok(n) => self.buffer.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("reading the event stream: {e}"),
            }
        }
    }
}

#[test]
fn members_carry_names_and_real_addresses_and_changes_stream_as_events() {
    let net = Net::new("members");
    let a = net.agent(1, &["--node-name", "alpha"]);
    let mut events = EventStream::open(&a);
    let snapshot = events.next_of("members", Duration::from_secs(10));
    assert_eq!(snapshot["node_name"], "alpha");
    let me = &snapshot["members"][0];
    assert_eq!(
        (me["node_id"].as_u64(), me["state"].as_str()),
        (Some(1), Some("self"))
    );
    assert_eq!(me["name"], "alpha");
    let addr = me["addr"].as_str().unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "self's address: {addr}");

    let mut b = net.agent(2, &["--node-name", "bravo"]);
    let joined = events.next_of("joined", Duration::from_secs(20));
    assert_eq!(
        (joined["node_id"].as_u64(), joined["name"].as_str()),
        (Some(2), Some("bravo"))
    );
    assert!(joined["addr"].as_str().unwrap().starts_with("127.0.0.1:"));
    let incarnation = joined["incarnation"].as_u64().unwrap();

    // The list, the CLI and the metrics show the names.
    let listed = a.json("/v1/members");
    let names: Vec<(u64, &str)> = listed["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["node_id"].as_u64().unwrap(), m["name"].as_str().unwrap()))
        .collect();
    assert_eq!(names, [(1, "alpha"), (2, "bravo")]);
    let out = Command::new(BIN)
        .arg("members")
        .env("CHORUS_AGENT", a.url())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.lines().next().unwrap().contains("NAME"), "{text}");
    assert!(text.contains("alpha") && text.contains("bravo"), "{text}");
    wait_until("bravo's clock offset", Duration::from_secs(10), || {
        let (_, body) = a.get("/metrics");
        String::from_utf8_lossy(&body)
            .contains("chorus_member_clock_offset_ms{node=\"2\",name=\"bravo\"}")
    });

    // A graceful stop: `left`, by goodbye, with the name it had.
    let pid = b.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let left = events.next_of("left", Duration::from_secs(15));
    assert_eq!(
        (
            left["node_id"].as_u64(),
            left["name"].as_str(),
            left["reason"].as_str(),
            left["incarnation"].as_u64()
        ),
        (Some(2), Some("bravo"), Some("goodbye"), Some(incarnation))
    );
    let _ = b.child.wait();

    // Bad input: the watch takes no parameters; a bad name does not start an agent.
    let (status, body) = a.get("/v1/members/watch?from=3");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let out = Command::new(BIN)
        .args(net.args(3, common::local_http(), &["--node-name", "two\nlines"]))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--node-name"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
