//! `.drv` files (the ATerm written by `Derivation::unparse` and read by `parseDerivation` in
//! `src/libstore/derivations.cc`, identical in 2.8.0, 2.26.3 and 2.35.2) and the
//! `BasicDerivation` wire form (`writeDerivation`/`readDerivation`, same file).
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),…],          outputs: name, path, hashAlgo, hash
//!        [("/nix/store/…-dep.drv",["out"]),…],        input derivations and their outputs
//!        ["/nix/store/…-src",…],                       input sources
//!        "x86_64-linux","/bin/sh",["-c","…"],          platform, builder, args
//!        [("key","value"),…])                          environment
//! ```
//!
//! Nix escapes (`\"`, `\\`, `\n`, `\r`, `\t`) only the builder, the args and the environment;
//! output names, output fields, paths and the platform are written between quotes verbatim. The
//! parser accepts `\c` for any other `c` as `c`, as Nix does. Everything is kept as parsed
//! (sorted maps and sets, raw output strings), so [`Derivation::to_aterm`] reproduces a `.drv`
//! written by Nix byte for byte.
//!
//! The parser is stricter than Nix in ways Nix's own writer never exercises: duplicate keys,
//! empty list elements, a hash without an algorithm, unescapable characters in verbatim fields
//! and trailing bytes are errors rather than silently normalised away, so that whatever parses
//! re-serialises identically. `DrvWithVersion(…)` (experimental dynamic derivations) is
//! rejected.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use bytes::BytesMut;
use nom::bytes::complete::tag;
use nom::combinator::cut;
use nom::error::{ContextError, ErrorKind, ParseError, context};
use nom::multi::separated_list0;
use nom::sequence::{delimited, preceded};
use nom::{IResult, Parser};
use tokio::io::AsyncRead;

use crate::hash::{Hash, HashAlgo, HashError};
use crate::store_path::{
    self, ContentAddressMethod, StorePath, StorePathError, make_fixed_output_path,
};
use crate::wire::{self, WireError};

/// Text a derivation may hold as arbitrary bytes: its builder, arguments and environment
/// values, and a whole `.drv`. Nix strings are byte strings, so these need not be UTF-8 (a
/// `builtins.readFile` of a binary file, a `substring` through a multi-byte character); store
/// paths, output names and the platform stay validated text.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteString(Vec<u8>);

impl ByteString {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    /// The text, if it is UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The text with invalid UTF-8 replaced by U+FFFD, for messages.
    pub fn to_string_lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }
}

impl From<Vec<u8>> for ByteString {
    fn from(b: Vec<u8>) -> Self {
        ByteString(b)
    }
}

impl From<&[u8]> for ByteString {
    fn from(b: &[u8]) -> Self {
        ByteString(b.to_vec())
    }
}

impl From<String> for ByteString {
    fn from(s: String) -> Self {
        ByteString(s.into_bytes())
    }
}

impl From<&str> for ByteString {
    fn from(s: &str) -> Self {
        ByteString(s.as_bytes().to_vec())
    }
}

impl std::ops::Deref for ByteString {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for ByteString {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Lossy, for messages.
impl fmt::Display for ByteString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

/// As a string literal when UTF-8, else with the bytes escaped (`\xff`).
impl fmt::Debug for ByteString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.to_str() {
            Some(s) => fmt::Debug::fmt(s, f),
            None => write!(f, "b\"{}\"", self.0.escape_ascii()),
        }
    }
}

