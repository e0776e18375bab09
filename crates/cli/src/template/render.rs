//! [`Renderer`]: one template compiled in minijinja with the Chorus functions, rendered against
//! a [`Source`], recording what each rendering read ([`Reads`]).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use minijinja::value::Value;
use minijinja::{AutoEscape, Environment, Error, ErrorKind, UndefinedBehavior};

use super::source::{MemberView, Source};

/// The name the template is registered under: errors name it, then the line.
const NAME: &str = "template";

/// What one rendering read: the dependencies that make it stale when they change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reads {
    /// Keys read with `key` or `key_or_default` (present or not).
    pub keys: BTreeSet<String>,
    /// Prefixes read with `ls` or `tree`, normalised (`""` or ending in `/`).
    pub prefixes: BTreeSet<String>,
    /// Whether `members()` was called.
    pub members: bool,
}

impl Reads {
    /// Whether a change of `key` may change the output.
    pub fn covers(&self, key: &str) -> bool {
        self.keys.contains(key) || self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }
}

/// A template that failed: where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
pub struct TemplateError {
    /// The template file.
    pub path: String,
    /// The line of the template (1-based), when minijinja knows it.
    pub line: Option<usize>,
    /// What went wrong.
    pub message: String,
}

impl TemplateError {
    fn from_minijinja(path: &Path, e: &Error) -> TemplateError {
        // `detail` is the message alone; `kind` says what sort of error it is.
        let message = match e.detail() {
            Some(detail) => format!("{}: {detail}", e.kind()),
            None => e.kind().to_string(),
        };
        TemplateError {
            path: path.display().to_string(),
            line: e.line(),
            message,
        }
    }
}

/// One template file compiled with the functions `key`, `key_or_default`, `ls`, `tree`,
/// `members` and `node`, over one [`Source`].
///
/// The environment is configured for config files: no auto-escaping, a strict undefined
/// (a misspelt variable is an error, not an empty string), the trailing newline kept, and
/// `trim_blocks` on (the newline after a block tag is removed, as in Ansible).
pub struct Renderer {
    env: Environment<'static>,
    path: std::path::PathBuf,
    reads: Arc<Mutex<Reads>>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The normalised form of a prefix given to `ls` or `tree`: `""` stays `""` (every key), any
/// other prefix ends with `/` (`ls("app")` lists what is under `app/`, as in consul-template).
fn folder(prefix: &str) -> String {
    let trimmed = prefix.trim_start_matches('/');
    if trimmed.is_empty() || trimmed.ends_with('/') {
        trimmed.to_owned()
    } else {
        format!("{trimmed}/")
    }
}

/// Notes a read in the rendering's [`Reads`].
fn note(reads: &Mutex<Reads>, f: impl FnOnce(&mut Reads)) {
    f(&mut reads.lock().unwrap_or_else(PoisonError::into_inner));
}

fn source_error(e: &anyhow::Error) -> Error {
    Error::new(ErrorKind::InvalidOperation, format!("{e:#}"))
}

fn text(key: &str, value: &[u8]) -> Result<String, Error> {
    String::from_utf8(value.to_vec()).map_err(|_| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("key {key:?} holds a value that is not UTF-8 text"),
        )
    })
}

fn entries(prefix: &str, found: Vec<(String, bytes::Bytes)>, direct: bool) -> Result<Value, Error> {
    let mut list = Vec::with_capacity(found.len());
    for (path, value) in found {
        let Some(name) = path.strip_prefix(prefix) else {
            continue;
        };
        if name.is_empty() || (direct && name.contains('/')) {
            continue;
        }
        let value = text(&path, &value)?;
        list.push(Value::from_serialize(serde_json::json!({
            "key": name,
            "path": path,
            "value": value,
        })));
    }
    Ok(Value::from(list))
}

