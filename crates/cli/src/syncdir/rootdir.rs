//! [`RootDir`]: file operations confined to one directory.
//!
//! Every path is relative to an open descriptor of the root and walked one component at a
//! time with `openat(O_NOFOLLOW)`, so a symbolic link planted anywhere below the root (in
//! place of a directory or of a file) is never followed: the operation fails instead, and
//! nothing outside the root is read, written or removed. The root itself is opened by the path
//! it was given (a symlink there was chosen by whoever configured it).
//!
//! Writes are atomic: a temporary file in the same directory, fsync, rename over the old file,
//! fsync of the directory. The new file keeps the permission bits (and, where allowed, the
//! owner) of the file it replaces.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchown, fsync, unlinkat};

/// The directories opened on the way to a path: the root, then one per component.
struct Walked {
    root: OwnedFd,
    below: Vec<OwnedFd>,
}

impl Walked {
    /// The deepest directory reached.
    fn dir(&self) -> &OwnedFd {
        self.below.last().unwrap_or(&self.root)
    }
}

/// Names of temporary files start with this (reserved: keys cannot use it).
pub(super) const TMP_PREFIX: &str = ".chorus-tmp-";

/// An open directory whose paths never leave it. Relative paths use `/` between plain
/// components (the caller has checked them: no `.`, `..`, empty or absolute parts).
#[derive(Debug)]
pub(super) struct RootDir {
    path: PathBuf,
    fd: OwnedFd,
}

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Splits `rel` into its parent components and its last name.
fn split(rel: &str) -> (Vec<&str>, &str) {
    let mut parts: Vec<&str> = rel.split('/').collect();
    let name = parts.pop().unwrap_or_default();
    (parts, name)
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_NOFOLLOW)
    .union(OFlag::O_CLOEXEC);