impl PartialEq<str> for ByteString {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for ByteString {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<String> for ByteString {
    fn eq(&self, other: &String) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<ByteString> for String {
    fn eq(&self, other: &ByteString) -> bool {
        self.as_bytes() == other.0
    }
}

impl PartialEq<ByteString> for &str {
    fn eq(&self, other: &ByteString) -> bool {
        self.as_bytes() == other.0
    }
}

/// One output as written in the ATerm and on the wire: the three raw strings.
///
/// | kind | path | hash_algo | hash |
/// |---|---|---|---|
/// | input-addressed | `/nix/store/…` | `""` | `""` |
/// | fixed-output CA | `/nix/store/…` | `<method><algo>` (`r:sha256`, `sha1`, …) | hex digest |
/// | floating CA | `""` | `<method><algo>` | `""` |
/// | deferred | `""` | `""` | `""` |
/// | impure | `""` | `<method><algo>` | `impure` |
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
pub struct DerivationOutput {
    /// Absolute store path, or `""` if not known in advance.
    pub path: String,
    /// `<method><algo>` for a content-addressed output (`r:sha256`, `sha1`, …), else `""`.
    pub hash_algo: String,
    /// The base-16 digest of a fixed output, `impure`, or `""`.
    pub hash: String,
}

impl DerivationOutput {
    /// The output path, if the derivation states one.
    pub fn path(&self) -> Option<StorePath> {
        StorePath::from_absolute(&self.path).ok()
    }

    /// Content-addressed with the hash only known after the build.
    pub fn is_floating_ca(&self) -> bool {
        self.path.is_empty() && !self.hash_algo.is_empty() && self.hash.is_empty()
    }

    /// Fixed-output: the content hash is given in advance.
    pub fn is_fixed(&self) -> bool {
        !self.hash_algo.is_empty() && !self.hash.is_empty() && self.hash != "impure"
    }

    /// Impure: built anew every time, its hash only known after the build.
    pub fn is_impure(&self) -> bool {
        !self.hash_algo.is_empty() && self.hash == "impure"
    }

    /// Input-addressed, path not yet computed (all three fields empty).
    pub fn is_deferred(&self) -> bool {
        self.path.is_empty() && self.hash_algo.is_empty() && self.hash.is_empty()
    }

    /// Input-addressed with a known path.
    pub fn is_input_addressed(&self) -> bool {
        !self.path.is_empty() && self.hash_algo.is_empty()
    }

    /// For content-addressed outputs (fixed, floating, impure): the ingestion method and hash
    /// algorithm named by `hash_algo`.
    pub fn method_and_algo(&self) -> Option<(ContentAddressMethod, HashAlgo)> {
        if self.hash_algo.is_empty() {
            return None;
        }
        let (method, algo) = ContentAddressMethod::split_prefix(&self.hash_algo);
        Some((method, algo.parse().ok()?))
    }

    /// For fixed outputs, the expected content hash.
    pub fn fixed_hash(&self) -> Option<Hash> {
        if !self.is_fixed() {
            return None;
        }
        let (_, algo) = self.method_and_algo()?;
        Hash::parse_non_sri_unprefixed(&self.hash, algo).ok()
    }

    /// For fixed outputs, the path Nix computes from the hash (`DerivationOutput::CAFixed::path`);
    /// it should equal `path`. `drv_name` is the derivation's name (its `.drv` store name without
    /// `.drv`).
    pub fn fixed_output_path(
        &self,
        drv_name: &str,
        output_name: &str,
    ) -> Option<Result<StorePath, StorePathError>> {
        let hash = self.fixed_hash()?;
        let (method, _) = self.method_and_algo()?;
        Some(make_fixed_output_path(
            method,
            &hash,
            &output_path_name(drv_name, output_name),
        ))
    }

