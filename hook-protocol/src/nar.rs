//! NAR (Nix ARchive) serialisation, streaming in both directions (the format of Nix's
//! `src/libutil/archive.cc`, the same at 2.8.0, 2.26.3 and 2.35.2):
//!
//! ```text
//! nar  = str("nix-archive-1") node
//! node = str("(") str("type") body str(")")
//! body = str("regular") [str("executable") str("")] str("contents") u64 size <bytes> <pad>
//!      | str("symlink") str("target") str(target)
//!      | str("directory") { str("entry") str("(") str("name") str(name) str("node") node str(")") }*
//! ```
//!
//! * [`copy_nar`] validates a NAR while passing its exact bytes through, and never reads past its
//!   end (so it can be used on a connection where more protocol data follows).
//! * [`unpack_nar`] validates a NAR and recreates the tree on disk, with Nix's canonical store
//!   metadata (read-only modes, mtime 1).
//! * [`dump_path`] serialises a tree byte-for-byte like `nix-store --dump`.
//!
//! All three compute the NAR's SHA-256 and size as they go ([`NarSummary`]). None of them holds
//! more than a few hundred KiB of a NAR or a file in memory.
//!
//! The reader is stricter than Nix's own parser in two places, both as the grammar above (what
//! `dumpPath` in `src/libutil/archive.cc` writes): a regular file must have a `contents` field
//! (Nix 2.26's `parseDump` accepts `( type regular )`), and a symlink target must be non-empty.
//! Nix 2.8's parser also forgot to check that entries are sorted (it resets the previous name for
//! every entry); this one always checks. No NAR written by Nix is affected.

mod dump;
mod parse;
mod unpack;

use std::path::PathBuf;

pub use dump::{dump_path, dump_path_unhashed};
pub use parse::copy_nar;
pub use unpack::{remove_tree, unpack_nar};

use crate::wire::WireError;

/// The first string of every NAR.
pub(crate) const NAR_MAGIC: &str = "nix-archive-1";
/// What Nix appends (with a counter) to a file name that collides case-insensitively with an
/// earlier one in the same directory, when `use-case-hack` is on.
pub(crate) const CASE_HACK_SUFFIX: &str = "~nix~case~hack~";
/// Longest directory entry name accepted, in bytes. (Linux allows 255; this leaves room for NARs
/// made elsewhere and for the case-hack suffix.)
pub const MAX_NAME_LEN: usize = 1024;
/// Longest symlink target accepted, in bytes (Linux's `PATH_MAX`).
pub(crate) const MAX_TARGET_LEN: usize = 4096;
/// Deepest directory nesting accepted (the root directory is depth 0), both when reading and
/// when dumping.
pub const MAX_DEPTH: usize = 1024;

/// SHA-256 and length of a NAR, computed over exactly the bytes read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NarSummary {
    /// Length in bytes.
    pub nar_size: u64,
    /// SHA-256 digest.
    pub nar_sha256: [u8; 32],
}

impl NarSummary {
    /// The hash in lowercase base 16, as `nix-store --dump | sha256sum` prints it.
    pub fn sha256_base16(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.nar_sha256 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// Options for [`unpack_nar`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackOptions {
    /// Nix's `use-case-hack`: give names that collide case-insensitively (ASCII) with an earlier
    /// entry of the same directory the suffix `~nix~case~hack~N`, exactly like `restorePath`.
    pub case_hack: bool,
}

/// Options for [`dump_path`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DumpOptions {
    /// Nix's `use-case-hack`: strip everything from `~nix~case~hack~` on from entry names,
    /// exactly like `dumpPath`.
    pub case_hack: bool,
}

