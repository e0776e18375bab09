//! One side per process (`--role send|receive`): the sides of a two-process measurement, each
//! printing one `RESULT key=value ...` line.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use super::chorus::{MEMBER_WAIT, repair_fields};
use super::clock::{HEADER, nanos, now_ns};
use super::raw;
use super::tally::{Bounds, Tally};

/// Everything one side of a two-process measurement needs.
#[derive(Debug, Clone)]
struct Side {
    group: SocketAddrV4,
    iface: Ipv4Addr,
    ttl: u32,
    size: usize,
    messages: u64,
    max: Duration,
    rate: Option<u64>,
    /// Receivers: stop after this long without a message, once the first one arrived.
    idle: Duration,
    /// Chorus sender: receivers to wait for.
    receivers: usize,
    cluster: String,
    /// Chorus receiver: injected receive loss and its seed.
    loss: f64,
    seed: u64,
}

impl Side {
    /// When a receiving side started now stops: after every expected message, once idle after
    /// the first one, or at `--max-secs` plus the time a sender may take to show up.
    fn receive_bounds(&self) -> Bounds {
        Bounds {
            expect: self.messages,
            deadline: now_ns().saturating_add(nanos(self.max + MEMBER_WAIT)),
            idle: Some(self.idle),
            idle_before_first: false,
        }
    }
}

/// The `key=value` fields of a `RESULT` line.
type Fields = Vec<(&'static str, String)>;

/// `RESULT key=value ...`: what the two-process scripts parse.
fn result_line(fields: &Fields) -> String {
    let mut line = "RESULT".to_owned();
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(v);
    }
    line
}

/// What a receiver reports. Its rate is counted from the earliest send stamp it received to
/// the last arrival.
fn receive_fields(transport: &str, side: &Side, t: &Tally) -> Fields {
    let secs = t.span_secs();
    let rate = if secs > 0.0 {
        t.count as f64 / secs
    } else {
        0.0
    };
    vec![
        ("role", "receive".to_owned()),
        ("transport", transport.to_owned()),
        ("size", side.size.to_string()),
        ("expected", side.messages.to_string()),
        ("received", t.count.to_string()),
        (
            "delivered",
            format!("{:.4}", t.count as f64 / side.messages.max(1) as f64),
        ),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_sec", format!("{rate:.0}")),
        ("p50_us", format!("{:.0}", t.hist.quantile_us(0.50))),
        ("p99_us", format!("{:.0}", t.hist.quantile_us(0.99))),
        ("stop", t.stop.to_owned()),
    ]
}

/// What a sender reports: how many it sent and how fast it got them out.
fn send_fields(transport: &str, side: &Side, sent: u64, start: u64) -> Fields {
    let secs = now_ns().saturating_sub(start) as f64 / 1e9;
    let rate = if secs > 0.0 { sent as f64 / secs } else { 0.0 };
    vec![
        ("role", "send".to_owned()),
        ("transport", transport.to_owned()),
        ("size", side.size.to_string()),
        ("sent", sent.to_string()),
        ("secs", format!("{secs:.3}")),
        ("msgs_per_sec", format!("{rate:.0}")),
    ]
}

/// Raw receiver: joins the group, says READY on stderr, counts until N, idle or the bound
/// (`--max-secs` plus the time a sender may take to show up).
fn raw_receive_side(side: &Side) -> anyhow::Result<Fields> {
    let sock = raw::receiver(side.group, side.iface)?;
    eprintln!(
        "bench: READY raw receiver on {} via {}",
        side.group, side.iface
    );
    let tally = raw::receive(&sock, side.size, side.receive_bounds());
    Ok(receive_fields("raw", side, &tally))
}

/// Raw sender: blocking `sendto` in a loop out of the given interface.
fn raw_send_side(side: &Side) -> anyhow::Result<Fields> {
    let sock = raw::sender(side.iface, side.ttl, false)?;
    let start = now_ns();
    let deadline = start.saturating_add(nanos(side.max));
    let sent = raw::send(
        &sock,
        side.group,
        side.size,
        side.messages,
        deadline,
        side.rate,
    )?;
    Ok(send_fields("raw", side, sent, start))
}

/// A node of the two-process run.
async fn side_node(side: &Side, lossy: bool) -> anyhow::Result<chorus::Node> {
    let mut b = chorus::Node::builder()
        .cluster(&side.cluster)
        .group(SocketAddr::V4(side.group))
        .interface(&side.iface.to_string())
        .ttl(side.ttl)
        // An id from the OS-seeded generator: the builder's default derives it from the
        // clock's milliseconds and the pid, so two nodes started in the same millisecond by
        // one process (the unit test below) would get the same id.
        .node_id(chorus::NodeId(rand::random::<u64>() >> 1));
    if lossy && side.loss > 0.0 {
        b = b.inject_receive_loss(side.loss, side.seed);
    }
    Ok(b.start().await?)
}

/// Members a node counts as up (itself included).
fn up_members(node: &chorus::Node) -> usize {
    node.members()
        .iter()
        .filter(|m| m.state != chorus::MemberState::Suspected)
        .count()
}

