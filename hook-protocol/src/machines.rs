//! The `builders` setting and machines files (`/etc/nix/machines`), parsed as Nix parses them
//! (`src/libstore/machines.cc`).
//!
//! Syntax:
//! - entries are separated by newlines and `;`; `#` starts a comment that runs to the end of the
//!   line (including any `;` after it); blank entries are skipped;
//! - an entry `@PATH` includes the machines file at PATH; a missing file is skipped (Nix logs it
//!   at debug level), any other read error is an error;
//! - an entry has up to eight whitespace-separated fields, `-` (or a missing field) meaning the
//!   default: store URI, systems (comma-separated; default: the caller's own system), SSH key
//!   file, max jobs (default 1), speed factor (default 1), supported features, mandatory
//!   features, and the base64 of the host's public key line;
//! - a store URI with no `://`, no `/` and not one of `auto`, `daemon`, `local` (or those
//!   followed by `?…`, or starting with `?`) gets `ssh://` put in front.
//!
//! Version differences (the hook gets `builders` from whichever Nix runs it):
//! - the speed factor is an unsigned integer in 2.8 (`1.5` is an error there) and a float ≥ 0
//!   from 2.26 on; both take 0 to mean 1. This parser takes the newer, wider form. A speed
//!   factor that is not finite (`inf`, `nan`) is rejected, because choosing among machines
//!   divides by it.
//! - 2.8 split entries on `\n` and `;` before stripping comments, so in 2.8 a `;` ended a
//!   comment; 2.26 and later strip the comment from the whole line first. This parser follows
//!   2.26 and later.
//! - 2.8 kept the systems as a list in the order given; 2.26 and later as a set. Here a set.
//!
//! Pure: no I/O except through the caller's reader in `expand` / `parse_config`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use crate::hash::base64_decode;

/// How deep `@file` includes may nest before the parser gives up (Nix has no limit and would
/// recurse until it runs out of stack on a file that includes itself).
pub(crate) const MAX_INCLUDE_DEPTH: usize = 16;

/// Errors of the machines syntax. The messages quote the entry, as Nix's do.
#[derive(Debug, thiserror::Error)]
pub enum MachinesError {
    /// An entry whose first field is empty or `-`.
    #[error(
        "bad machine specification: store URL was not found at the first column of a row: '{line}'"
    )]
    NoStoreUri {
        /// The entry.
        line: String,
    },
    /// Max jobs or the speed factor is not a number of the right kind (a speed factor must also
    /// be finite).
    #[error(
        "bad machine specification: failed to convert column #{column} in a row: '{line}' to '{expected}'"
    )]
    BadNumber {
        /// The field, counted from 0 as in Nix's message.
        column: usize,
        /// The entry.
        line: String,
        /// The kind of number wanted ("unsigned int" or "float").
        expected: &'static str,
    },
    /// A speed factor below 0.
    #[error("bad machine specification: speed factor must be >= 0 in the row: '{line}'")]
    NegativeSpeed {
        /// The entry.
        line: String,
    },
    /// The host key field is not valid base64.
    #[error(
        "bad machine specification: column #{column} in the row '{line}' is not a valid base64 string (it must be the base64 of the host's public key line, e.g. `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub`)"
    )]
    BadBase64 {
        /// The field, counted from 0 as in Nix's message.
        column: usize,
        /// The entry.
        line: String,
    },
    /// The store URI cannot be parsed.
    #[error("bad machine specification: bad store URI '{uri}' in the row '{line}': {reason}")]
    BadStoreUri {
        /// The URI as written.
        uri: String,
        /// The entry.
        line: String,
        /// What is wrong with it.
        reason: StoreUriError,
    },
    /// An `@file` exists but cannot be read.
    #[error("cannot read machines file '{path}': {source}")]
    ReadFile {
        /// The file.
        path: String,
        /// The read error.
        source: std::io::Error,
    },
    /// `@file` includes nested more than 16 deep.
    #[error(
        "machines file '{path}' is included more than {MAX_INCLUDE_DEPTH} levels deep (does it include itself?)"
    )]
    IncludeTooDeep {
        /// The file at the limit.
        path: String,
    },
}