/// Everything that can go wrong reading, writing, unpacking or dumping a NAR.
///
/// `path` fields of type `String` are locations *inside the NAR* (`/` is the root node,
/// `/bin/hello` an entry); `PathBuf` fields are locations on disk.
#[derive(Debug, thiserror::Error)]
pub enum NarError {
    /// The stream does not start with `nix-archive-1`.
    #[error("not a NAR: expected the magic 'nix-archive-1', got {found}")]
    BadMagic {
        /// The first string read, as shown in the message.
        found: String,
    },
    /// A token other than the grammar allows here.
    #[error("bad NAR{}: expected {expected}, got {found}", at(path))]
    UnexpectedToken {
        /// Where in the NAR.
        path: String,
        /// What the grammar allows.
        expected: &'static str,
        /// What was read, as shown in the message.
        found: String,
    },
    /// `executable` followed by something other than an empty string.
    #[error(
        "bad NAR{}: the 'executable' marker must be followed by an empty string, got {found}",
        at(path)
    )]
    BadExecutableMarker {
        /// Where in the NAR.
        path: String,
        /// What followed, as shown in the message.
        found: String,
    },
    /// An entry name that is empty, `.`, `..`, or contains `/` or NUL.
    #[error("bad NAR{}: invalid entry name {name}: {reason}", at(path))]
    InvalidName {
        /// The directory holding the entry.
        path: String,
        /// The name, as shown in the message.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A directory's entries are not in byte-wise order.
    #[error(
        "bad NAR{}: entry {name} comes after {prev}, but entries must be sorted byte-wise",
        at(path)
    )]
    Unsorted {
        /// The directory.
        path: String,
        /// The entry before.
        prev: String,
        /// The entry that should have come first.
        name: String,
    },
    /// A directory holds the same name twice.
    #[error("bad NAR{}: duplicate entry {name}", at(path))]
    DuplicateName {
        /// The directory.
        path: String,
        /// The repeated name.
        name: String,
    },
    /// A symlink target that is empty or contains NUL.
    #[error("bad NAR{}: invalid symlink target {target}: {reason}", at(path))]
    InvalidTarget {
        /// The symlink.
        path: String,
        /// The target, as shown in the message.
        target: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A name, target or other string longer than its limit.
    #[error(
        "bad NAR{}: {what} of {len} bytes exceeds the limit of {max}",
        at(path)
    )]
    TooLong {
        /// Where in the NAR.
        path: String,
        /// What was too long.
        what: &'static str,
        /// Its claimed length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Directories nested deeper than [`MAX_DEPTH`].
    #[error("bad NAR{}: directories are nested more than {max} deep", at(path))]
    TooDeep {
        /// The directory at the limit.
        path: String,
        /// The limit.
        max: usize,
    },
    /// A wire-level error (truncation, bad padding, …) reading the NAR.
    #[error("bad NAR{}: {source}", at(path))]
    Wire {
        /// Where in the NAR, if known (empty if not).
        path: String,
        /// The wire error.
        #[source]
        source: WireError,
    },
    /// With the case hack, two entries of one directory would get the same name on disk.
    /// `path` is the directory on disk being filled.
    #[error(
        "unpacking into '{path}': with the case hack, entry {name} would be stored as {hacked}, which collides with another entry"
    )]
    CaseHackCollision {
        /// The directory on disk.
        path: String,
        /// The entry's name in the NAR.
        name: String,
        /// The name it would get on disk.
        hacked: String,
    },
    /// A file-system operation failed.
    #[error("{op} '{}': {source}", path.display())]
    Io {
        /// What was being done ("creating file", "reading", …).
        op: &'static str,
        /// The path on disk.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// [`unpack_nar`]'s destination exists already.
    #[error("cannot unpack a NAR to '{}': it already exists", .0.display())]
    DestinationExists(PathBuf),
    /// [`dump_path`] met something other than a regular file, directory or symlink.
    #[error("'{}' is {kind}; a NAR can hold only regular files, directories and symlinks", path.display())]
    UnsupportedFileType {
        /// The path on disk.
        path: PathBuf,
        /// What it is ("a socket", …).
        kind: &'static str,
    },
    /// A file changed while [`dump_path`] read it.
    #[error("'{}' changed while it was being dumped: {what}", path.display())]
    FileChanged {
        /// The path on disk.
        path: PathBuf,
        /// How it changed.
        what: &'static str,
    },
    /// With the case hack, two names of one directory are the same once the suffix is removed.
    #[error(
        "file name collision between '{}' and '{}' after removing the case-hack suffix",
        first.display(),
        second.display()
    )]
    CaseHackDumpCollision {
        /// One path on disk.
        first: PathBuf,
        /// The other.
        second: PathBuf,
    },
    /// [`dump_path`] met directories nested deeper than [`MAX_DEPTH`].
    #[error("'{}' is nested more than {max} directories deep", path.display())]
    DumpTooDeep {
        /// The directory at the limit.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// Writing the NAR to its destination failed.
    #[error("writing the NAR: {0}")]
    Write(#[source] std::io::Error),
    /// A worker thread stopped early, or the parser's state broke (a bug, not bad input).
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// A worker thread panicked or was cancelled (a bug, not bad input).
    #[error("internal error: the {0} thread failed")]
    Thread(&'static str, #[source] tokio::task::JoinError),
}

impl From<WireError> for NarError {
    fn from(source: WireError) -> Self {
        NarError::Wire {
            path: String::new(),
            source,
        }
    }
}

impl NarError {
    /// True if the input ended before the NAR did.
    pub fn is_truncated(&self) -> bool {
        matches!(
            self,
            NarError::Wire {
                source: WireError::Truncated(_),
                ..
            }
        )
    }
}

/// " at '<path>'", or nothing when the location is unknown.
fn at(path: &str) -> String {
    if path.is_empty() {
        String::new()
    } else {
        format!(" at '{path}'")
    }
}

/// A NAR string for an error message: lossily decoded, quoted and escaped, and shortened.
fn show(b: &[u8]) -> String {
    const MAX: usize = 100;
    let s = String::from_utf8_lossy(&b[..b.len().min(MAX)]);
    if b.len() > MAX {
        format!("{s:?}… ({} bytes)", b.len())
    } else {
        format!("{s:?}")
    }
}

/// Why `name` cannot be a directory entry, if it cannot.
fn invalid_name_reason(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name == b"." || name == b".." {
        Some("'.' and '..' are not allowed")
    } else if name.contains(&b'/') {
        Some("it contains '/'")
    } else if name.contains(&0) {
        Some("it contains a NUL byte")
    } else {
        None
    }
}

/// Nix's canonical mtime for store objects.
fn canonical_mtime() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send<T: Send>(_: &T) {}

    /// The futures must be `Send` so that callers can run them in spawned tasks, for any
    /// `Send` reader and writer.
    #[allow(dead_code)]
    fn futures_are_send<R, W>(r: &mut R, w: &mut W)
    where
        R: tokio::io::AsyncRead + Unpin + Send,
        W: tokio::io::AsyncWrite + Unpin + Send,
    {
        let f = copy_nar(r, w);
        assert_send(&f);
        drop(f);
        let f = unpack_nar(r, std::path::Path::new("/x"), UnpackOptions::default());
        assert_send(&f);
        drop(f);
        let f = dump_path(std::path::Path::new("/x"), w, DumpOptions::default());
        assert_send(&f);
    }
}
