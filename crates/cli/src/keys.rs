//! Cluster key files (`chorus keygen`, `--key-file`) and the HTTP API's bearer token.
//!
//! A key file is text: `#` comments, blank lines, and lines `key ID HEX` where ID is the key id
//! (1..=65535) and HEX the 32-byte secret in 64 hex digits. It must not be readable by group or
//! others (mode 0600). The first key of the first file sends; every key of every file is
//! accepted (see `docs/security.md`, Rotation).
//!
//! It does not encrypt anything itself: the keys go to `chorus::NodeBuilder::keyring`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use chorus::{Key, KeyId, Keyring};
use rand::TryRngCore;

/// Why key files could not be turned into a keyring.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file cannot be read.
    #[error("cannot read key file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is readable by group or others.
    #[error(
        "key file {path} is readable by group or others (mode {mode:04o}); \
         run `chmod 600 {path}` and start again"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A line is not `key ID HEX`.
    #[error("{path}:{line}: expected `key ID HEX` (ID 1..65535, HEX 64 hex digits)")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
    },
    /// No key in any file.
    #[error("no key in {0}")]
    NoKey(String),
    /// The keys do not make a keyring (same id twice, too many).
    #[error("{0} (generate rotation keys with distinct ids: chorus keygen --id N)")]
    Keyring(chorus::KeyringError),
}

/// `chorus keygen [PATH]`: writes a new key (random id unless `id` is given) to `path`, created
/// with mode 0600 and never overwritten, or prints it to stdout.
///
/// # Errors
/// The OS RNG fails, the file exists or cannot be created.
pub fn keygen(path: Option<&Path>, id: Option<u16>) -> anyhow::Result<()> {
    let mut secret = [0u8; 32];
    let mut rng = rand::rngs::OsRng;
    rng.try_fill_bytes(&mut secret)
        .context("the operating system's random number generator failed")?;
    let id = match id {
        Some(0) => bail!("key id 0 means \"no key\"; choose 1..65535"),
        Some(id) => id,
        None => loop {
            let id = (rng.try_next_u32().context("OS RNG")? & 0xFFFF) as u16;
            if id != 0 {
                break id;
            }
        },
    };
    let text = key_file_text(id, &secret);
    match path {
        None => print!("{text}"),
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {} (it must not exist)", path.display()))?;
            file.write_all(text.as_bytes())
                .and_then(|()| file.sync_all())
                .with_context(|| format!("cannot write {}", path.display()))?;
            eprintln!("wrote key {id} to {} (mode 0600)", path.display());
        }
    }
    Ok(())
}

/// The text of a key file holding one key.
pub fn key_file_text(id: u16, secret: &[u8; 32]) -> String {
    let mut hex = String::with_capacity(64);
    for b in secret {
        let _ = write!(hex, "{b:02x}");
    }
    format!(
        "# Chorus cluster key, written by `chorus keygen`. Keep it secret (mode 0600).\n\
         key {id} {hex}\n"
    )
}

/// Reads key files into a keyring: every key accepted, the first one sends.
///
/// # Errors
/// See [`KeyFileError`].
pub fn load_keyring(paths: &[PathBuf]) -> Result<Keyring, KeyFileError> {
    let mut keys = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|source| KeyFileError::Read {
            path: path.clone(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyFileError::Permissions {
                path: path.clone(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
            path: path.clone(),
            source,
        })?;
        keys.extend(parse_keys(path, &text)?);
    }
    let Some(send) = keys.first().map(Key::id) else {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(KeyFileError::NoKey(names.join(", ")));
    };
    Keyring::new(send, keys).map_err(KeyFileError::Keyring)
}

fn parse_keys(path: &Path, text: &str) -> Result<Vec<Key>, KeyFileError> {
    let mut keys = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let syntax = || KeyFileError::Syntax {
            path: path.to_owned(),
            line: n + 1,
        };
        let mut words = line.split_whitespace();
        let (Some("key"), Some(id), Some(hex), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(syntax());
        };
        let id = id
            .parse::<u16>()
            .ok()
            .and_then(KeyId::new)
            .ok_or_else(syntax)?;
        let secret = parse_hex(hex).ok_or_else(syntax)?;
        keys.push(Key::new(id, secret));
    }
    Ok(keys)
}