fn member_value(m: &MemberView) -> Value {
    Value::from_serialize(serde_json::json!({
        "id": m.id,
        "name": m.name,
        "address": m.addr.to_string(),
        "ip": m.addr.ip().to_string(),
        "port": m.addr.port(),
        "state": m.state,
    }))
}

impl Renderer {
    /// Compiles the template `source` (read from `path`, which errors name) over `data`.
    ///
    /// # Errors
    /// A [`TemplateError`] with the line when the template does not parse.
    pub fn new(
        path: &Path,
        source: String,
        data: Arc<dyn Source>,
    ) -> Result<Renderer, TemplateError> {
        let reads = Arc::new(Mutex::new(Reads::default()));
        let mut env = Environment::new();
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        env.set_trim_blocks(true);

        {
            let (data, reads) = (Arc::clone(&data), Arc::clone(&reads));
            env.add_function("key", move |key: String| -> Result<Value, Error> {
                note(&reads, |r| {
                    r.keys.insert(key.clone());
                });
                match data.get(&key).map_err(|e| source_error(&e))? {
                    Some(value) => Ok(Value::from(text(&key, &value)?)),
                    None => Err(Error::new(
                        ErrorKind::InvalidOperation,
                        format!(
                            "key {key:?} does not exist (key() needs it; \
                             key_or_default(k, default) reads an optional key)"
                        ),
                    )),
                }
            });
        }
        {
            let (data, reads) = (Arc::clone(&data), Arc::clone(&reads));
            env.add_function(
                "key_or_default",
                move |key: String, default: Value| -> Result<Value, Error> {
                    note(&reads, |r| {
                        r.keys.insert(key.clone());
                    });
                    match data.get(&key).map_err(|e| source_error(&e))? {
                        Some(value) => Ok(Value::from(text(&key, &value)?)),
                        None => Ok(default),
                    }
                },
            );
        }
        for (name, direct) in [("ls", true), ("tree", false)] {
            let (data, reads) = (Arc::clone(&data), Arc::clone(&reads));
            env.add_function(name, move |prefix: String| -> Result<Value, Error> {
                let prefix = folder(&prefix);
                note(&reads, |r| {
                    r.prefixes.insert(prefix.clone());
                });
                let found = data.scan(&prefix).map_err(|e| source_error(&e))?;
                entries(&prefix, found, direct)
            });
        }
        {
            let (data, reads) = (Arc::clone(&data), Arc::clone(&reads));
            env.add_function("members", move || -> Result<Value, Error> {
                note(&reads, |r| r.members = true);
                let members = data.members().map_err(|e| source_error(&e))?;
                Ok(Value::from(
                    members.iter().map(member_value).collect::<Vec<_>>(),
                ))
            });
        }
        {
            let data = Arc::clone(&data);
            env.add_function("node", move || -> Result<Value, Error> {
                let me = data.local().map_err(|e| source_error(&e))?;
                Ok(member_value(&me))
            });
        }
        env.add_template_owned(NAME, source)
            .map_err(|e| TemplateError::from_minijinja(path, &e))?;
        Ok(Renderer {
            env,
            path: path.to_path_buf(),
            reads,
        })
    }

    /// Reads `path` and compiles it over `data`.
    ///
    /// # Errors
    /// When the file cannot be read (no line) or does not parse (with the line).
    pub fn load(path: &Path, data: Arc<dyn Source>) -> Result<Renderer, TemplateError> {
        let source = std::fs::read_to_string(path).map_err(|e| TemplateError {
            path: path.display().to_string(),
            line: None,
            message: format!("cannot read the template: {e}"),
        })?;
        Renderer::new(path, source, data)
    }