    /// Checks that the three strings form one of the kinds Nix accepts
    /// (`parseDerivationOutput`). Stricter than Nix in one place: Nix ignores a hash given
    /// without an algorithm, which would not re-serialise identically, so it is an error here.
    pub fn validate(&self) -> Result<(), OutputError> {
        let check_path = |kind: &'static str| {
            StorePath::from_absolute(&self.path)
                .map(|_| ())
                .map_err(|source| OutputError::BadPath { kind, source })
        };
        if self.hash_algo.is_empty() {
            if !self.hash.is_empty() {
                return Err(OutputError::HashWithoutAlgo(self.hash.clone()));
            }
            if self.path.is_empty() {
                return Ok(()); // deferred
            }
            return check_path("input-addressed");
        }
        let (_, algo) = ContentAddressMethod::split_prefix(&self.hash_algo);
        let algo: HashAlgo = algo.parse().map_err(OutputError::BadHash)?;
        if self.hash == "impure" {
            if !self.path.is_empty() {
                return Err(OutputError::ImpureWithPath);
            }
        } else if !self.hash.is_empty() {
            check_path("fixed-output")?;
            Hash::parse_non_sri_unprefixed(&self.hash, algo).map_err(OutputError::BadHash)?;
        } else if !self.path.is_empty() {
            return Err(OutputError::FloatingWithPath);
        }
        Ok(())
    }
}

/// Why a derivation output's path, hash algorithm and hash form none of the kinds Nix accepts
/// ([`DerivationOutput::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputError {
    /// A hash without a hash algorithm.
    #[error("hash '{0}' given without an algorithm")]
    HashWithoutAlgo(String),
    /// The output path is not a store path.
    #[error("{kind} output path: {source}")]
    BadPath {
        /// `input-addressed` or `fixed-output`.
        kind: &'static str,
        /// Why the path is not a store path.
        source: StorePathError,
    },
    /// The hash algorithm is unknown or the hash does not parse with it.
    #[error(transparent)]
    BadHash(HashError),
    /// An impure output with a path.
    #[error("impure derivation output should not specify output path")]
    ImpureWithPath,
    /// A floating content-addressed output with a path.
    #[error("content-addressed derivation output should not specify output path")]
    FloatingWithPath,
}

/// The store name of output `output_name` of derivation `drv_name` (`outputPathName`).
pub fn output_path_name(drv_name: &str, output_name: &str) -> String {
    if output_name == "out" {
        drv_name.to_string()
    } else {
        format!("{drv_name}-{output_name}")
    }
}

/// A parsed `.drv` file.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Derivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and which of their outputs are needed.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    /// Input store paths that are not outputs of derivations.
    pub input_srcs: BTreeSet<StorePath>,
    /// The system it builds on (`x86_64-linux`, …).
    pub platform: String,
    /// The program that builds it.
    pub builder: ByteString,
    /// The builder's arguments.
    pub args: Vec<ByteString>,
    /// The builder's environment: names are text (Nix attribute names in practice), values
    /// any bytes.
    pub env: BTreeMap<String, ByteString>,
}

/// What a builder gets: a derivation without its input derivations (`writeDerivation` /
/// `readDerivation` in `src/libstore/derivations.cc`, 2.26.3).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct BasicDerivation {
    /// Outputs by name.
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input store paths (the hook sends the whole input closure here).
    pub input_srcs: BTreeSet<StorePath>,
    /// The system it builds on.
    pub platform: String,
    /// The program that builds it.
    pub builder: ByteString,
    /// The builder's arguments.
    pub args: Vec<ByteString>,
    /// The builder's environment: names are text (Nix attribute names in practice), values
    /// any bytes.
    pub env: BTreeMap<String, ByteString>,
}

/// Why a `.drv` could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DrvError {
    /// A `DrvWithVersion(…)` derivation (experimental dynamic derivations).
    #[error(
        "unsupported derivation format (dynamic derivations): DrvWithVersion({0:?}, …); \
         only Derive(…) derivations are supported"
    )]
    UnsupportedVersion(String),
    /// Not the ATerm syntax of a derivation.
    #[error("invalid derivation at byte {offset}: expected {expected}")]
    Syntax {
        /// Where, in bytes from the start.
        offset: usize,
        /// What the syntax allows there.
        expected: &'static str,
    },
    /// A string that is not UTF-8.
    #[error("invalid derivation at byte {offset}: string is not valid UTF-8")]
    NotUtf8 {
        /// Where the string starts, in bytes from the start.
        offset: usize,
    },
    /// A store path that is not valid.
    #[error("invalid derivation: {what} '{value}': {source}")]
    BadStorePath {
        /// Which field.
        what: &'static str,
        /// The string.
        value: String,
        /// Why it is not a store path.
        #[source]
        source: StorePathError,
    },
    /// A name or path listed twice.
    #[error("invalid derivation: duplicate {what} '{key}'")]
    Duplicate {
        /// Which list.
        what: &'static str,
        /// The repeated entry.
        key: String,
    },
    /// An output whose three strings form none of the kinds Nix accepts.
    #[error("invalid derivation: output '{name}': {reason}")]
    BadOutput {
        /// The output's name.
        name: String,
        /// What is wrong.
        reason: OutputError,
    },
    /// A name, output field or platform with `"` or `\`, which Nix would not escape there, so
    /// the file could not be written back identically.
    #[error(
        "invalid derivation: {what} {value:?} contains '\"' or '\\', which Nix writes unescaped"
    )]
    Unprintable {
        /// Which field.
        what: &'static str,
        /// Its value.
        value: String,
    },
    /// Bytes after the final `)`.
    #[error("invalid derivation: {0} bytes of trailing data after the final ')'")]
    TrailingData(usize),
}

