//! `chorus bench --peer ddsperf`: Cyclone DDS's own benchmark (`ddsperf`, Debian package
//! `cyclonedds-tools`) side by side with Chorus, where it is installed.
//!
//! ddsperf is run with one publisher and `receivers` subscribers, reliable (its default),
//! inside a network namespace of its own (`unshare --net --map-root-user`) that holds nothing
//! but `lo`: Cyclone DDS chooses its own interfaces and multicast, and this keeps every packet
//! on this host whatever it chooses. The figure taken is each subscriber's samples per second,
//! the median of its one-second reports after the first, averaged over subscribers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What a peer run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerFigures {
    /// Samples per second per subscriber.
    pub msgs_per_sec: f64,
    /// Samples the subscribers reported lost.
    pub lost: u64,
    /// Subscribers that reported.
    pub subscribers: usize,
}

/// `program` on `PATH`, if there.
fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    })
}

/// Why the peer cannot run here, if it cannot (says what to install).
pub fn unavailable() -> Option<String> {
    for (program, package) in [
        ("ddsperf", "cyclonedds-tools"),
        ("unshare", "util-linux"),
        ("ip", "iproute2"),
    ] {
        if on_path(program).is_none() {
            return Some(format!(
                "{program} is not installed (Debian: apt-get install {package})"
            ));
        }
    }
    None
}

/// One subscriber report line, e.g.
/// `[4392] 3.000  size 1400 total 610988 lost 0 delta 204284 lost 0 rate 204.98 kS/s ...`:
/// (rate in samples/s, total lost so far).
pub fn parse_sub_line(line: &str) -> Option<(f64, u64)> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let after = |key: &str| words.iter().position(|w| *w == key).map(|i| i + 1);
    let rate_at = after("rate")?;
    let value: f64 = words.get(rate_at)?.parse().ok()?;
    let scale = match *words.get(rate_at + 1)? {
        "S/s" => 1.0,
        "kS/s" => 1e3,
        "MS/s" => 1e6,
        _ => return None,
    };
    let lost = after("lost")
        .and_then(|i| words.get(i))
        .and_then(|w| w.parse().ok())
        .unwrap_or(0);
    Some((value * scale, lost))
}

/// The figure of one subscriber's output: median of its rate reports after the first.
pub fn subscriber_figure(output: &str) -> Option<(f64, u64)> {
    let reports: Vec<(f64, u64)> = output.lines().filter_map(parse_sub_line).collect();
    let lost = reports.last().map_or(0, |r| r.1);
    let mut rates: Vec<f64> = reports.iter().skip(1).map(|r| r.0).collect();
    if rates.is_empty() {
        rates = reports.iter().map(|r| r.0).collect();
    }
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    Some((rates[rates.len() / 2], lost))
}

/// Runs ddsperf for `size`-byte samples to `receivers` subscribers for `secs` seconds.
///
/// # Errors
/// When the namespace cannot be made, ddsperf fails, or no subscriber reported.
pub fn ddsperf(size: usize, receivers: usize, secs: Duration) -> anyhow::Result<PeerFigures> {
    let dir = std::env::temp_dir().join(format!("chorus-ddsperf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = run_in_namespace(&dir, size, receivers, secs);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in_namespace(
    dir: &Path,
    size: usize,
    receivers: usize,
    secs: Duration,
) -> anyhow::Result<PeerFigures> {
    let config = dir.join("cyclonedds.xml");
    std::fs::write(
        &config,
        "<CycloneDDS><Domain id=\"any\"><General><Interfaces><NetworkInterface name=\"lo\" \
         multicast=\"true\"/></Interfaces><AllowMulticast>true</AllowMulticast>\
         <MulticastTimeToLive>0</MulticastTimeToLive></General></Domain></CycloneDDS>\n",
    )?;
    let d = secs.as_secs().max(2) + 1;
    // Every ddsperf process waits for the others (minmatch counts the other participants).
    let matched = receivers;
    // Subscribers first, in the background, each to its own file; the publisher in front.
    let mut script = String::from("set -e\nip link set lo up\n");
    for i in 0..receivers {
        script.push_str(&format!(
            "ddsperf -D {d} -Qminmatch:{matched} -Qinitwait:10 sub > '{}' 2>&1 &\n",
            dir.join(format!("sub{i}.txt")).display()
        ));
    }
    script.push_str(&format!(
        "ddsperf -D {d} -Qminmatch:{matched} -Qinitwait:10 pub size {size} > '{}' 2>&1 || true\nwait || true\n",
        dir.join("pub.txt").display()
    ));
    let status = Command::new("timeout")
        .arg(format!("{}", d + 20))
        .args(["unshare", "--net", "--map-root-user", "sh", "-c", &script])
        .env("CYCLONEDDS_URI", format!("file://{}", config.display()))
        .status()?;
    if !status.success() {
        anyhow::bail!(
            "could not run ddsperf in a private network namespace (unshare --net --map-root-user: {status})"
        );
    }
    let mut rates = Vec::new();
    let mut lost = 0;
    for i in 0..receivers {
        let out = std::fs::read_to_string(dir.join(format!("sub{i}.txt"))).unwrap_or_default();
        if let Some((rate, l)) = subscriber_figure(&out) {
            rates.push(rate);
            lost += l;
        }
    }
    if rates.is_empty() {
        anyhow::bail!("no ddsperf subscriber reported a rate");
    }
    Ok(PeerFigures {
        msgs_per_sec: rates.iter().sum::<f64>() / rates.len() as f64,
        lost,
        subscribers: rates.len(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_ddsperf_subscriber_reports() {
        let line = "[4392] 3.000  size 1400 total 610988 lost 0 delta 204284 lost 0 rate 204.98 \
                    kS/s 2295.77 Mb/s (61.31 kS/s 686.64 Mb/s)";
        assert_eq!(parse_sub_line(line), Some((204_980.0, 0)));
        assert_eq!(parse_sub_line("[4392] 3.000  rss:7.4MB vcsw:5760"), None);
        let out = "[1] 1.0  size 64 total 10 lost 0 delta 10 lost 0 rate 10.00 kS/s 1 Mb/s\n\
                   [1] 2.0  size 64 total 30 lost 2 delta 20 lost 2 rate 30.00 kS/s 1 Mb/s\n\
                   [1] 2.0  rss:7.4MB\n\
                   [1] 3.0  size 64 total 50 lost 2 delta 20 lost 0 rate 20.00 kS/s 1 Mb/s\n\
                   [1] 4.0  size 64 total 90 lost 3 delta 40 lost 1 rate 40.00 kS/s 1 Mb/s\n";
        // The first report (start-up) is left out; median of 30 k, 20 k, 40 k.
        assert_eq!(subscriber_figure(out), Some((30_000.0, 3)));
        assert_eq!(subscriber_figure("nothing here\n"), None);
    }
}
