//! `chorus template SRC:DEST[:CMD] --once`: renders once against a running agent.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};

use super::render::Renderer;
use super::source::HttpSource;
use super::write::{Written, write_if_changed};
use super::{DEFAULT_COMMAND_TIMEOUT, parse_spec};
use crate::cli::TemplateArgs;
use crate::client::{Client, Outcome};
use crate::syncdir::{CommandEnd, run_command};

/// Renders the template once with the agent's data (over its HTTP API), writes DEST as the
/// agent would (atomically, only when it changed; `-` prints to stdout) and runs CMD if DEST
/// changed.
///
/// # Errors
/// A template that does not parse or fails (the message names the line), an agent that cannot
/// be reached, a destination that cannot be written, or a command that fails or overruns its
/// timeout.
pub fn once(args: &TemplateArgs) -> anyhow::Result<Outcome> {
    if !args.once {
        bail!(
            "chorus template renders once and needs --once; to keep a file rendered as the \
             store changes, give it to the agent: chorus agent --template SRC:DEST[:CMD]"
        );
    }
    let (source, destination, command) = parse_spec(&args.spec).map_err(anyhow::Error::msg)?;
    let data = Arc::new(HttpSource(Client::new(&args.opts.agent)));
    let renderer = Renderer::load(&source, data)?;
    let (result, _) = renderer.render();
    let text = result?;
    if destination.as_os_str() == "-" {
        if command.is_some() {
            bail!("a command needs a destination file, not stdout (-)");
        }
        let mut out = std::io::stdout().lock();
        out.write_all(text.as_bytes())?;
        out.flush()?;
        return Ok(Outcome::Ok);
    }
    if write_if_changed(&destination, text.as_bytes())? == Written::Unchanged {
        return Ok(Outcome::Ok);
    }
    let Some(cmd) = command else {
        return Ok(Outcome::Ok);
    };
    let timeout = args
        .command_timeout_ms
        .map_or(DEFAULT_COMMAND_TIMEOUT, Duration::from_millis);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let env = [
        ("CHORUS_TEMPLATE_SOURCE", source.as_os_str()),
        ("CHORUS_TEMPLATE_DESTINATION", destination.as_os_str()),
    ];
    match runtime.block_on(run_command("template", &cmd, timeout, &env)) {
        CommandEnd::Succeeded => Ok(Outcome::Ok),
        CommandEnd::NotStarted => bail!("cannot run the command {cmd:?}"),
        CommandEnd::Failed => bail!("the command {cmd:?} failed"),
        CommandEnd::TimedOut => {
            bail!("the command {cmd:?} overran its timeout {timeout:?} and was killed")
        }
    }
}
