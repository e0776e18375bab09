//! The `--on-change` hook: a command run through `sh -c` once changes have settled, killed
//! with its process group when it overruns its timeout.

use std::path::Path;
use std::time::Duration;

use super::stats::{SyncStats, bump};

/// The `--on-change` command and its timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hook {
    /// Run through `sh -c`; `None` for no command.
    pub command: Option<String>,
    /// How long changes must be quiet before it runs.
    pub debounce: Duration,
    /// How long it may run before its process group is killed.
    pub timeout: Duration,
}

/// How a command run by [`run_command`] ended (it logged the details).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandEnd {
    /// It exited with status 0.
    Succeeded,
    /// It could not be spawned.
    NotStarted,
    /// It exited with another status, or could not be waited for.
    Failed,
    /// It overran its timeout and its process group was killed.
    TimedOut,
}

/// Runs `cmd` through `sh -c` in a process group of its own with `env` added to its
/// environment, waits for it (at most `timeout`, then kills the group) and logs how it ended,
/// naming it `what` (`sync-dir`, `template`). Shared by the sync-dir hook and the templates'
/// commands.
pub async fn run_command(
    what: &str,
    cmd: &str,
    timeout: Duration,
    env: &[(&str, &std::ffi::OsStr)],
) -> CommandEnd {
    tracing::info!(what, command = cmd, "running command");
    let spawned = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            tracing::warn!(what, command = cmd, error = %e, "cannot run command");
            return CommandEnd::NotStarted;
        }
    };
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => CommandEnd::Succeeded,
        Ok(Ok(status)) => {
            tracing::warn!(what, command = cmd, %status, "command failed");
            CommandEnd::Failed
        }
        Ok(Err(e)) => {
            tracing::warn!(what, command = cmd, error = %e, "cannot wait for command");
            CommandEnd::Failed
        }
        Err(_) => {
            tracing::warn!(
                what,
                command = cmd,
                ?timeout,
                "command still running after its timeout; killing its process group"
            );
            // The group was made for the command (process_group(0)), so its id is the shell's
            // pid.
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.kill().await;
            CommandEnd::TimedOut
        }
    }
}

/// Runs the hook through `sh -c` in a process group of its own, waits for it (at most
/// `timeout`, then kills the group) and logs and counts how it ended.
pub(super) async fn run_hook(
    cmd: &str,
    timeout: Duration,
    root: &Path,
    prefix: &str,
    stats: &SyncStats,
) {
    let env = [
        ("CHORUS_SYNC_DIR", root.as_os_str()),
        ("CHORUS_PREFIX", std::ffi::OsStr::new(prefix)),
    ];
    match run_command("sync-dir", cmd, timeout, &env).await {
        CommandEnd::Succeeded => bump(&stats.hook_runs),
        CommandEnd::NotStarted => bump(&stats.hook_failures),
        CommandEnd::Failed => {
            bump(&stats.hook_runs);
            bump(&stats.hook_failures);
        }
        CommandEnd::TimedOut => {
            bump(&stats.hook_runs);
            bump(&stats.hook_timeouts);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::test_support::{event, figure, read, spawn_run, wait_for};
    use super::*;

    #[tokio::test]
    async fn a_hook_that_overruns_its_timeout_is_killed_and_the_mirror_goes_on() {
        let tmp = chorus_testkit::temp_dir("sync-test");
        let mirror = tmp.path().join("mirror");
        let pid_file = tmp.path().join("pid");
        // The hook leaves a grandchild behind; killing the group takes it too.
        let hook = Hook {
            command: Some(format!(
                "sleep 60 & echo $! > '{}'; wait",
                pid_file.display()
            )),
            debounce: Duration::from_millis(10),
            timeout: Duration::from_millis(300),
        };
        let (stats, tx, task) = spawn_run(&mirror, hook);
        tx.send(event("app/a", Some("1"), 1)).await.unwrap();
        wait_for("the hook started", || {
            read(tmp.path(), "pid").is_some_and(|p| p.ends_with('\n'))
        })
        .await;
        // Without the timeout the mirror would sit in the hook for a minute.
        tx.send(event("app/b", Some("2"), 2)).await.unwrap();
        wait_for("the next change", || read(&mirror, "b").is_some()).await;
        assert!(figure(&stats, "hook_timeouts") >= 1);
        let pid = read(tmp.path(), "pid").unwrap().trim().to_owned();
        wait_for("the hook's child was killed", || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map_or(true, |stat| stat.split_whitespace().nth(2) == Some("Z"))
        })
        .await;
        drop(tx);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap();
    }
}