fn parse_hex(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// Refuses an HTTP API reachable from the network without a bearer token.
///
/// # Errors
/// A message saying how to fix it.
pub fn check_http_exposure(addr: SocketAddr, token: Option<&str>) -> anyhow::Result<()> {
    if token.is_some_and(str::is_empty) {
        bail!("the HTTP token is empty");
    }
    if !addr.ip().is_loopback() && token.is_none() {
        bail!(
            "the HTTP API on {addr} would be reachable from the network without authentication; \
             set a bearer token with --http-token or CHORUS_HTTP_TOKEN (clients send it the \
             same way), or keep --http on 127.0.0.1"
        );
    }
    Ok(())
}

/// Wraps `router` so that every request must carry `Authorization: Bearer TOKEN`.
pub fn require_token(router: axum::Router, token: &str) -> axum::Router {
    let expected: Arc<[u8]> = Arc::from(format!("Bearer {token}").into_bytes());
    router.layer(axum::middleware::from_fn(
        move |req: Request, next: Next| {
            let expected = Arc::clone(&expected);
            async move {
                let given = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .map(|v| v.as_bytes())
                    .unwrap_or_default();
                if constant_time_eq(given, &expected) {
                    next.run(req).await
                } else {
                    unauthorized()
                }
            }
        },
    ))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(serde_json::json!({"error": "missing or wrong bearer token"})),
    )
        .into_response()
}

/// Compares without an early exit on the first differing byte.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn tempdir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chorus-keys-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn keygen_writes_a_private_file_that_loads() {
        let dir = tempdir("gen");
        let path = dir.join("k");
        keygen(Some(&path), Some(7)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let ring = load_keyring(std::slice::from_ref(&path)).unwrap();
        assert_eq!(ring.send_id().get(), 7);
        assert!(keygen(Some(&path), Some(7)).is_err(), "never overwrites");
        // Two files: the first sends, both are accepted.
        let other = dir.join("k2");
        keygen(Some(&other), Some(8)).unwrap();
        let ring = load_keyring(&[other.clone(), path.clone()]).unwrap();
        assert_eq!(ring.send_id().get(), 8);
        assert_eq!(ring.accepted_ids().len(), 2);
        // Two keys with the same id are refused.
        assert!(matches!(
            load_keyring(&[path.clone(), path]),
            Err(KeyFileError::Keyring(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn readable_key_file_is_refused_with_the_fix() {
        let dir = tempdir("perm");
        let text = key_file_text(1, &[3; 32]);
        let path = write(&dir, "k", &text, 0o644);
        let err = load_keyring(std::slice::from_ref(&path))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("chmod 600 {}", path.display())),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert!(load_keyring(&[path]).is_ok());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn key_file_syntax() {
        let dir = tempdir("syntax");
        let two = format!(
            "# rotation\n\nkey 2 {}\nkey 1 {}\n",
            "ab".repeat(32),
            "01".repeat(32)
        );
        let ring = load_keyring(&[write(&dir, "two", &two, 0o600)]).unwrap();
        assert_eq!(ring.send_id().get(), 2);
        for bad in [
            "key 0 00",
            &format!("key 0 {}", "00".repeat(32)),
            &format!("key 1 {}", "0".repeat(63)),
            &format!("key 1 {}", "zz".repeat(32)),
            &format!("key 1 {} extra", "00".repeat(32)),
            &format!("secret 1 {}", "00".repeat(32)),
        ] {
            let err = load_keyring(&[write(&dir, "bad", bad, 0o600)]).unwrap_err();
            assert!(
                matches!(err, KeyFileError::Syntax { line: 1, .. }),
                "{bad}: {err}"
            );
        }
        assert!(matches!(
            load_keyring(&[write(&dir, "empty", "# nothing\n", 0o600)]),
            Err(KeyFileError::NoKey(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn http_exposure_rules() {
        let lo: SocketAddr = "127.0.0.1:7480".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7480".parse().unwrap();
        assert!(check_http_exposure(lo, None).is_ok());
        let err = check_http_exposure(any, None).unwrap_err().to_string();
        assert!(err.contains("--http-token"), "{err}");
        assert!(check_http_exposure(any, Some("s3cret")).is_ok());
        assert!(check_http_exposure(lo, Some("")).is_err());
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