// ----------------------------------------------------------------------------------------------
// Parser

#[derive(Debug)]
enum PErrKind {
    Expected(&'static str),
    NotUtf8,
}

#[derive(Debug)]
struct PErr<'a> {
    at: &'a [u8],
    kind: PErrKind,
}

impl<'a> ParseError<&'a [u8]> for PErr<'a> {
    fn from_error_kind(at: &'a [u8], _: ErrorKind) -> Self {
        PErr {
            at,
            kind: PErrKind::Expected("valid syntax"),
        }
    }

    fn append(_: &'a [u8], _: ErrorKind, other: Self) -> Self {
        other
    }
}

impl<'a> ContextError<&'a [u8]> for PErr<'a> {
    fn add_context(_: &'a [u8], ctx: &'static str, mut other: Self) -> Self {
        // Keep the innermost expectation; only replace nom's generic one.
        if matches!(other.kind, PErrKind::Expected("valid syntax")) {
            other.kind = PErrKind::Expected(ctx);
        }
        other
    }
}

type Res<'a, T> = IResult<&'a [u8], T, PErr<'a>>;

/// The literal `t`; on mismatch, the error says `expected <expected>`.
fn lit<'a>(
    t: &'static str,
    expected: &'static str,
) -> impl Parser<&'a [u8], Output = &'a [u8], Error = PErr<'a>> {
    context(expected, tag(t.as_bytes()))
}

/// A quoted string that must be UTF-8 (paths, names, the platform).
fn string(i: &[u8]) -> Res<'_, String> {
    let (rest, b) = bytes_string(i)?;
    match String::from_utf8(b) {
        Ok(v) => Ok((rest, v)),
        Err(_) => Err(nom::Err::Failure(PErr {
            at: &i[1..],
            kind: PErrKind::NotUtf8,
        })),
    }
}

/// A quoted string of any bytes (builder, args, env values).
fn byte_string(i: &[u8]) -> Res<'_, ByteString> {
    let (rest, b) = bytes_string(i)?;
    Ok((rest, ByteString(b)))
}

/// A quoted string, unescaped. Fails softly if there is no opening quote (so a list can end
/// there), hard on anything wrong after it.
fn bytes_string(i: &[u8]) -> Res<'_, Vec<u8>> {
    let Some(s) = i.strip_prefix(b"\"") else {
        return Err(nom::Err::Error(PErr {
            at: i,
            kind: PErrKind::Expected("'\"'"),
        }));
    };
    let mut out: Vec<u8> = Vec::new();
    let mut j = 0;
    loop {
        let Some(k) = s[j..].iter().position(|&c| c == b'"' || c == b'\\') else {
            return Err(nom::Err::Failure(PErr {
                at: &s[s.len()..],
                kind: PErrKind::Expected("closing '\"' of a string"),
            }));
        };
        out.extend_from_slice(&s[j..j + k]);
        j += k;
        if s[j] == b'"' {
            break;
        }
        let Some(&c) = s.get(j + 1) else {
            return Err(nom::Err::Failure(PErr {
                at: &s[s.len()..],
                kind: PErrKind::Expected("a character after '\\'"),
            }));
        };
        out.push(match c {
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            c => c,
        });
        j += 2;
    }
    Ok((&s[j + 1..], out))
}

