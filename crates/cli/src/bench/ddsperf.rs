//! The peer system's row: Cyclone DDS's own benchmark (`ddsperf`, run by [`crate::peer`]) next
//! to raw UDP and Chorus, where it is installed.

use std::time::Duration;

/// What the peer runs of one `chorus bench` found beyond their table rows: why the peer was
/// not measured (once per reason) or where it failed.
#[derive(Debug, Default)]
pub(super) struct Peer {
    notes: Vec<String>,
}

impl Peer {
    /// Runs `ddsperf` at `size` bytes with `receivers` subscribers for `secs`, adding its row
    /// to `lines` and its ratio to raw UDP (`raw_msgs_per_sec`) to `ratios`; notes instead why
    /// it could not run.
    pub(super) fn measure(
        &mut self,
        size: usize,
        receivers: usize,
        secs: Duration,
        raw_msgs_per_sec: f64,
        lines: &mut Vec<String>,
        ratios: &mut Vec<String>,
    ) {
        if let Some(why) = crate::peer::unavailable() {
            if !self.notes.contains(&why) {
                self.notes.push(why);
            }
            return;
        }
        eprintln!("  {size} B: ddsperf (Cyclone DDS) ...");
        match crate::peer::ddsperf(size, receivers, secs) {
            Ok(p) => {
                lines.push(format!(
                    "| ddsperf (Cyclone DDS, reliable) | {size} | {:.0} | {:.2} | {} | - | - | - | - |",
                    p.msgs_per_sec,
                    p.msgs_per_sec * size as f64 / 1e6,
                    if p.lost == 0 {
                        "0 lost".to_owned()
                    } else {
                        format!("{} lost", p.lost)
                    },
                ));
                if raw_msgs_per_sec > 0.0 {
                    ratios.push(format!(
                        "{size} B: ddsperf/raw = {:.2}",
                        p.msgs_per_sec / raw_msgs_per_sec
                    ));
                }
            }
            Err(e) => self.notes.push(format!("ddsperf at {size} B failed: {e}")),
        }
    }

    /// Prints how the peer ran, or why it was not measured.
    pub(super) fn print_notes(&self) {
        if self.notes.is_empty() {
            println!(
                "ddsperf ran with its own defaults (reliable; its own history and batching) in a \
                 private network namespace holding only lo; its 'delivered' column is the \
                 samples its subscribers reported lost; no latency is taken from it."
            );
        }
        for note in &self.notes {
            println!("peer not measured: {note}");
        }
    }
}