/// Chorus receiver: a node watching `bench/`; once done it writes what it got under
/// `bench-done/<node id>` and stays until the sender leaves (at most 10 s), so that the
/// sender can see that key.
async fn chorus_receive_side(side: &Side) -> anyhow::Result<Fields> {
    let node = side_node(side, true).await?;
    let result = async {
        let watch = node.watch("bench/");
        eprintln!(
            "bench: READY chorus receiver node {} on {} via {}",
            node.node_id().0,
            side.group,
            side.iface
        );
        let tally = super::chorus::receive(node.clone(), watch, side.receive_bounds()).await;
        node.put(
            format!("bench-done/{}", node.node_id().0),
            bytes::Bytes::from(tally.count.to_string()),
        )
        .await?;
        let members = up_members(&node);
        let until = Instant::now() + MEMBER_WAIT;
        while up_members(&node) >= members && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut fields = receive_fields("chorus", side, &tally);
        fields.push(("unobserved", tally.unobserved.to_string()));
        fields.extend(repair_fields(&node));
        Ok(fields)
    }
    .await;
    let _ = node.shutdown().await;
    result
}

/// Chorus sender: waits until it sees `receivers` other members, puts as the in-process
/// bench does, then waits for every receiver's `bench-done/` key (bounded) before leaving.
async fn chorus_send_side(side: &Side) -> anyhow::Result<Fields> {
    let node = side_node(side, false).await?;
    let result = async {
        let until = Instant::now() + MEMBER_WAIT;
        while node.members().len() < side.receivers + 1 {
            if Instant::now() > until {
                anyhow::bail!(
                    "saw {} of {} receivers within {} s (is the receiver running on the same \
                     group and cluster?)",
                    node.members().len() - 1,
                    side.receivers,
                    MEMBER_WAIT.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let start = now_ns();
        let deadline = start.saturating_add(nanos(side.max));
        let messages = usize::try_from(side.messages).unwrap_or(usize::MAX);
        let sent = super::chorus::send(&node, side.size, messages, deadline, side.rate).await?;
        let mut fields = send_fields("chorus", side, sent, start);
        // The receivers stop at their own bound at the latest: --max-secs after the first
        // message, plus their idle time.
        let until = Instant::now() + side.max + side.idle + MEMBER_WAIT;
        let mut done = 0;
        while Instant::now() < until {
            done = node.scan("bench-done/").len();
            if done >= side.receivers {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        fields.push(("receivers_done", done.to_string()));
        fields.extend(repair_fields(&node));
        Ok(fields)
    }
    .await;
    let _ = node.shutdown().await;
    result
}

/// `chorus bench --role ...`: one side, one `RESULT` line on stdout.
pub(super) fn run_side(
    args: &crate::cli::BenchArgs,
    role: &str,
    receivers: usize,
) -> anyhow::Result<()> {
    let (Some(transport), Some(group), Some(iface)) =
        (args.transport.as_deref(), args.group, args.interface)
    else {
        anyhow::bail!("--role needs --transport, --group and --interface");
    };
    let [size] = args.sizes[..] else {
        anyhow::bail!("--role takes exactly one payload size (--sizes N)");
    };
    if !group.ip().is_multicast() {
        anyhow::bail!(
            "--group must be an IPv4 multicast address, got {}",
            group.ip()
        );
    }
    if args.raw_only || args.late_join.is_some() {
        anyhow::bail!("--raw-only and --late-join do not go with --role (use --transport)");
    }
    if args.loss > 0.0 && (role, transport) != ("receive", "chorus") {
        anyhow::bail!("--loss with --role only applies to a chorus receiver");
    }
    let side = Side {
        group,
        iface,
        ttl: args.ttl.unwrap_or(1),
        size: size.max(HEADER),
        messages: args.messages as u64,
        max: Duration::from_secs(args.max_secs.max(1)),
        rate: args.rate,
        idle: Duration::from_millis(args.idle_ms.unwrap_or(if transport == "raw" {
            500
        } else {
            3000
        })),
        receivers,
        cluster: args.cluster.clone().unwrap_or_else(|| "bench".to_owned()),
        loss: args.loss,
        seed: args.seed.unwrap_or_else(rand::random),
    };
    let fields = match (role, transport) {
        ("receive", "raw") => raw_receive_side(&side)?,
        ("send", "raw") => raw_send_side(&side)?,
        _ => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            if role == "receive" {
                runtime.block_on(chorus_receive_side(&side))?
            } else {
                runtime.block_on(chorus_send_side(&side))?
            }
        }
    };
    println!("{}", result_line(&fields));
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::bench::pick_group;

    /// The two sides of `--role` in one process over the loopback (TTL 0): the receiver
    /// counts what the sender put, the sender hears back from it under `bench-done/`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chorus_sides_meet_on_the_loopback() {
        let side = Side {
            group: pick_group(rand::random(), 3),
            iface: Ipv4Addr::LOCALHOST,
            ttl: 0,
            size: 100,
            messages: 300,
            max: Duration::from_secs(20),
            rate: None,
            idle: Duration::from_secs(3),
            receivers: 1,
            cluster: format!("bench-test-{:016x}", rand::random::<u64>()),
            loss: 0.0,
            seed: 1,
        };
        let rx_side = side.clone();
        let receiver = tokio::spawn(async move { chorus_receive_side(&rx_side).await });
        let sent = chorus_send_side(&side).await.unwrap();
        let received = receiver.await.unwrap().unwrap();
        let field = |f: &Fields, k: &str| f.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(field(&sent, "sent"), "300", "{sent:?}");
        assert_eq!(field(&sent, "receivers_done"), "1", "{sent:?}");
        assert_eq!(field(&received, "received"), "300", "{received:?}");
        assert_eq!(field(&received, "stop"), "all", "{received:?}");
        assert!(result_line(&received).starts_with("RESULT role=receive transport=chorus "));
    }
}