/// `[item,item,…]`.
fn list<'a, O>(
    item: fn(&'a [u8]) -> Res<'a, O>,
) -> impl Parser<&'a [u8], Output = Vec<O>, Error = PErr<'a>> {
    delimited(
        lit("[", "'['"),
        separated_list0(lit(",", "','"), item),
        cut(lit("]", "']' or ','")),
    )
}

/// `,` followed by `p`, committed.
fn comma<'a, O>(
    p: impl Parser<&'a [u8], Output = O, Error = PErr<'a>>,
) -> impl Parser<&'a [u8], Output = O, Error = PErr<'a>> {
    preceded(cut(lit(",", "','")), cut(p))
}

/// `("name","path","hashAlgo","hash")`
fn output(i: &[u8]) -> Res<'_, (String, DerivationOutput)> {
    let (i, _) = lit("(", "'('").parse(i)?;
    let (i, name) = cut(string).parse(i)?;
    let (i, path) = comma(string).parse(i)?;
    let (i, hash_algo) = comma(string).parse(i)?;
    let (i, hash) = comma(string).parse(i)?;
    let (i, _) = cut(lit(")", "')'")).parse(i)?;
    Ok((
        i,
        (
            name,
            DerivationOutput {
                path,
                hash_algo,
                hash,
            },
        ),
    ))
}

/// `("/nix/store/….drv",["out",…])`
fn input_drv(i: &[u8]) -> Res<'_, (String, Vec<String>)> {
    let (i, _) = lit("(", "'('").parse(i)?;
    let (i, path) = cut(string).parse(i)?;
    let (i, outs) = comma(list(string)).parse(i)?;
    let (i, _) = cut(lit(
        ")",
        "')' (dynamic derivation inputs are not supported)",
    ))
    .parse(i)?;
    Ok((i, (path, outs)))
}

/// `("key","value")`
fn env_pair(i: &[u8]) -> Res<'_, (String, ByteString)> {
    let (i, _) = lit("(", "'('").parse(i)?;
    let (i, k) = cut(string).parse(i)?;
    let (i, v) = comma(byte_string).parse(i)?;
    let (i, _) = cut(lit(")", "')'")).parse(i)?;
    Ok((i, (k, v)))
}

type RawDrv = (
    Vec<(String, DerivationOutput)>,
    Vec<(String, Vec<String>)>,
    Vec<String>,
    String,
    ByteString,
    Vec<ByteString>,
    Vec<(String, ByteString)>,
);

fn aterm(i: &[u8]) -> Res<'_, RawDrv> {
    let (i, _) = lit("Derive(", "'Derive('").parse(i)?;
    let (i, outputs) = cut(list(output)).parse(i)?;
    let (i, input_drvs) = comma(list(input_drv)).parse(i)?;
    let (i, input_srcs) = comma(list(string)).parse(i)?;
    let (i, platform) = comma(string).parse(i)?;
    let (i, builder) = comma(byte_string).parse(i)?;
    let (i, args) = comma(list(byte_string)).parse(i)?;
    let (i, env) = comma(list(env_pair)).parse(i)?;
    let (i, _) = cut(lit(")", "')'")).parse(i)?;
    Ok((
        i,
        (
            outputs, input_drvs, input_srcs, platform, builder, args, env,
        ),
    ))
}

fn printable(what: &'static str, s: &str) -> Result<(), DrvError> {
    if s.contains(['"', '\\']) {
        Err(DrvError::Unprintable {
            what,
            value: s.to_string(),
        })
    } else {
        Ok(())
    }
}

fn store_path(what: &'static str, s: &str) -> Result<StorePath, DrvError> {
    StorePath::from_absolute(s).map_err(|source| DrvError::BadStorePath {
        what,
        value: s.to_string(),
        source,
    })
}

fn insert_unique<K: Ord + ToString, V>(
    map: &mut BTreeMap<K, V>,
    what: &'static str,
    k: K,
    v: V,
) -> Result<(), DrvError> {
    if map.contains_key(&k) {
        return Err(DrvError::Duplicate {
            what,
            key: k.to_string(),
        });
    }
    map.insert(k, v);
    Ok(())
}

