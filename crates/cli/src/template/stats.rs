//! [`TemplateStats`]: the counters of the agent's templates, and the state of each one.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Value, json};

/// Counters over every template of the agent ([`TemplateStats::figures`] names them), and
/// per template whether its last rendering failed.
#[derive(Debug, Default)]
pub struct TemplateStats {
    pub(super) renders: AtomicU64,
    pub(super) files_written: AtomicU64,
    pub(super) unchanged: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) write_errors: AtomicU64,
    pub(super) command_runs: AtomicU64,
    pub(super) command_failures: AtomicU64,
    pub(super) command_timeouts: AtomicU64,
    pub(super) each: Vec<OneTemplate>,
}

/// The state of one template.
#[derive(Debug)]
pub(super) struct OneTemplate {
    pub(super) source: String,
    pub(super) destination: String,
    pub(super) errors: AtomicU64,
    /// The error of the last rendering, `None` when it succeeded (or none ran yet).
    pub(super) last_error: Mutex<Option<String>>,
}

pub(super) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl TemplateStats {
    /// Stats for templates `(source, destination)`, in order.
    pub(super) fn new(templates: impl IntoIterator<Item = (String, String)>) -> TemplateStats {
        TemplateStats {
            each: templates
                .into_iter()
                .map(|(source, destination)| OneTemplate {
                    source,
                    destination,
                    errors: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                })
                .collect(),
            ..TemplateStats::default()
        }
    }

    /// Every counter by its name in `/v1/stats` (under `templates`) and `/metrics`
    /// (`chorus_template_NAME`).
    pub fn figures(&self) -> Vec<(&'static str, u64)> {
        let Self {
            renders,
            files_written,
            unchanged,
            errors,
            write_errors,
            command_runs,
            command_failures,
            command_timeouts,
            each: _,
        } = self;
        [
            ("renders", renders),
            ("files_written", files_written),
            ("unchanged", unchanged),
            ("errors", errors),
            ("write_errors", write_errors),
            ("command_runs", command_runs),
            ("command_failures", command_failures),
            ("command_timeouts", command_timeouts),
        ]
        .into_iter()
        .map(|(name, v)| (name, v.load(Ordering::Relaxed)))
        .collect()
    }

    /// `{"NAME": count, ..., "each": [{"source", "destination", "errors", "last_error"}]}`.
    pub fn json(&self) -> Value {
        let mut obj: serde_json::Map<String, Value> = self
            .figures()
            .into_iter()
            .map(|(name, v)| (name.to_owned(), Value::from(v)))
            .collect();
        let each: Vec<Value> = self
            .each
            .iter()
            .map(|t| {
                json!({
                    "source": t.source,
                    "destination": t.destination,
                    "errors": t.errors.load(Ordering::Relaxed),
                    "last_error": *t.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
                })
            })
            .collect();
        obj.insert("each".into(), Value::from(each));
        Value::Object(obj)
    }
}