impl RootDir {
    /// Opens `path` (creating it and its parents when missing).
    pub(super) fn open(path: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let fd = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(io)?;
        Ok(Self {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// The root's path, for messages and the hook's environment.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The root's path joined with `rel`, for messages.
    pub(super) fn display(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// The directories on the way to `parts`, creating missing ones when `create`; `None`
    /// when one is missing and not created.
    fn walk(&self, parts: &[&str], create: bool) -> std::io::Result<Option<Walked>> {
        let mut walked = Walked {
            root: self.fd.try_clone()?,
            below: Vec::with_capacity(parts.len()),
        };
        for part in parts {
            let dir = walked.dir();
            let next = match openat(dir, *part, DIR_FLAGS, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if create => {
                    match mkdirat(dir, *part, Mode::from_bits_truncate(0o755)) {
                        Ok(()) | Err(Errno::EEXIST) => {}
                        Err(e) => return Err(io(e)),
                    }
                    openat(dir, *part, DIR_FLAGS, Mode::empty()).map_err(io)?
                }
                Err(Errno::ENOENT) => return Ok(None),
                Err(Errno::ELOOP | Errno::ENOTDIR) => {
                    return Err(std::io::Error::other(format!(
                        "{} is a symbolic link or not a directory; not followed",
                        self.path.join(parts.join("/")).display()
                    )));
                }
                Err(e) => return Err(io(e)),
            };
            walked.below.push(next);
        }
        Ok(Some(walked))
    }

    /// Opens an existing entry `name` of `dir` for reading without following a symlink and
    /// without blocking on a FIFO; `None` when absent.
    fn open_entry(dir: impl AsFd, name: &str, what: &Path) -> std::io::Result<Option<File>> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
        match openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => Ok(Some(File::from(fd))),
            Err(Errno::ENOENT) => Ok(None),
            Err(Errno::ELOOP) => Err(std::io::Error::other(format!(
                "{} is a symbolic link; not followed",
                what.display()
            ))),
            Err(e) => Err(io(e)),
        }
    }

    /// Whether `rel` is a regular file holding exactly `data`.
    pub(super) fn holds(&self, rel: &str, data: &[u8]) -> std::io::Result<bool> {
        let (parts, name) = split(rel);
        let Some(walked) = self.walk(&parts, false)? else {
            return Ok(false);
        };
        let Some(mut file) = Self::open_entry(walked.dir(), name, &self.display(rel))? else {
            return Ok(false);
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() != data.len() as u64 {
            return Ok(false);
        }
        let mut old = Vec::with_capacity(data.len());
        file.read_to_end(&mut old)?;
        Ok(old == data)
    }

    /// Reads the regular file `rel`; `None` when absent.
    pub(super) fn read(&self, rel: &str) -> std::io::Result<Option<Vec<u8>>> {
        let (parts, name) = split(rel);
        let Some(walked) = self.walk(&parts, false)? else {
            return Ok(None);
        };
        let Some(mut file) = Self::open_entry(walked.dir(), name, &self.display(rel))? else {
            return Ok(None);
        };
        if !file.metadata()?.is_file() {
            return Err(std::io::Error::other(format!(
                "{} is not a regular file",
                self.display(rel).display()
            )));
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        Ok(Some(data))
    }

    /// Replaces (or creates) the regular file `rel` with `data`, atomically, creating its
    /// directories. An empty directory in its place is removed first; anything else that is
    /// not a regular file (a symlink, a directory with entries) is an error.
    pub(super) fn write(&self, rel: &str, data: &[u8]) -> std::io::Result<()> {
        let (parts, name) = split(rel);
        let walked = self.walk(&parts, true)?.ok_or_else(|| {
            std::io::Error::other("a directory vanished while it was being created")
        })?;
        let dir = walked.dir();
        let what = self.display(rel);
        let old = match Self::open_entry(dir, name, &what)? {
            None => None,
            Some(file) => {
                let meta = file.metadata()?;
                if meta.is_dir() {
                    // A directory left by keys that are gone: only an empty one goes.
                    unlinkat(dir, name, UnlinkatFlags::RemoveDir).map_err(|e| {
                        std::io::Error::other(format!(
                            "{} is a directory ({e}); cannot write a file there",
                            what.display()
                        ))
                    })?;
                    None
                } else if meta.is_file() {
                    Some(meta)
                } else {
                    return Err(std::io::Error::other(format!(
                        "{} is not a regular file",
                        what.display()
                    )));
                }
            }
        };
        let tmp = format!("{TMP_PREFIX}{:016x}", rand::random::<u64>());
        let result = (|| -> std::io::Result<()> {
            let create = OFlag::O_WRONLY
                | OFlag::O_CREAT
                | OFlag::O_EXCL
                | OFlag::O_NOFOLLOW
                | OFlag::O_CLOEXEC;
            // A new file gets the usual mode (0666 less the umask); a replacement is made
            // private first and then given the old file's mode and owner.
            let initial = if old.is_some() { 0o600 } else { 0o666 };
            let fd =
                openat(dir, tmp.as_str(), create, Mode::from_bits_truncate(initial)).map_err(io)?;
            if let Some(meta) = &old {
                // Root may give the file back to its owner; anyone else keeps what it has.
                match fchown(
                    &fd,
                    Some(Uid::from_raw(meta.uid())),
                    Some(Gid::from_raw(meta.gid())),
                ) {
                    Ok(()) | Err(Errno::EPERM) => {}
                    Err(e) => return Err(io(e)),
                }
                let mode = meta.permissions().mode() & 0o7777;
                fchmod(&fd, Mode::from_bits_truncate(mode)).map_err(io)?;
            }
            let mut file = File::from(fd);
            file.write_all(data)?;
            file.sync_all()?;
            renameat(dir, tmp.as_str(), dir, name).map_err(io)?;
            // The rename is durable once the directory is.
            fsync(dir).map_err(io)
        })();
        if result.is_err() {
            let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        }
        result
    }

    /// Removes the file (or symlink: the link itself) `rel` and the directories it leaves
    /// empty; whether there was one. A directory in its place is an error.
    pub(super) fn remove(&self, rel: &str) -> std::io::Result<bool> {
        let (parts, name) = split(rel);
        let Some(walked) = self.walk(&parts, false)? else {
            return Ok(false);
        };
        let dir = walked.dir();
        let removed = match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => true,
            Err(Errno::ENOENT) => false,
            Err(Errno::EISDIR) => {
                return Err(std::io::Error::other(format!(
                    "{} is a directory now; left alone",
                    self.display(rel).display()
                )));
            }
            Err(e) => return Err(io(e)),
        };
        if removed {
            fsync(dir).map_err(io)?;
        }
        // Prune: each parent directory, deepest first, while it is empty.
        for depth in (0..parts.len()).rev() {
            let parent = match depth {
                0 => &walked.root,
                _ => match walked.below.get(depth - 1) {
                    Some(fd) => fd,
                    None => break,
                },
            };
            if unlinkat(parent, parts[depth], UnlinkatFlags::RemoveDir).is_err() {
                break;
            }
        }
        Ok(removed)
    }

    /// Removes the temporary files a crash may have left in the root or in the listed
    /// directories (relative paths); how many.
    pub(super) fn remove_stale_temporaries<'a>(
        &self,
        dirs: impl IntoIterator<Item = &'a str>,
    ) -> usize {
        let mut removed = 0;
        for rel in std::iter::once("").chain(dirs) {
            let parts: Vec<&str> = rel.split('/').filter(|p| !p.is_empty()).collect();
            let Ok(Some(walked)) = self.walk(&parts, false) else {
                continue;
            };
            let dir = walked.dir();
            let Ok(dup) = dir.try_clone() else { continue };
            let Ok(mut listing) = nix::dir::Dir::from_fd(dup) else {
                continue;
            };
            let names: Vec<Vec<u8>> = listing
                .iter()
                .filter_map(Result::ok)
                .map(|entry| entry.file_name().to_bytes().to_vec())
                .filter(|name| name.starts_with(TMP_PREFIX.as_bytes()))
                .collect();
            for name in names {
                let name = OsStr::from_bytes(&name);
                if unlinkat(dir, name, UnlinkatFlags::NoRemoveDir).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }
}