fn set_unique<T: Ord + ToString>(
    items: impl IntoIterator<Item = T>,
    what: &'static str,
) -> Result<BTreeSet<T>, DrvError> {
    let mut set = BTreeSet::new();
    for x in items {
        if set.contains(&x) {
            return Err(DrvError::Duplicate {
                what,
                key: x.to_string(),
            });
        }
        set.insert(x);
    }
    Ok(set)
}

// ----------------------------------------------------------------------------------------------
// Writer

fn push_unquoted(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// Nix's `printString`.
fn push_escaped(out: &mut Vec<u8>, s: &[u8]) {
    out.push(b'"');
    let mut start = 0;
    for (k, &c) in s.iter().enumerate() {
        let esc = match c {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            _ => continue,
        };
        out.extend_from_slice(&s[start..k]);
        out.extend_from_slice(esc.as_bytes());
        start = k + 1;
    }
    out.extend_from_slice(&s[start..]);
    out.push(b'"');
}

fn push_list<T>(
    out: &mut Vec<u8>,
    items: impl IntoIterator<Item = T>,
    mut f: impl FnMut(&mut Vec<u8>, T),
) {
    out.push(b'[');
    for (k, x) in items.into_iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        f(out, x);
    }
    out.push(b']');
}

// ----------------------------------------------------------------------------------------------
// Options read from the environment / structured attributes

fn structured_attrs(env: &BTreeMap<String, ByteString>) -> Option<serde_json::Value> {
    let j = env.get("__json")?;
    // An unparsable `__json` makes Nix fail the build; here it counts as an empty object.
    Some(
        serde_json::from_slice(j.as_bytes())
            .unwrap_or(serde_json::Value::Object(Default::default())),
    )
}

fn required_system_features(
    env: &BTreeMap<String, ByteString>,
    outputs: &BTreeMap<String, DerivationOutput>,
) -> BTreeSet<String> {
    let mut res: BTreeSet<String> = match structured_attrs(env) {
        Some(attrs) => attrs
            .get("requiredSystemFeatures")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        None => env
            .get("requiredSystemFeatures")
            .map(|s| {
                // `tokenizeString` with its default separators. A feature that is not UTF-8
                // is kept (lossily) so that no builder claims to offer it.
                s.as_bytes()
                    .split(|c| b" \t\n\r".contains(c))
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect()
            })
            .unwrap_or_default(),
    };
    // As `getRequiredSystemFeatures`: outputs whose paths are not known in advance (floating
    // CA, deferred, impure) need the `ca-derivations` feature.
    if !outputs.is_empty() && outputs.values().any(|o| o.path.is_empty()) {
        res.insert("ca-derivations".to_string());
    }
    res
}

fn prefer_local_build(env: &BTreeMap<String, ByteString>) -> bool {
    match structured_attrs(env) {
        Some(attrs) => attrs.get("preferLocalBuild").and_then(|v| v.as_bool()) == Some(true),
        None => env.get("preferLocalBuild").is_some_and(|v| v == "1"),
    }
}

fn is_builtin(builder: &ByteString) -> bool {
    builder.as_bytes().starts_with(b"builtin:")
}

