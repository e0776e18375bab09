//! [`write_if_changed`]: replaces a destination file atomically, only when its content differs.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use anyhow::Context;

/// Mode of a template's destination that did not exist before (as consul-template's default).
pub const NEW_FILE_MODE: u32 = 0o644;

/// Whether [`write_if_changed`] replaced the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The file now holds the new content (it differed, or there was no file).
    Changed,
    /// The file already held exactly this content; it was not touched.
    Unchanged,
}

/// [`write_atomic`] with [`NEW_FILE_MODE`] for a new file.
///
/// # Errors
/// As [`write_atomic`].
pub fn write_if_changed(dest: &Path, content: &[u8]) -> anyhow::Result<Written> {
    write_atomic(dest, content, NEW_FILE_MODE)
}

/// Makes `dest` hold `content`: when it already does, nothing is touched; otherwise the
/// content goes to a temporary file in the same directory, which is fsynced, given the mode of
/// the file it replaces (`new_mode` for a new one) and renamed over `dest`; the directory is
/// then fsynced. A reader sees the old file or the new one, never a part of either.
///
/// # Errors
/// When the directory does not exist or cannot be written; `dest` is left as it was.
pub fn write_atomic(dest: &Path, content: &[u8], new_mode: u32) -> anyhow::Result<Written> {
    let mode = match std::fs::metadata(dest) {
        Ok(meta) => {
            if meta.is_file() && std::fs::read(dest).is_ok_and(|old| old == content) {
                return Ok(Written::Unchanged);
            }
            meta.permissions().mode() & 0o7777
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_mode,
        Err(e) => return Err(e).with_context(|| format!("cannot stat {}", dest.display())),
    };
    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".chorus-tmpl-")
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(content)
        .and_then(|()| tmp.as_file().sync_all())
        .and_then(|()| {
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(mode))
        })
        .with_context(|| format!("cannot write {}", tmp.path().display()))?;
    tmp.persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("cannot rename into {}", dest.display()))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync {}", dir.display()))?;
    Ok(Written::Changed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn writes_new_files_replaces_changed_ones_and_keeps_their_mode() {
        let tmp = chorus_testkit::temp_dir("tmpl-write");
        let dest = tmp.path().join("out.conf");
        assert_eq!(write_if_changed(&dest, b"a\n").unwrap(), Written::Changed);
        assert_eq!(std::fs::read(&dest).unwrap(), b"a\n");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dest), 0o644);
        assert_eq!(write_if_changed(&dest, b"a\n").unwrap(), Written::Unchanged);
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(write_if_changed(&dest, b"b\n").unwrap(), Written::Changed);
        assert_eq!(std::fs::read(&dest).unwrap(), b"b\n");
        assert_eq!(mode(&dest), 0o600, "the mode of the replaced file is kept");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.conf"]);
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let tmp = chorus_testkit::temp_dir("tmpl-write");
        assert!(write_if_changed(&tmp.path().join("no/such/out"), b"x").is_err());
    }
}
