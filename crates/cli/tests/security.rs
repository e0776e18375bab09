//! Security end to end: real `chorus agent` processes with a cluster key on loopback multicast
//! (127.0.0.1, TTL 0, a random group and port per test) against outsiders on the same group: an
//! agent without the key, an agent with the wrong key, a raw socket that floods garbage and
//! replays captured datagrams, and a raw receiver that looks for plaintext. Every wait and every
//! send loop is bounded; agents are killed when their guard drops.

#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chorus_testkit::http::request as http;
use chorus_testkit::net::free_tcp_port;
use chorus_testkit::{Agent, Ready, temp_dir, wait_until};
use socket2::{Domain, Protocol, Socket, Type};

mod common;

use common::{Api, BIN, Net, agent_command, local_http};

/// A socket on the group (loopback only, TTL 0) that sees every datagram and can send.
fn raw_socket(net: &Net) -> UdpSocket {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_address(true).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&SocketAddr::from((*net.group.ip(), net.group.port())).into())
        .unwrap();
    s.join_multicast_v4(net.group.ip(), &Ipv4Addr::LOCALHOST)
        .unwrap();
    s.set_multicast_if_v4(&Ipv4Addr::LOCALHOST).unwrap();
    s.set_multicast_ttl_v4(0).unwrap();
    s.set_multicast_loop_v4(true).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    s.into()
}

fn keygen(path: &Path, id: u16) {
    let out = Command::new(BIN)
        .args(["keygen", "--id", &id.to_string()])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Collects every datagram on the group until stopped (bounded to 60 s and 100 000 datagrams).
fn capture(sock: UdpSocket) -> (Arc<AtomicBool>, std::thread::JoinHandle<Vec<Vec<u8>>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = vec![0u8; 65_536];
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline && out.len() < 100_000 {
            if let Ok(n) = sock.recv(&mut buf) {
                out.push(buf[..n].to_vec());
            }
        }
        out
    });
    (stop, handle)
}

