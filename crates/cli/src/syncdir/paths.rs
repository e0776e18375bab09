//! Keys to file paths: which keys can be files ([`relative_path`]) and the directories above
//! a path.

use super::SyncError;

/// File names starting with this are reserved for the mirror's own use.
const RESERVED: &str = ".chorus-";
/// Longest file name Linux file systems take (`NAME_MAX`), in bytes.
const NAME_MAX: usize = 255;

/// Maps a key to the relative path of its file (`/`-separated), `Ok(None)` when the key is
/// outside the prefix.
///
/// # Errors
/// [`SyncError::BadPath`] for empty names, `..`, `.`, absolute paths, empty components,
/// NUL bytes, backslashes, reserved names and components longer than 255 bytes.
pub fn relative_path(prefix: &str, key: &str) -> Result<Option<String>, SyncError> {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Ok(None);
    };
    let bad = |reason| SyncError::BadPath {
        key: key.to_string(),
        reason,
    };
    if rest.is_empty() {
        return Err(bad("empty file name"));
    }
    if rest.starts_with('/') {
        return Err(bad("absolute path"));
    }
    if rest.contains('\0') || rest.contains('\\') {
        return Err(bad("NUL or backslash in name"));
    }
    for part in rest.split('/') {
        match part {
            "" => return Err(bad("empty path component")),
            "." | ".." => return Err(bad("`.` or `..` component")),
            p if p.starts_with(RESERVED) => return Err(bad("reserved name .chorus-*")),
            p if p.len() > NAME_MAX => return Err(bad("a path component longer than 255 bytes")),
            _ => {}
        }
    }
    Ok(Some(rest.to_owned()))
}

/// Whether `rel` is a plain relative path as [`relative_path`] makes them (for the manifest,
/// which is read back from disk).
pub(super) fn is_plain(rel: &str) -> bool {
    relative_path("", rel).is_ok_and(|p| p.is_some())
}

/// The ancestors of `rel`, shallowest first (`a/b/c` gives `a`, `a/b`).
pub(super) fn ancestors(rel: &str) -> impl Iterator<Item = &str> {
    rel.match_indices('/').map(|(i, _)| &rel[..i])
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        let ok = |k| relative_path("app/", k).unwrap();
        assert_eq!(ok("app/a/b.conf").as_deref(), Some("a/b.conf"));
        assert_eq!(ok("other/x"), None);
        let long = format!("app/{}", "n".repeat(255));
        assert_eq!(ok(&long).as_deref(), Some(&long[4..]));
        for bad in [
            "app/",
            "app//x",
            "app/../etc/passwd",
            "app/a/../../x",
            "app/./x",
            "app/a/",
            "app/.chorus-sync-manifest",
            "app/.chorus-tmp-0000000000000000",
            "app/a\\b",
            "app/a\0b",
            &format!("app/{}", "n".repeat(256)),
        ] {
            assert!(relative_path("app/", bad).is_err(), "{bad:?} accepted");
        }
        // An empty prefix and a key starting with '/' would be absolute.
        assert!(relative_path("", "/etc/passwd").is_err());
    }
}