    /// Renders once: the output, or the error with its line; and in both cases what the
    /// rendering read up to its end (a failed rendering depends on what it read before it
    /// failed, the missing key included, so that a change of it renders again).
    pub fn render(&self) -> (Result<String, TemplateError>, Reads) {
        *self.reads.lock().unwrap_or_else(PoisonError::into_inner) = Reads::default();
        let result = self
            .env
            .get_template(NAME)
            .and_then(|t| t.render(()))
            .map_err(|e| TemplateError::from_minijinja(&self.path, &e));
        let reads = std::mem::take(&mut *self.reads.lock().unwrap_or_else(PoisonError::into_inner));
        (result, reads)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::source::test_support::Fixed;
    use super::*;

    fn render(source: &str, data: Fixed) -> (Result<String, TemplateError>, Reads) {
        Renderer::new(Path::new("t.tmpl"), source.to_owned(), Arc::new(data))
            .unwrap()
            .render()
    }

    #[test]
    fn functions_read_the_source_and_record_what_they_read() {
        let data = Fixed::new(&[
            ("app/db/url", "postgres://db1"),
            ("app/db/pool", "5"),
            ("app/name", "shop"),
            ("app/web/a", "1"),
            ("other", "x"),
        ]);
        let source = "url={{ key('app/db/url') }}\n\
                      level={{ key_or_default('app/level', 'info') }}\n\
                      {% for e in ls('app') %}{{ e.key }}={{ e.value }};{% endfor %}\n\
                      {% for e in tree('app/db/') %}{{ e.path }} {% endfor %}\n\
                      {% for m in members() %}{{ m.id }}@{{ m.address }}/{{ m.state }} {% endfor %}\n\
                      me={{ node().id }}\n";
        let (out, reads) = render(source, data);
        assert_eq!(
            out.unwrap(),
            // trim_blocks: the newline after each `{% endfor %}` is dropped.
            "url=postgres://db1\nlevel=info\nname=shop;app/db/pool app/db/url \
             1@127.0.0.1:7400/self 2@127.0.0.2:7400/alive me=1\n"
        );
        assert_eq!(
            reads.keys.into_iter().collect::<Vec<_>>(),
            ["app/db/url", "app/level"]
        );
        assert_eq!(
            reads
                .prefixes
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            ["app/", "app/db/"]
        );
        assert!(reads.members);
    }

    #[test]
    fn a_missing_key_is_an_error_with_the_line_and_still_a_dependency() {
        let (out, reads) = render("a\n\nb={{ key('nope') }}\n", Fixed::new(&[]));
        let err = out.unwrap_err();
        assert_eq!(err.line, Some(3));
        assert!(err.message.contains("\"nope\" does not exist"), "{err}");
        assert!(err.to_string().starts_with("t.tmpl line 3: "), "{err}");
        assert!(reads.covers("nope"));
    }

    #[test]
    fn a_syntax_error_is_refused_with_its_line() {
        let err = Renderer::new(
            Path::new("bad.tmpl"),
            "ok\n{% for x in %}\n".into(),
            Arc::new(Fixed::new(&[])),
        )
        .unwrap_err();
        assert_eq!(err.line, Some(2), "{err}");
    }

    #[test]
    fn an_undefined_variable_is_an_error_not_an_empty_string() {
        let (out, _) = render("{{ nothing }}", Fixed::new(&[]));
        assert!(out.is_err());
    }

    #[test]
    fn binary_values_are_an_error_naming_the_key() {
        let mut data = Fixed::new(&[]);
        data.entries
            .insert("bin".into(), bytes::Bytes::from_static(&[0xff, 0]));
        let (out, _) = render("{{ key('bin') }}", data);
        assert!(out.unwrap_err().message.contains("\"bin\""));
    }

    #[test]
    fn covers_keys_and_prefixes() {
        let mut reads = Reads::default();
        reads.keys.insert("a".into());
        reads.prefixes.insert("p/".into());
        assert!(reads.covers("a") && reads.covers("p/x/y"));
        assert!(!reads.covers("ab") && !reads.covers("p"));
        assert_eq!(folder("app"), "app/");
        assert_eq!(folder("app/"), "app/");
        assert_eq!(folder(""), "");
        assert_eq!(folder("/x"), "x/");
    }
}