impl Derivation {
    /// Parses a `.drv` file.
    pub fn parse(bytes: &[u8]) -> Result<Derivation, DrvError> {
        let offset = |at: &[u8]| bytes.len() - at.len();
        if let Some(rest) = bytes.strip_prefix(b"DrvWithVersion(") {
            let version = bytes_string(rest)
                .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
                .unwrap_or_default();
            return Err(DrvError::UnsupportedVersion(version));
        }
        let (rest, raw) = aterm(bytes).map_err(|e| match e {
            nom::Err::Error(e) | nom::Err::Failure(e) => match e.kind {
                PErrKind::Expected(expected) => DrvError::Syntax {
                    offset: offset(e.at),
                    expected,
                },
                PErrKind::NotUtf8 => DrvError::NotUtf8 {
                    offset: offset(e.at),
                },
            },
            nom::Err::Incomplete(_) => DrvError::Syntax {
                offset: bytes.len(),
                expected: "more input",
            },
        })?;
        if !rest.is_empty() {
            return Err(DrvError::TrailingData(rest.len()));
        }
        let (raw_outputs, raw_input_drvs, raw_srcs, platform, builder, args, raw_env) = raw;

        let mut outputs = BTreeMap::new();
        for (name, o) in raw_outputs {
            printable("output name", &name)?;
            printable("output path", &o.path)?;
            printable("output hash algorithm", &o.hash_algo)?;
            printable("output hash", &o.hash)?;
            o.validate().map_err(|reason| DrvError::BadOutput {
                name: name.clone(),
                reason,
            })?;
            insert_unique(&mut outputs, "output", name, o)?;
        }

        let mut input_drvs = BTreeMap::new();
        for (path, outs) in raw_input_drvs {
            let p = store_path("input derivation", &path)?;
            for o in &outs {
                printable("input derivation output name", o)?;
            }
            let outs = set_unique(outs, "input derivation output name")?;
            insert_unique(&mut input_drvs, "input derivation", p, outs)?;
        }

        let input_srcs = set_unique(
            raw_srcs
                .iter()
                .map(|s| store_path("input source", s))
                .collect::<Result<Vec<_>, _>>()?,
            "input source",
        )?;

        printable("platform", &platform)?;

        let mut env = BTreeMap::new();
        for (k, v) in raw_env {
            insert_unique(&mut env, "environment variable", k, v)?;
        }

        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// The ATerm, byte for byte as Nix's `Derivation::unparse(store, false)` writes it.
    pub fn to_aterm(&self) -> ByteString {
        let mut s = Vec::with_capacity(4096);
        s.extend_from_slice(b"Derive(");
        push_list(&mut s, &self.outputs, |s, (name, o)| {
            s.push(b'(');
            push_unquoted(s, name);
            for f in [&o.path, &o.hash_algo, &o.hash] {
                s.push(b',');
                push_unquoted(s, f);
            }
            s.push(b')');
        });
        s.push(b',');
        push_list(&mut s, &self.input_drvs, |s, (path, outs)| {
            s.push(b'(');
            push_unquoted(s, &path.to_absolute());
            s.push(b',');
            push_list(s, outs, |s, o| push_unquoted(s, o));
            s.push(b')');
        });
        s.push(b',');
        push_list(&mut s, &self.input_srcs, |s, p| {
            push_unquoted(s, &p.to_absolute())
        });
        s.push(b',');
        push_unquoted(&mut s, &self.platform);
        s.push(b',');
        push_escaped(&mut s, self.builder.as_bytes());
        s.push(b',');
        push_list(&mut s, &self.args, |s, a| push_escaped(s, a.as_bytes()));
        s.push(b',');
        push_list(&mut s, &self.env, |s, (k, v)| {
            s.push(b'(');
            push_escaped(s, k.as_bytes());
            s.push(b',');
            push_escaped(s, v.as_bytes());
            s.push(b')');
        });
        s.push(b')');
        ByteString(s)
    }

    /// The path Nix stores this derivation at (`writeDerivation`): a text-hashed path named
    /// `<name>.drv` whose references are the input sources and input derivations.
    pub fn store_path(&self, name: &str) -> Result<StorePath, StorePathError> {
        let mut refs = self.input_srcs.clone();
        refs.extend(self.input_drvs.keys().cloned());
        store_path::make_text_path(
            &Hash::sha256_of(self.to_aterm().as_bytes()),
            &refs,
            &format!("{name}.drv"),
        )
    }

    /// System features a builder must have, as Nix computes them
    /// (`getRequiredSystemFeatures`): `requiredSystemFeatures` from the structured attributes
    /// (`__json`) if present, else the whitespace-separated env variable; plus
    /// `ca-derivations` if some output's path is not known in advance.
    pub fn required_system_features(&self) -> BTreeSet<String> {
        required_system_features(&self.env, &self.outputs)
    }

    /// `preferLocalBuild` (`"1"` in the env, or `true` in structured attributes).
    pub fn prefer_local_build(&self) -> bool {
        prefer_local_build(&self.env)
    }

    /// Whether the builder is one of Nix's built-ins (`builtin:fetchurl`, …).
    pub fn is_builtin(&self) -> bool {
        is_builtin(&self.builder)
    }

    /// The part sent to a builder, optionally with a different set of input sources (the stock
    /// hook sends the whole input closure there).
    pub fn to_basic(&self, input_srcs_override: Option<BTreeSet<StorePath>>) -> BasicDerivation {
        BasicDerivation {
            outputs: self.outputs.clone(),
            input_srcs: input_srcs_override.unwrap_or_else(|| self.input_srcs.clone()),
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }
}

impl BasicDerivation {
    /// Writes the wire form (`writeDerivation`): outputs sorted by name (name, path,
    /// hashAlgo, hash), input sources, platform, builder, args, env.
    pub fn write(&self, buf: &mut BytesMut) {
        wire::put_u64(buf, self.outputs.len() as u64);
        for (name, o) in &self.outputs {
            wire::put_str(buf, name);
            wire::put_str(buf, &o.path);
            wire::put_str(buf, &o.hash_algo);
            wire::put_str(buf, &o.hash);
        }
        store_path::put_store_path_set(buf, &self.input_srcs);
        wire::put_str(buf, &self.platform);
        wire::put_bytes(buf, self.builder.as_bytes());
        wire::put_u64(buf, self.args.len() as u64);
        for a in &self.args {
            wire::put_bytes(buf, a.as_bytes());
        }
        wire::put_u64(buf, self.env.len() as u64);
        for (k, v) in &self.env {
            wire::put_str(buf, k);
            wire::put_bytes(buf, v.as_bytes());
        }
    }

    /// Reads the wire form (`readDerivation`), validating each output as Nix does.
    pub async fn read<R: AsyncRead + Unpin + ?Sized>(
        r: &mut R,
    ) -> Result<BasicDerivation, WireError> {
        let n = wire::read_len(r, "derivation outputs", wire::MAX_COLLECTION_LEN).await?;
        let mut outputs = BTreeMap::new();
        for _ in 0..n {
            let name = wire::read_string(r).await?;
            let o = DerivationOutput {
                path: wire::read_string(r).await?,
                hash_algo: wire::read_string(r).await?,
                hash: wire::read_string(r).await?,
            };
            if let Err(reason) = o.validate() {
                return Err(WireError::bad(
                    "derivation output",
                    format!("'{name}': {reason}"),
                ));
            }
            if outputs.contains_key(&name) {
                return Err(WireError::bad(
                    "derivation output",
                    format!("'{name}' appears twice"),
                ));
            }
            outputs.insert(name, o);
        }
        let input_srcs = store_path::read_store_path_set(r).await?;
        let platform = wire::read_string(r).await?;
        let builder = ByteString(wire::read_bytes(r).await?);
        let n = wire::read_len(r, "list", wire::MAX_COLLECTION_LEN).await?;
        let mut args = Vec::with_capacity(n.min(1024) as usize);
        for _ in 0..n {
            args.push(ByteString(wire::read_bytes(r).await?));
        }
        let n = wire::read_len(r, "map", wire::MAX_COLLECTION_LEN).await?;
        let mut env = BTreeMap::new();
        for _ in 0..n {
            let k = wire::read_string(r).await?;
            env.insert(k, ByteString(wire::read_bytes(r).await?));
        }
        Ok(BasicDerivation {
            outputs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// See [`Derivation::required_system_features`].
    pub fn required_system_features(&self) -> BTreeSet<String> {
        required_system_features(&self.env, &self.outputs)
    }

    /// See [`Derivation::prefer_local_build`].
    pub fn prefer_local_build(&self) -> bool {
        prefer_local_build(&self.env)
    }

    /// See [`Derivation::is_builtin`].
    pub fn is_builtin(&self) -> bool {
        is_builtin(&self.builder)
    }
}
