//! [`run`]: one template in the agent: render, write if changed, run the command; then wait
//! for a change of something the rendering read, debounced, and again.

use std::sync::Arc;
use std::time::Duration;

use chorus::Node;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::TemplateSpec;
use super::render::{Reads, Renderer};
use super::source::{NodeSource, Source};
use super::stats::{TemplateStats, bump};
use super::write::{Written, write_if_changed};
use crate::syncdir::{CommandEnd, run_command};

/// How often the members are compared with those of the last rendering, for a template that
/// called `members()` (membership has no change feed of its own).
const MEMBERS_POLL: Duration = Duration::from_secs(1);

/// What a rendering led to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// The destination now holds new content.
    Changed,
    /// The output was identical to the destination's content: nothing written, nothing run.
    Unchanged,
    /// The template failed; the destination keeps its last good content.
    RenderFailed(String),
    /// The output could not be written; the destination is as it was.
    WriteFailed(String),
}

/// Renders and writes once (blocking: file I/O and fsync).
fn render_and_write(renderer: &Renderer, spec: &TemplateSpec) -> (Outcome, Reads) {
    let (result, reads) = renderer.render();
    let outcome = match result {
        Err(e) => Outcome::RenderFailed(e.to_string()),
        Ok(text) => match write_if_changed(&spec.destination, text.as_bytes()) {
            Ok(Written::Changed) => Outcome::Changed,
            Ok(Written::Unchanged) => Outcome::Unchanged,
            Err(e) => Outcome::WriteFailed(format!("{e:#}")),
        },
    };
    (outcome, reads)
}

/// Why the wait for a change ended.
enum Wake {
    /// Something the last rendering read changed.
    Changed,
    /// The watch ended with an error (it fell behind the change log): render from the store
    /// and watch again.
    Resync,
    /// The node stopped.
    Stopped,
}

/// The members as a template sees them, for comparison.
fn member_list(source: &NodeSource) -> Vec<(u64, std::net::SocketAddr, String)> {
    source
        .members()
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.id, m.addr, m.state))
        .collect()
}

/// Runs template `index` of `stats` until the node stops.
pub async fn run(
    node: Node,
    spec: TemplateSpec,
    renderer: Renderer,
    stats: Arc<TemplateStats>,
    index: usize,
    sync_wait: Duration,
) {
    let source = NodeSource(node.clone());
    let renderer = Arc::new(renderer);
    let spec = Arc::new(spec);
    // Subscribe first: a change made while the first rendering reads is seen afterwards.
    let mut watch = node.watch("");
    // Like the sync-dir mirror: do not render a default for a key the node has simply not
    // received yet.
    if let Err(e) = node.wait_in_sync(sync_wait).await {
        tracing::info!(error = %e, destination = %spec.destination.display(),
            "template: rendering before the node is in sync");
    }
    loop {
        let (r, s) = (Arc::clone(&renderer), Arc::clone(&spec));
        let (outcome, reads) =
            match tokio::task::spawn_blocking(move || render_and_write(&r, &s)).await {
                Ok(done) => done,
                Err(e) => {
                    tracing::error!(error = %e, "template: rendering task failed");
                    return;
                }
            };
        let members = reads.members.then(|| member_list(&source));
        record(&stats, index, &spec, &outcome).await;
        let wake = wait_for_change(&mut watch, &reads, &source, members.as_ref()).await;
        match wake {
            Wake::Stopped => return,
            Wake::Resync => {
                watch = node.watch("");
                continue;
            }
            Wake::Changed => {}
        }
        if !debounce(&mut watch, &reads, &spec).await {
            watch = node.watch("");
        }
    }
}

/// Counts and logs an outcome, and runs the command after a change.
async fn record(stats: &TemplateStats, index: usize, spec: &TemplateSpec, outcome: &Outcome) {
    let dest = spec.destination.display().to_string();
    let one = stats.each.get(index);
    let set_error = |error: Option<String>| {
        if let Some(one) = one {
            *one.last_error
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
        }
    };
    match outcome {
        Outcome::Changed | Outcome::Unchanged => {
            bump(&stats.renders);
            set_error(None);
        }
        Outcome::RenderFailed(e) | Outcome::WriteFailed(e) => {
            if let Some(one) = one {
                bump(&one.errors);
            }
            set_error(Some(e.clone()));
        }
    }
    match outcome {
        Outcome::Changed => {
            bump(&stats.files_written);
            tracing::info!(destination = dest, "template: file written");
            if let Some(cmd) = &spec.command {
                let env = [
                    ("CHORUS_TEMPLATE_SOURCE", spec.source.as_os_str()),
                    ("CHORUS_TEMPLATE_DESTINATION", spec.destination.as_os_str()),
                ];
                match run_command("template", cmd, spec.command_timeout, &env).await {
                    CommandEnd::Succeeded => bump(&stats.command_runs),
                    CommandEnd::NotStarted => bump(&stats.command_failures),
                    CommandEnd::Failed => {
                        bump(&stats.command_runs);
                        bump(&stats.command_failures);
                    }
                    CommandEnd::TimedOut => {
                        bump(&stats.command_runs);
                        bump(&stats.command_timeouts);
                    }
                }
            }
        }
        Outcome::Unchanged => bump(&stats.unchanged),
        Outcome::RenderFailed(e) => {
            bump(&stats.errors);
            tracing::warn!(destination = dest, error = %e,
                "template: rendering failed; the destination keeps its last good content");
        }
        Outcome::WriteFailed(e) => {
            bump(&stats.write_errors);
            tracing::warn!(destination = dest, error = %e, "template: cannot write the destination");
        }
    }
}

/// Waits until a change touches what the last rendering read (or, for a template that called
/// `members()`, the members differ from `members`).
async fn wait_for_change(
    watch: &mut chorus::Watch,
    reads: &Reads,
    source: &NodeSource,
    members: Option<&Vec<(u64, std::net::SocketAddr, String)>>,
) -> Wake {
    let mut poll = tokio::time::interval(MEMBERS_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            change = watch.next() => match change {
                None => return Wake::Stopped,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "template: watch fell behind; rendering from the store");
                    return Wake::Resync;
                }
                Some(Ok(change)) if reads.covers(&change.key) => return Wake::Changed,
                Some(Ok(_)) => {}
            },
            _ = poll.tick(), if members.is_some() => {
                if members.is_some_and(|m| *m != member_list(source)) {
                    return Wake::Changed;
                }
            }
        }
    }
}

/// After a first relevant change: waits until relevant changes have been quiet for the
/// minimum wait, or the maximum wait has passed since the first. `false` when the watch
/// broke (render anyway, then watch again).
async fn debounce(watch: &mut chorus::Watch, reads: &Reads, spec: &TemplateSpec) -> bool {
    let first = Instant::now();
    let latest = first + spec.wait.max;
    let mut deadline = (first + spec.wait.min).min(latest);
    loop {
        tokio::select! {
            change = watch.next() => match change {
                // The node stops: render what it holds, the next wait ends the loop.
                None => return true,
                Some(Err(_)) => return false,
                Some(Ok(change)) if reads.covers(&change.key) => {
                    deadline = (Instant::now() + spec.wait.min).min(latest);
                }
                Some(Ok(_)) => {}
            },
            () = tokio::time::sleep_until(deadline) => return true,
        }
    }
}