/// Why a machine entry's store URI cannot be parsed.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum StoreUriError {
    /// The scheme is empty or has characters a URI scheme cannot.
    #[error("bad scheme '{0}'")]
    BadScheme(String),
    /// An `ssh://` or `ssh-ng://` URI without a host.
    #[error("no host name")]
    NoHost,
    /// White space in the host name.
    #[error("white space in the host name")]
    SpaceInHost,
    /// `[v6` without `]` (the authority is quoted).
    #[error("unclosed '[' in '{0}'")]
    UnclosedBracket(String),
    /// Something other than `:port` after `[v6]` (the authority is quoted).
    #[error("junk after ']' in '{0}'")]
    JunkAfterBracket(String),
    /// More than one `:` outside brackets (the authority is quoted).
    #[error("an IPv6 host must be in brackets: '{0}'")]
    UnbracketedIpv6(String),
    /// A port that is not a number from 1 to 65535.
    #[error("bad port '{0}'")]
    BadPort(String),
    /// `%` not followed by two hex digits (the part is quoted).
    #[error("bad percent escape in '{0}'")]
    BadPercentEscape(String),
    /// Percent escapes that decode to bytes that are not UTF-8 (the part is quoted).
    #[error("'{0}' is not UTF-8 once decoded")]
    NotUtf8(String),
}

/// A store URI as a machine entry gives it, after the `ssh://` default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUri {
    /// The URI as it will be shown to the user and used for slot names (`ssh://host` for a
    /// schemeless `host`).
    pub uri: String,
    /// `ssh`, `ssh-ng`, `https`, …; for the special words (`auto`, `daemon`, `local`) that
    /// word, and `""` for a plain path.
    pub scheme: String,
    /// `user` of `user@host`, for URIs with an authority.
    pub user: Option<String>,
    /// The host (without brackets for `[v6]`), for URIs with an authority; `""` otherwise.
    pub host: String,
    /// The port, if the URI gives one.
    pub port: Option<u16>,
    /// Everything between the authority and `?`: the path of `file:///x`, or a plain path.
    pub path: String,
    /// Query parameters (`?remote-program=…&remote-store=…`), percent-decoded.
    pub params: BTreeMap<String, String>,
}