#[test]
fn keyed_cluster_refuses_outsiders_shows_nothing_and_rejects_replays() {
    let dir = temp_dir("sec");
    let key = dir.path().join("cluster.key");
    let wrong = dir.path().join("wrong.key");
    keygen(&key, 1);
    keygen(&wrong, 1); // the same key id, another secret
    let key_arg = key.to_str().unwrap();
    let net = Net::new("sec");

    // A raw receiver on the group from the start.
    let (stop, captured) = capture(raw_socket(&net));

    let a = net.agent(1, &["--key-file", key_arg]);
    let b = net.agent(2, &["--key-file", key_arg]);
    wait_until("A and B see each other", Duration::from_secs(20), || {
        a.member_ids() == vec![2] && b.member_ids() == vec![1]
    });
    assert!(
        a.log_text().contains("authenticated and encrypted"),
        "{}",
        a.log_text()
    );

    // A value known to be written.
    let secret = format!("TOPSECRET-{:016x}", rand::random::<u64>());
    let (status, _) = http(a.http, "PUT", "/v1/kv/app/secret", &[], secret.as_bytes());
    assert_eq!(status, 200);
    wait_until("B has the value", Duration::from_secs(20), || {
        b.value("app/secret").as_deref() == Some(secret.as_bytes())
    });

    // Outsiders: an agent without a key, writing; an agent with the wrong key, writing.
    let mut nokey = net.agent(3, &[]);
    let mut wrongkey = net.agent(4, &["--key-file", wrong.to_str().unwrap()]);
    assert!(
        nokey.log_text().contains("no cluster key"),
        "{}",
        nokey.log_text()
    );
    for (agent, key) in [(&nokey, "app/evil-plain"), (&wrongkey, "app/evil-wrong")] {
        let (status, _) = http(agent.http, "PUT", &format!("/v1/kv/{key}"), &[], b"pwned");
        assert_eq!(status, 200);
    }
    // A raw attacker: garbage, truncated and forged headers with random key ids (bounded).
    let attacker = raw_socket(&net);
    let to = SocketAddr::from(net.group);
    for i in 0..2_000u32 {
        let mut d: Vec<u8> = (0..(i % 200) as usize).map(|_| rand::random()).collect();
        if i % 2 == 0 && d.len() >= 48 {
            d[..5].copy_from_slice(b"CHRS\x01");
            d[6..8].copy_from_slice(&((i % 4) as u16).to_be_bytes());
        }
        let _ = attacker.send_to(&d, to);
        if i % 200 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Let the outsiders run well past a heartbeat round and the liveness timeouts' start.
    std::thread::sleep(Duration::from_secs(3));

    for (agent, other) in [(&a, 2u64), (&b, 1u64)] {
        assert_eq!(agent.member_ids(), vec![other], "membership changed");
        assert_eq!(
            agent.value("app/evil-plain"),
            None,
            "injected write accepted"
        );
        assert_eq!(
            agent.value("app/evil-wrong"),
            None,
            "injected write accepted"
        );
        assert!(agent.counter("protocol_unauthenticated") > 0);
        assert!(agent.counter("protocol_auth_failed") > 0);
    }
    assert!(
        nokey.member_ids().is_empty(),
        "the keyless agent saw members"
    );
    assert!(
        wrongkey.member_ids().is_empty(),
        "the wrong-key agent saw members"
    );
    assert_eq!(nokey.value("app/secret"), None);
    assert_eq!(wrongkey.value("app/secret"), None);
    // The refused agent's log says why.
    let log = wrongkey.log_text();
    assert!(
        log.contains("refused a datagram") && log.contains("does not verify"),
        "{log}"
    );
    assert!(
        nokey.log_text().contains("this node has none"),
        "{}",
        nokey.log_text()
    );
    assert!(nokey.alive() && wrongkey.alive());
    drop(nokey);
    drop(wrongkey);

    // What went on the wire: never the value, and the keyed nodes' datagrams are all sealed.
    stop.store(true, Ordering::Relaxed);
    let captured = captured.join().unwrap();
    let sealed: Vec<&Vec<u8>> = captured
        .iter()
        .filter(|d| d.len() > 48 && d.starts_with(b"CHRS") && d[6..8] == [0, 1])
        .filter(|d| {
            let node = u64::from_be_bytes(d[24..32].try_into().unwrap());
            node == 1 || node == 2
        })
        .collect();
    assert!(
        sealed.len() > 10,
        "captured only {} sealed datagrams",
        sealed.len()
    );
    for d in &captured {
        assert!(
            !contains(d, secret.as_bytes()),
            "the value travelled in plaintext"
        );
        assert!(
            !contains(d, b"app/secret"),
            "the key travelled in plaintext"
        );
    }

    // Replay every captured datagram of A and B (bounded, paced): all refused.
    let replayed_before = a.counter("protocol_replayed") + b.counter("protocol_replayed");
    let delivered_before =
        a.counter("protocol_messages_delivered") + b.counter("protocol_messages_delivered");
    for (i, d) in sealed.iter().enumerate() {
        attacker.send_to(d, to).unwrap();
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Each replayed datagram reaches both agents: its sender counts it as its own loopback,
    // the other as a replay.
    let want = replayed_before + sealed.len() as u64;
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        got = a.counter("protocol_replayed") + b.counter("protocol_replayed");
        if got >= want {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(got, want, "not every replay was refused as such");
    let delivered_after =
        a.counter("protocol_messages_delivered") + b.counter("protocol_messages_delivered");
    // Heartbeats are not messages; only a new write would be delivered, and none was made.
    assert_eq!(delivered_after, delivered_before, "a replay was delivered");
    assert_eq!(a.member_ids(), vec![2]);
    assert_eq!(b.member_ids(), vec![1]);
    assert_eq!(b.value("app/secret").as_deref(), Some(secret.as_bytes()));

    // Still working after all that: a new write travels.
    let (status, _) = http(b.http, "PUT", "/v1/kv/app/after", &[], b"ok");
    assert_eq!(status, 200);
    wait_until("A has the new value", Duration::from_secs(20), || {
        a.value("app/after").as_deref() == Some(&b"ok"[..])
    });
}

#[test]
fn readable_key_file_and_open_http_are_refused_with_the_fix() {
    let dir = temp_dir("sec");
    let key = dir.path().join("k");
    keygen(&key, 5);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let net = Net::new("sec");
    let http_addr = local_http();
    let out = Command::new(BIN)
        .args(net.args(1, http_addr, &[]))
        .env("CHORUS_KEY_FILE", &key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("chmod 600 {}", key.display())),
        "{err}"
    );

    // The HTTP API on a non-loopback address needs a token.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let open = SocketAddr::from((Ipv4Addr::UNSPECIFIED, free_tcp_port()));
    let out = Command::new(BIN)
        .args(net.args(1, open, &[]))
        .env("CHORUS_KEY_FILE", &key)
        .env_remove("CHORUS_HTTP_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--http-token"), "{err}");

    // With a token (here on the loopback), requests without it, or with another, are refused.
    let http_addr = local_http();
    let mut command = agent_command(
        BIN,
        &net.args(1, http_addr, &["--key-file", key.to_str().unwrap()]),
    );
    command.env("CHORUS_HTTP_TOKEN", "s3cret");
    let agent = Agent::spawn_until(command, http_addr, Ready::Listening);
    assert_eq!(agent.get("/v1/stats").0, 401);
    let wrong = [("Authorization", "Bearer s3crex")];
    assert_eq!(http(http_addr, "GET", "/v1/stats", &wrong, b"").0, 401);
    let right = [("Authorization", "Bearer s3cret")];
    assert_eq!(http(http_addr, "GET", "/v1/stats", &right, b"").0, 200);
    assert_eq!(
        http(http_addr, "PUT", "/v1/kv/x", &[], b"v").0,
        401,
        "a write without the token"
    );
    // The client commands send CHORUS_HTTP_TOKEN.
    let client = |token: &str, args: &[&str]| {
        Command::new(BIN)
            .args(args)
            .env("CHORUS_AGENT", format!("http://{http_addr}"))
            .env("CHORUS_HTTP_TOKEN", token)
            .output()
            .unwrap()
    };
    let put = client("s3cret", &["put", "app/k", "v1"]);
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = client("s3cret", &["get", "app/k"]);
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");
    let refused = client("nope", &["get", "app/k"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
