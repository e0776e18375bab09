//! Templates: files rendered from the store with minijinja, like consul-template.
//!
//! `chorus agent --template SRC:DEST[:CMD]` (or `[[template]]` in the config file) renders the
//! template file SRC into DEST, and renders it again when a key it read changes; CMD runs
//! (`sh -c`) after DEST really changed. `chorus template SRC:DEST --once` renders once against a
//! running agent over its HTTP API. docs/templates.md is the user's guide.
//!
//! Rules:
//! - **Functions.** `key(k)` (a missing key is an error: the rendering fails and DEST keeps
//!   its last good content, as consul-template would block), `key_or_default(k, d)`, `ls(p)`
//!   (the keys directly under `p/`), `tree(p)` (every key under `p/`), `members()`, `node()`.
//! - **Dependencies.** Each rendering records the keys and prefixes it read ([`Reads`]); only a
//!   change to one of them renders again, after a debounce ([`Wait`]: quiet for `min`, at most
//!   `max` after the first change).
//! - **Writes.** DEST is replaced atomically (temporary file in its directory, fsync, rename,
//!   mode kept), and only when the output differs from what it holds; CMD runs only then,
//!   killed with its process group after its timeout (the sync-dir hook's runner).
//! - **Errors.** A template that does not parse stops the agent at start, with the line; one
//!   that fails while rendering keeps the last good DEST, is logged and counted
//!   ([`TemplateStats`], in `/v1/stats` and `/metrics`), and is tried again at the next change.
//!
//! Rooms: [`render`] (minijinja and the functions), [`source`] (the node or the HTTP API
//! behind them), [`write`] (the atomic write), [`runner`] (the agent's loop), [`stats`],
//! [`once`] (`chorus template --once`).

mod once;
mod render;
mod runner;
mod source;
mod stats;
mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chorus::Node;

pub use self::once::once;
pub use self::render::{Renderer, TemplateError};
pub use self::stats::TemplateStats;
pub use self::write::write_atomic;

/// Default quiet time after a change before a template renders again.
pub const DEFAULT_WAIT_MIN: Duration = Duration::from_millis(300);
/// Default longest delay between a first change and the rendering it causes.
pub const DEFAULT_WAIT_MAX: Duration = Duration::from_secs(3);
/// Default time a template's command may run before its process group is killed.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The debounce of a template: render once changes have been quiet for `min`, and at the
/// latest `max` after the first change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// Quiet time.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Wait {
    fn default() -> Wait {
        Wait {
            min: DEFAULT_WAIT_MIN,
            max: DEFAULT_WAIT_MAX,
        }
    }
}

impl Wait {
    /// Parses `MIN` or `MIN:MAX` in milliseconds (`MAX` defaults to 10 × `MIN`, at least
    /// `MIN`).
    ///
    /// # Errors
    /// When a number is not one, or `MAX < MIN`.
    pub fn parse_ms(text: &str) -> Result<Wait, String> {
        let ms = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("wait {text:?}: {s:?} is not a number of milliseconds"))
        };
        let (min, max) = match text.split_once(':') {
            Some((min, max)) => (ms(min)?, ms(max)?),
            None => {
                let min = ms(text)?;
                (min, min.saturating_mul(10))
            }
        };
        Wait::new(min, max)
    }

    /// A wait of `min` and `max`.
    ///
    /// # Errors
    /// When `max < min`.
    pub fn new(min: Duration, max: Duration) -> Result<Wait, String> {
        if max < min {
            return Err(format!(
                "template wait: the maximum ({max:?}) is below the minimum ({min:?})"
            ));
        }
        Ok(Wait { min, max })
    }
}

/// One template of the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateSpec {
    /// The template file.
    pub source: PathBuf,
    /// The file rendered.
    pub destination: PathBuf,
    /// Run through `sh -c` after the destination changed.
    pub command: Option<String>,
    /// Debounce of the renderings.
    pub wait: Wait,
    /// How long the command may run before its process group is killed.
    pub command_timeout: Duration,
}

/// Splits `SRC:DEST[:CMD]` (CMD may itself hold `:`; SRC and DEST may not).
///
/// # Errors
/// When SRC or DEST is missing or empty.
pub fn parse_spec(text: &str) -> Result<(PathBuf, PathBuf, Option<String>), String> {
    let mut parts = text.splitn(3, ':');
    let source = parts.next().unwrap_or_default();
    let destination = parts.next().unwrap_or_default();
    if source.is_empty() || destination.is_empty() {
        return Err(format!(
            "template {text:?} is not SRC:DEST[:CMD] (the template file, the file written, an \
             optional command)"
        ));
    }
    let command = parts
        .next()
        .filter(|c| !c.trim().is_empty())
        .map(str::to_owned);
    Ok((source.into(), destination.into(), command))
}

/// Compiles every template over `node` (a template that does not parse is an error naming
/// its line) and starts one runner each; the stats they count into and their tasks.
///
/// # Errors
/// The first template that cannot be read or does not parse.
pub fn start(
    node: &Node,
    specs: &[TemplateSpec],
    sync_wait: Duration,
) -> Result<(Arc<TemplateStats>, Vec<tokio::task::JoinHandle<()>>), TemplateError> {
    let data: Arc<dyn source::Source> = Arc::new(source::NodeSource(node.clone()));
    let renderers = specs
        .iter()
        .map(|spec| Renderer::load(&spec.source, Arc::clone(&data)))
        .collect::<Result<Vec<_>, _>>()?;
    let stats = Arc::new(TemplateStats::new(specs.iter().map(|s| {
        (
            s.source.display().to_string(),
            s.destination.display().to_string(),
        )
    })));
    let tasks = specs
        .iter()
        .zip(renderers)
        .enumerate()
        .map(|(index, (spec, renderer))| {
            tokio::spawn(runner::run(
                node.clone(),
                spec.clone(),
                renderer,
                Arc::clone(&stats),
                index,
                sync_wait,
            ))
        })
        .collect();
    Ok((stats, tasks))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_waits_parse() {
        assert_eq!(
            parse_spec("a.tmpl:/etc/a.conf").unwrap(),
            ("a.tmpl".into(), "/etc/a.conf".into(), None)
        );
        assert_eq!(
            parse_spec("a:b:systemctl reload x; echo a:b")
                .unwrap()
                .2
                .as_deref(),
            Some("systemctl reload x; echo a:b")
        );
        assert!(parse_spec("a").is_err());
        assert!(parse_spec(":b").is_err());
        assert_eq!(
            Wait::parse_ms("100:2000").unwrap(),
            Wait {
                min: Duration::from_millis(100),
                max: Duration::from_secs(2)
            }
        );
        assert_eq!(
            Wait::parse_ms("50").unwrap().max,
            Duration::from_millis(500)
        );
        assert!(Wait::parse_ms("200:100").is_err());
        assert!(Wait::parse_ms("x").is_err());
    }
}