impl StoreUri {
    /// `host` or `host:port` (with brackets for an IPv6 host), without the user.
    pub fn host_port(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

impl fmt::Display for StoreUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// One remote builder.
#[derive(Debug, Clone, PartialEq)]
pub struct Machine {
    /// Where to reach it (the first field).
    pub store_uri: StoreUri,
    /// The systems it builds for (`x86_64-linux`, …).
    pub systems: BTreeSet<String>,
    /// The SSH private key file to log in with; `None`: the user's default identities.
    pub ssh_key: Option<String>,
    /// Concurrent builds it takes (0: none, the machine is disabled).
    pub max_jobs: u32,
    /// Relative speed, > 0 (0 in the file means 1).
    pub speed_factor: f32,
    /// Features it supports (`kvm`, `big-parallel`, …).
    pub supported_features: BTreeSet<String>,
    /// Features a derivation must require to be built here.
    pub mandatory_features: BTreeSet<String>,
    /// The host key field as written (base64).
    pub public_host_key_base64: Option<String>,
    /// That field decoded: an OpenSSH public key line (`ssh-ed25519 AAAA… [comment]`), or
    /// several lines.
    pub public_host_key: Option<String>,
}

impl Machine {
    /// Whether it builds for `system` (`builtin` runs anywhere), as Nix's `systemSupported`.
    pub fn system_supported(&self, system: &str) -> bool {
        system == "builtin" || self.systems.contains(system)
    }

    /// Whether every required feature is supported or mandatory here (`allSupported`).
    pub fn all_supported<'a>(&self, required: impl IntoIterator<Item = &'a String>) -> bool {
        required
            .into_iter()
            .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
    }

    /// Whether the derivation requires every mandatory feature of this machine (`mandatoryMet`).
    pub fn mandatory_met(&self, required: &BTreeSet<String>) -> bool {
        self.mandatory_features.iter().all(|f| required.contains(f))
    }
}

/// Nix's `tokenizeString` with its default separators.
fn tokens(s: &str) -> impl Iterator<Item = &str> {
    s.split([' ', '\t', '\n', '\r']).filter(|w| !w.is_empty())
}

fn trim(s: &str) -> &str {
    s.trim_matches([' ', '\t', '\n', '\r'])
}

/// Splits `builders` text into entries, including `@file`s through `read`. `read` returns
/// `Ok(None)` for a file that does not exist (skipped, as Nix does).
pub(crate) fn expand<F>(text: &str, read: &mut F) -> Result<Vec<String>, MachinesError>
where
    F: FnMut(&Path) -> std::io::Result<Option<String>>,
{
    let mut out = Vec::new();
    expand_into(text, read, 0, &mut out)?;
    Ok(out)
}

fn expand_into<F>(
    text: &str,
    read: &mut F,
    depth: usize,
    out: &mut Vec<String>,
) -> Result<(), MachinesError>
where
    F: FnMut(&Path) -> std::io::Result<Option<String>>,
{
    for line in text.split('\n') {
        let line = match line.find('#') {
            Some(i) => &line[..i],
            None => line,
        };
        for entry in line.split(';') {
            let entry = trim(entry);
            if entry.is_empty() {
                continue;
            }
            if let Some(path) = entry.strip_prefix('@') {
                let path = trim(path);
                if depth >= MAX_INCLUDE_DEPTH {
                    return Err(MachinesError::IncludeTooDeep { path: path.into() });
                }
                match read(Path::new(path)) {
                    Ok(Some(text)) => expand_into(&text, read, depth + 1, out)?,
                    Ok(None) => {
                        tracing::debug!("cannot find machines file '{path}'");
                    }
                    Err(source) => {
                        return Err(MachinesError::ReadFile {
                            path: path.into(),
                            source,
                        });
                    }
                }
            } else {
                out.push(entry.to_string());
            }
        }
    }
    Ok(())
}

/// Reads a machines file from the file system: `Ok(None)` when it does not exist.
pub(crate) fn read_file(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Parses `builders` (inline entries and `@file`s, read through `read`) into machines, in the
/// order given. `default_systems` is what an entry without systems builds for: the caller's
/// `system` setting.
pub(crate) fn parse_config<F>(
    default_systems: &BTreeSet<String>,
    text: &str,
    read: &mut F,
) -> Result<Vec<Machine>, MachinesError>
where
    F: FnMut(&Path) -> std::io::Result<Option<String>>,
{
    expand(text, read)?
        .iter()
        .map(|e| parse_entry(default_systems, e))
        .collect()
}

/// Parses `builders` text (entries and `@file` includes, as described in the module docs),
/// reading the included files from the file system; a missing file is skipped.
/// `default_systems` is what an entry without systems builds for (the caller's `system`).
pub fn parse_config_fs(
    default_systems: &BTreeSet<String>,
    text: &str,
) -> Result<Vec<Machine>, MachinesError> {
    parse_config(default_systems, text, &mut read_file)
}

/// Parses text with no `@file` includes (an include is an error here).
pub fn parse_text(
    default_systems: &BTreeSet<String>,
    text: &str,
) -> Result<Vec<Machine>, MachinesError> {
    parse_config(default_systems, text, &mut |p: &Path| {
        Err(std::io::Error::other(format!(
            "includes are not read here ({})",
            p.display()
        )))
    })
}

/// Parses one entry (one line of a machines file, without comments).
pub fn parse_entry(
    default_systems: &BTreeSet<String>,
    line: &str,
) -> Result<Machine, MachinesError> {
    let fields: Vec<&str> = tokens(line).collect();
    let field = |i: usize| -> Option<&str> {
        fields
            .get(i)
            .copied()
            .filter(|f| !f.is_empty() && *f != "-")
    };
    let set = |i: usize| -> Option<BTreeSet<String>> {
        field(i).map(|f| {
            f.split(',')
                .filter(|w| !w.is_empty())
                .map(str::to_string)
                .collect()
        })
    };
    let Some(uri) = field(0) else {
        return Err(MachinesError::NoStoreUri { line: line.into() });
    };
    let store_uri = parse_store_uri(uri).map_err(|reason| MachinesError::BadStoreUri {
        uri: uri.into(),
        line: line.into(),
        reason,
    })?;
    let max_jobs = match field(3) {
        None => 1,
        Some(f) => parse_unsigned(f).ok_or_else(|| MachinesError::BadNumber {
            column: 3,
            line: line.into(),
            expected: "unsigned int",
        })?,
    };
    let speed_factor = match field(4) {
        None => 1.0,
        Some(f) => {
            let v: f32 = f
                .parse()
                .ok()
                .filter(|v: &f32| v.is_finite())
                .ok_or_else(|| MachinesError::BadNumber {
                    column: 4,
                    line: line.into(),
                    expected: "float",
                })?;
            if v < 0.0 {
                return Err(MachinesError::NegativeSpeed { line: line.into() });
            }
            if v == 0.0 { 1.0 } else { v }
        }
    };
    let (public_host_key_base64, public_host_key) = match field(7) {
        None => (None, None),
        Some(f) => {
            let bytes = base64_decode(f).map_err(|_| MachinesError::BadBase64 {
                column: 7,
                line: line.into(),
            })?;
            (
                Some(f.to_string()),
                Some(String::from_utf8_lossy(&bytes).into_owned()),
            )
        }
    };
    Ok(Machine {
        store_uri,
        systems: set(1).unwrap_or_else(|| default_systems.clone()),
        ssh_key: field(2).map(str::to_string),
        max_jobs,
        speed_factor,
        supported_features: set(5).unwrap_or_default(),
        mandatory_features: set(6).unwrap_or_default(),
        public_host_key_base64,
        public_host_key,
    })
}

/// Nix's `string2Int<unsigned int>`: decimal, no sign but an optional `+`, fits in 32 bits.
fn parse_unsigned(s: &str) -> Option<u32> {
    if s.starts_with('-') {
        return None;
    }
    s.parse().ok()
}

fn is_special_word(uri: &str) -> bool {
    ["auto", "daemon", "local"]
        .iter()
        .any(|w| uri == *w || uri.starts_with(&format!("{w}?")))
        || uri.starts_with('?')
}

/// Parses a store URI the way a machine entry holds it, adding `ssh://` where Nix does.
pub(crate) fn parse_store_uri(raw: &str) -> Result<StoreUri, StoreUriError> {
    let uri = if raw.contains("://") || raw.contains('/') || is_special_word(raw) {
        raw.to_string()
    } else {
        format!("ssh://{raw}")
    };
    let (before_query, query) = match uri.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (uri.as_str(), None),
    };
    let params = parse_query(query.unwrap_or(""))?;
    let Some((scheme, rest)) = before_query.split_once("://") else {
        // A special word or a plain path.
        let scheme = if before_query.starts_with('/') || before_query.starts_with('.') {
            ""
        } else {
            before_query
        };
        return Ok(StoreUri {
            scheme: scheme.to_string(),
            user: None,
            host: String::new(),
            port: None,
            path: if scheme.is_empty() {
                before_query.to_string()
            } else {
                String::new()
            },
            params,
            uri,
        });
    };
    if scheme.is_empty()
        || !scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    {
        return Err(StoreUriError::BadScheme(scheme.to_string()));
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(percent_decode(u)?), h),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    if (scheme == "ssh" || scheme == "ssh-ng") && host.is_empty() {
        return Err(StoreUriError::NoHost);
    }
    if host.chars().any(char::is_whitespace) {
        return Err(StoreUriError::SpaceInHost);
    }
    Ok(StoreUri {
        uri: uri.clone(),
        scheme: scheme.to_string(),
        user,
        host,
        port,
        path: path.to_string(),
        params,
    })
}

fn split_host_port(s: &str) -> Result<(String, Option<u16>), StoreUriError> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some((h, after)) = rest.split_once(']') else {
            return Err(StoreUriError::UnclosedBracket(s.to_string()));
        };
        match after {
            "" => (h, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (h, Some(p)),
                None => return Err(StoreUriError::JunkAfterBracket(s.to_string())),
            },
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p)),
            Some(_) => return Err(StoreUriError::UnbracketedIpv6(s.to_string())),
            None => (s, None),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(p) => Some(
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| StoreUriError::BadPort(p.to_string()))?,
        ),
    };
    Ok((host.to_string(), port))
}

fn parse_query(q: &str) -> Result<BTreeMap<String, String>, StoreUriError> {
    let mut out = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k)?, percent_decode(v)?);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, StoreUriError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| StoreUriError::BadPercentEscape(s.to_string()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| StoreUriError::NotUtf8(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Vec<Machine>, MachinesError> {
        parse_text(&sys(&["TEST_ARCH-TEST_OS"]), text)
    }

    fn host(m: &Machine) -> String {
        match &m.store_uri.user {
            Some(u) => format!("{u}@{}", m.store_uri.host_port()),
            None => m.store_uri.host_port(),
        }
    }

    #[test]
    fn empty_builders_give_no_machines() {
        assert!(parse("").unwrap().is_empty());
        assert!(parse("  \n ; ;\n# only a comment").unwrap().is_empty());
    }

    #[test]
    fn uri_only_gets_every_default() {
        for text in [
            "nix@scratchy.labs.cs.uu.nl",
            "nix@scratchy.labs.cs.uu.nl - - - - - - -",
        ] {
            let m = parse(text).unwrap();
            assert_eq!(m.len(), 1);
            let m = &m[0];
            assert_eq!(m.store_uri.uri, "ssh://nix@scratchy.labs.cs.uu.nl");
            assert_eq!(m.store_uri.scheme, "ssh");
            assert_eq!(m.store_uri.user.as_deref(), Some("nix"));
            assert_eq!(m.store_uri.host, "scratchy.labs.cs.uu.nl");
            assert_eq!(m.store_uri.port, None);
            assert_eq!(m.systems, sys(&["TEST_ARCH-TEST_OS"]));
            assert_eq!(m.ssh_key, None);
            assert_eq!(m.max_jobs, 1);
            assert_eq!(m.speed_factor, 1.0);
            assert!(m.supported_features.is_empty());
            assert!(m.mandatory_features.is_empty());
            assert_eq!(m.public_host_key, None);
        }
    }

    #[test]
    fn port_in_the_uri() {
        let m = &parse("nix@scratchy.labs.cs.uu.nl:2222").unwrap()[0];
        assert_eq!(m.store_uri.uri, "ssh://nix@scratchy.labs.cs.uu.nl:2222");
        assert_eq!(m.store_uri.port, Some(2222));
        let m = &parse("ssh-ng://root@127.0.0.1:32768?remote-program=/bin/nix-daemon i686-linux")
            .unwrap()[0];
        assert_eq!(m.store_uri.scheme, "ssh-ng");
        assert_eq!(m.store_uri.host, "127.0.0.1");
        assert_eq!(m.store_uri.port, Some(32768));
        assert_eq!(
            m.store_uri.params.get("remote-program").map(String::as_str),
            Some("/bin/nix-daemon")
        );
        let m = &parse("ssh-ng://[::1]:22").unwrap()[0];
        assert_eq!(
            (m.store_uri.host.as_str(), m.store_uri.port),
            ("::1", Some(22))
        );
        assert!(parse("ssh-ng://host:notaport").is_err());
        assert!(parse("ssh-ng://host:70000").is_err());
    }

    #[test]
    fn special_words_and_paths_keep_their_form() {
        for (text, scheme) in [
            ("auto", "auto"),
            ("daemon", "daemon"),
            ("local?root=/x", "local"),
            ("/some/store", ""),
            ("ssh-ng://h", "ssh-ng"),
        ] {
            let m = &parse(text).unwrap()[0];
            assert_eq!(m.store_uri.scheme, scheme, "{text}");
            assert_eq!(m.store_uri.uri, text);
        }
    }

    #[test]
    fn separators_comments_and_white_space() {
        let hosts = |t: &str| -> Vec<String> { parse(t).unwrap().iter().map(host).collect() };
        assert_eq!(
            hosts("nix@scratchy.labs.cs.uu.nl\nnix@itchy.labs.cs.uu.nl"),
            ["nix@scratchy.labs.cs.uu.nl", "nix@itchy.labs.cs.uu.nl"]
        );
        assert_eq!(
            hosts("nix@scratchy.labs.cs.uu.nl ; nix@itchy.labs.cs.uu.nl"),
            ["nix@scratchy.labs.cs.uu.nl", "nix@itchy.labs.cs.uu.nl"]
        );
        assert_eq!(
            hosts(
                "# This is a comment ; this is still that comment\n\
                 nix@scratchy.labs.cs.uu.nl ; nix@itchy.labs.cs.uu.nl\n\
                 # This is also a comment ; this also is still that comment\n\
                 nix@scabby.labs.cs.uu.nl\n"
            ),
            [
                "nix@scratchy.labs.cs.uu.nl",
                "nix@itchy.labs.cs.uu.nl",
                "nix@scabby.labs.cs.uu.nl"
            ]
        );
        assert_eq!(
            hosts(
                "        # comment ; comment\n   nix@scratchy.labs.cs.uu.nl ; nix@itchy.labs.cs.uu.nl   \n\n    \n\n ;;; \n\n ; ; \nnix@scabby.labs.cs.uu.nl\n\n"
            ),
            [
                "nix@scratchy.labs.cs.uu.nl",
                "nix@itchy.labs.cs.uu.nl",
                "nix@scabby.labs.cs.uu.nl"
            ]
        );
        assert_eq!(hosts("a # trailing comment; b"), ["a"]);
    }

    #[test]
    fn complete_entry_with_spaces_or_tabs() {
        for text in [
            "nix@scratchy.labs.cs.uu.nl     i686-linux      /home/nix/.ssh/id_scratchy_auto        8 3 kvm benchmark SSH+HOST+PUBLIC+KEY+BASE64+ENCODED==",
            "nix@scratchy.labs.cs.uu.nl\ti686-linux\t/home/nix/.ssh/id_scratchy_auto\t8\t3\tkvm\tbenchmark\tSSH+HOST+PUBLIC+KEY+BASE64+ENCODED==",
        ] {
            let m = &parse(text).unwrap()[0];
            assert_eq!(host(m), "nix@scratchy.labs.cs.uu.nl");
            assert_eq!(m.systems, sys(&["i686-linux"]));
            assert_eq!(
                m.ssh_key.as_deref(),
                Some("/home/nix/.ssh/id_scratchy_auto")
            );
            assert_eq!(m.max_jobs, 8);
            assert_eq!(m.speed_factor, 3.0);
            assert_eq!(m.supported_features, sys(&["kvm"]));
            assert_eq!(m.mandatory_features, sys(&["benchmark"]));
            assert_eq!(
                m.public_host_key_base64.as_deref(),
                Some("SSH+HOST+PUBLIC+KEY+BASE64+ENCODED==")
            );
        }
    }

    #[test]
    fn multi_valued_fields() {
        let m = &parse(
            "nix@scratchy.labs.cs.uu.nl Arch1,Arch2 - - - SupportedFeature1,SupportedFeature2 MandatoryFeature1,MandatoryFeature2",
        )
        .unwrap()[0];
        assert_eq!(m.systems, sys(&["Arch1", "Arch2"]));
        assert_eq!(
            m.supported_features,
            sys(&["SupportedFeature1", "SupportedFeature2"])
        );
        assert_eq!(
            m.mandatory_features,
            sys(&["MandatoryFeature1", "MandatoryFeature2"])
        );
    }

    #[test]
    fn bad_entries_are_rejected() {
        for (text, want) in [
            ("nix@scratchy.labs.cs.uu.nl - - eight", "column #3"),
            ("nix@scratchy.labs.cs.uu.nl - - -1", "column #3"),
            ("nix@scratchy.labs.cs.uu.nl - - 8 three", "column #4"),
            ("nix@scratchy.labs.cs.uu.nl - - 8 -3", "speed factor"),
            ("nix@scratchy.labs.cs.uu.nl - - 8 nan", "column #4"),
            (
                "nix@scratchy.labs.cs.uu.nl - - 8 3 - - BAD_BASE64",
                "base64",
            ),
            ("nix@scratchy.labs.cs.uu.nl - - 99999999999", "column #3"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("nix@scratchy.labs.cs.uu.nl"), "{e}");
        }
    }

    #[test]
    fn speed_factor_zero_means_one_and_floats_are_taken() {
        assert_eq!(parse("h - - 1 0").unwrap()[0].speed_factor, 1.0);
        assert_eq!(parse("h - - 1 2.5").unwrap()[0].speed_factor, 2.5);
    }

    #[test]
    fn mandatory_and_supported_features() {
        let m = &parse("h x - 1 1 kvm,big-parallel benchmark").unwrap()[0];
        let req = sys(&["benchmark", "kvm"]);
        assert!(m.all_supported(&req) && m.mandatory_met(&req));
        assert!(!m.mandatory_met(&sys(&["kvm"])));
        assert!(!m.all_supported(&sys(&["nixos-test"])));
        assert!(m.system_supported("x") && m.system_supported("builtin"));
        assert!(!m.system_supported("y"));
    }

    #[test]
    fn includes_are_read_through_the_reader_and_missing_ones_skipped() {
        let mut reads = Vec::new();
        let mut read = |p: &Path| -> std::io::Result<Option<String>> {
            reads.push(p.display().to_string());
            Ok(match p.to_str() {
                Some("/etc/nix/machines") => Some("a ; @/nested\n".into()),
                Some("/nested") => Some("b\n".into()),
                _ => None,
            })
        };
        let ms = parse_config(
            &sys(&["x"]),
            "@ /etc/nix/machines ; @/missing\nc",
            &mut read,
        )
        .unwrap();
        let hosts: Vec<String> = ms.iter().map(host).collect();
        assert_eq!(hosts, ["a", "b", "c"]);
        assert_eq!(reads, ["/etc/nix/machines", "/nested", "/missing"]);
        let mut looping =
            |_: &Path| -> std::io::Result<Option<String>> { Ok(Some("@/loop".into())) };
        assert!(matches!(
            parse_config(&sys(&["x"]), "@/loop", &mut looping),
            Err(MachinesError::IncludeTooDeep { .. })
        ));
    }
}
