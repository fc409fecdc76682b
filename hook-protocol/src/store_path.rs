//! Store paths (`src/libstore/path.cc`), how Nix computes them (`makeStorePath`,
//! `makeFixedOutputPath`, `makeTextPath` in `src/libstore/store-api.cc` /
//! `store-dir-config.cc`), and their wire form (the full printed path; `""` for an absent
//! optional path).

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::hash::{Hash, HashAlgo, nix32_decode, nix32_encode};
use crate::wire::{self, WireError};

/// The only store directory nixdock supports.
pub const STORE_DIR: &str = "/nix/store";
/// Length of the nix32 hash part of a store path (160 bits).
pub(crate) const HASH_PART_LEN: usize = 32;
/// Longest store path name Nix accepts (`StorePath::MaxPathLen`).
pub const MAX_NAME_LEN: usize = 211;

/// A path directly below [`STORE_DIR`]: `<32-char nix32 digest>-<name>`.
///
/// Ordered by its printed form, like Nix's `StorePath` (which compares base names).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct StorePath {
    digest: [u8; 20],
    /// `<hash part>-<name>`; the hash part is always the nix32 form of `digest`.
    base_name: String,
}

/// Why a string is not a valid store path or store path name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorePathError {
    /// An absolute path that is not directly below [`STORE_DIR`].
    #[error("path '{0}' is not in the Nix store ({STORE_DIR})")]
    NotInStore(String),
    /// Shorter than a hash part and a dash.
    #[error("'{0}' is too short to be a valid store path")]
    TooShort(String),
    /// The first 32 characters are not the nix32 form of a 20-byte digest.
    #[error("store path '{0}' has an invalid nix32 hash part")]
    BadHashPart(String),
    /// The hash part is not followed by `-`.
    #[error("'{0}' can't name a store path because the hash part is not followed by a '-'")]
    NoDash(String),
    /// The name after the dash breaks Nix's rules for store path names.
    #[error("store path name '{name}' is not valid: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Which rule it breaks.
        reason: NameError,
    },
}

/// Which of Nix's rules a store path name breaks ([`StorePathError::BadName`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The name is empty.
    #[error("name must not be empty")]
    Empty,
    /// The name is longer than 211 characters.
    #[error("name must be no longer than {MAX_NAME_LEN} characters")]
    TooLong,
    /// `.`, `..`, or starting with `.-` / `..-`.
    #[error("first dash-separated component must not be '.' or '..'")]
    DotComponent,
    /// A character outside `[A-Za-z0-9+\-._?=]`.
    #[error("contains illegal character {0:?}")]
    IllegalChar(char),
    /// A text-hashed path (a `.drv`) with a hash other than SHA-256.
    #[error("text-hashed paths need a sha256 hash, not {0}")]
    TextNeedsSha256(HashAlgo),
    /// A git-hashed path with a hash other than SHA-1.
    #[error("git file ingestion must use a SHA-1 hash")]
    GitNeedsSha1,
}

impl From<StorePathError> for WireError {
    fn from(e: StorePathError) -> Self {
        WireError::bad("store path", e)
    }
}

/// Checks a store path name as Nix 2.26/2.35 `checkName` does: non-empty, at most 211
/// characters, only `[A-Za-z0-9+\-._?=]`, and not `.`, `..` or starting with `.-` / `..-`.
/// (Names such as `.foo` are valid; Nix 2.8 did not even reject `.` and `..`.)
pub(crate) fn check_name(name: &str) -> Result<(), StorePathError> {
    let bad = |reason: NameError| {
        Err(StorePathError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return bad(NameError::Empty);
    }
    if name.len() > MAX_NAME_LEN {
        return bad(NameError::TooLong);
    }
    let b = name.as_bytes();
    if name == "." || name == ".." || name.starts_with(".-") || name.starts_with("..-") {
        return bad(NameError::DotComponent);
    }
    if let Some(&c) = b.iter().find(|&&c| {
        !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'-' | b'.' | b'_' | b'?' | b'='))
    }) {
        return bad(NameError::IllegalChar(char::from(c)));
    }
    Ok(())
}

impl StorePath {
    /// Builds a store path from its digest and name.
    pub fn from_parts(digest: [u8; 20], name: &str) -> Result<StorePath, StorePathError> {
        check_name(name)?;
        let mut base_name = nix32_encode(&digest);
        base_name.push('-');
        base_name.push_str(name);
        Ok(StorePath { digest, base_name })
    }

    /// Parses `<hash>-<name>` (no directory).
    pub fn from_base_name(s: &str) -> Result<StorePath, StorePathError> {
        if s.len() < HASH_PART_LEN + 1 {
            return Err(StorePathError::TooShort(s.to_string()));
        }
        let (hash, rest) = s.split_at_checked(HASH_PART_LEN).ok_or_else(|| {
            // A multi-byte character straddles the end of the hash part.
            StorePathError::BadHashPart(s.to_string())
        })?;
        let digest: [u8; 20] = nix32_decode(hash)
            .ok()
            .and_then(|d| d.try_into().ok())
            .ok_or_else(|| StorePathError::BadHashPart(s.to_string()))?;
        let name = rest
            .strip_prefix('-')
            .ok_or_else(|| StorePathError::NoDash(s.to_string()))?;
        check_name(name)?;
        Ok(StorePath {
            digest,
            base_name: s.to_string(),
        })
    }

    /// Parses `/nix/store/<hash>-<name>`.
    pub fn from_absolute(s: &str) -> Result<StorePath, StorePathError> {
        match s.strip_prefix(STORE_DIR).and_then(|r| r.strip_prefix('/')) {
            Some(base) if !base.contains('/') => StorePath::from_base_name(base),
            _ => Err(StorePathError::NotInStore(s.to_string())),
        }
    }

    /// The 32-character nix32 hash part.
    pub fn hash_part(&self) -> &str {
        &self.base_name[..HASH_PART_LEN]
    }

    /// The 20-byte digest the hash part encodes.
    pub fn digest(&self) -> &[u8; 20] {
        &self.digest
    }

    /// The name: everything after the hash part and its dash.
    pub fn name(&self) -> &str {
        &self.base_name[HASH_PART_LEN + 1..]
    }

    /// `<hash>-<name>`.
    pub fn base_name(&self) -> &str {
        &self.base_name
    }

    /// Whether the name ends in `.drv`.
    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }

    /// For a `.drv` path, the derivation's name (the store name without `.drv`).
    pub fn derivation_name(&self) -> Option<&str> {
        self.name().strip_suffix(".drv")
    }

    /// `/nix/store/<hash>-<name>`.
    pub fn to_absolute(&self) -> String {
        format!("{STORE_DIR}/{}", self.base_name)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{STORE_DIR}/{}", self.base_name)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({STORE_DIR}/{})", self.base_name)
    }
}

impl FromStr for StorePath {
    type Err = StorePathError;

    /// Parses an absolute path.
    fn from_str(s: &str) -> Result<StorePath, StorePathError> {
        StorePath::from_absolute(s)
    }
}

impl PartialOrd for StorePath {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for StorePath {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.base_name.cmp(&other.base_name)
    }
}

impl serde::Serialize for StorePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for StorePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        StorePath::from_absolute(&s).map_err(serde::de::Error::custom)
    }
}

// ----------------------------------------------------------------------------------------------
// Computing store paths

/// XOR-folds a digest into `size` bytes (`compressHash`).
fn compress_hash(digest: &[u8], size: usize) -> Vec<u8> {
    let mut out = vec![0u8; size];
    for (i, &b) in digest.iter().enumerate() {
        out[i % size] ^= b;
    }
    out
}

/// Nix's `makeStorePath`: the path whose digest is the SHA-256 of
/// `<type>:<algo>:<base16 hash>:/nix/store:<name>`, folded to 20 bytes.
///
/// # Panics
/// If `name` is not a valid store path name; use [`try_make_store_path`] for untrusted names.
pub fn make_store_path(type_: &str, hash: &Hash, name: &str) -> StorePath {
    try_make_store_path(type_, hash, name)
        .unwrap_or_else(|e| panic!("make_store_path with an invalid name: {e}"))
}

/// [`make_store_path`] that reports an invalid name instead of panicking.
pub fn try_make_store_path(
    type_: &str,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    check_name(name)?;
    let fingerprint = format!(
        "{type_}:{}:{}:{STORE_DIR}:{name}",
        hash.algo(),
        hash.to_base16()
    );
    let h = Hash::sha256_of(fingerprint.as_bytes());
    let digest: [u8; 20] = compress_hash(h.digest(), 20)
        .try_into()
        .expect("compressed to 20 bytes");
    StorePath::from_parts(digest, name)
}

/// How a content-addressed path's contents are hashed: the method prefix of a `.drv` output's
/// hashAlgo field (`src/libstore/content-address.cc`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContentAddressMethod {
    /// The file's bytes (no prefix).
    Flat,
    /// The NAR serialisation (`r:`).
    Nar,
    /// Flat, with references stored in the path type (`text:`), used for `.drv` files.
    Text,
    /// Git tree/blob hashing (`git:`, experimental).
    Git,
}

impl ContentAddressMethod {
    /// The prefix as written before the algorithm in a `.drv` (`""`, `r:`, `text:`, `git:`).
    pub fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Flat => "",
            ContentAddressMethod::Nar => "r:",
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Git => "git:",
        }
    }

    /// Splits a `.drv` hashAlgo field such as `r:sha256` into method and algorithm name
    /// (`ContentAddressMethod::parsePrefix`).
    pub(crate) fn split_prefix(s: &str) -> (ContentAddressMethod, &str) {
        for m in [
            ContentAddressMethod::Nar,
            ContentAddressMethod::Git,
            ContentAddressMethod::Text,
        ] {
            if let Some(rest) = s.strip_prefix(m.prefix()) {
                return (m, rest);
            }
        }
        (ContentAddressMethod::Flat, s)
    }
}

/// Appends the references to a path type (`makeType`): `<type>:/nix/store/a:/nix/store/b…`.
fn make_type(mut type_: String, references: &BTreeSet<StorePath>, self_ref: bool) -> String {
    for r in references {
        type_.push(':');
        type_.push_str(&r.to_absolute());
    }
    if self_ref {
        type_.push_str(":self");
    }
    type_
}

/// Nix's `makeTextPath`: a text-hashed path (e.g. a `.drv`) with `references`.
/// Nix requires a SHA-256 hash here.
pub(crate) fn make_text_path(
    hash: &Hash,
    references: &BTreeSet<StorePath>,
    name: &str,
) -> Result<StorePath, StorePathError> {
    if hash.algo() != HashAlgo::Sha256 {
        return Err(StorePathError::BadName {
            name: name.to_string(),
            reason: NameError::TextNeedsSha256(hash.algo()),
        });
    }
    try_make_store_path(&make_type("text".into(), references, false), hash, name)
}

/// Nix's `makeFixedOutputPath` for a path without references (a fixed-output derivation's
/// output, or something added with `nix-store --add[-fixed]`). `Text` gives Nix's
/// `makeTextPath` with no references (it needs a SHA-256 hash).
pub fn make_fixed_output_path(
    method: ContentAddressMethod,
    hash: &Hash,
    name: &str,
) -> Result<StorePath, StorePathError> {
    match method {
        ContentAddressMethod::Text => make_text_path(hash, &BTreeSet::new(), name),
        ContentAddressMethod::Nar if hash.algo() == HashAlgo::Sha256 => {
            try_make_store_path("source", hash, name)
        }
        _ => {
            if method == ContentAddressMethod::Git && hash.algo() != HashAlgo::Sha1 {
                return Err(StorePathError::BadName {
                    name: name.to_string(),
                    reason: NameError::GitNeedsSha1,
                });
            }
            let inner = format!(
                "fixed:out:{}{}:{}:",
                method.prefix(),
                hash.algo(),
                hash.to_base16()
            );
            try_make_store_path("output:out", &Hash::sha256_of(inner.as_bytes()), name)
        }
    }
}

// ----------------------------------------------------------------------------------------------
// Wire form

/// Reads a store path (full printed path).
pub async fn read_store_path<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<StorePath, WireError> {
    let s = wire::read_string(r).await?;
    Ok(StorePath::from_absolute(&s)?)
}

/// Reads an optional store path: `""` is `None`.
pub async fn read_optional_store_path<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<StorePath>, WireError> {
    let s = wire::read_string(r).await?;
    if s.is_empty() {
        Ok(None)
    } else {
        Ok(Some(StorePath::from_absolute(&s)?))
    }
}

/// Reads a set of store paths (count, then paths). Repeated paths collapse, as in Nix.
pub async fn read_store_path_set<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<BTreeSet<StorePath>, WireError> {
    let n = wire::read_len(r, "store path set", wire::MAX_COLLECTION_LEN).await?;
    let mut out = BTreeSet::new();
    for _ in 0..n {
        out.insert(read_store_path(r).await?);
    }
    Ok(out)
}

/// Writes a store path (full printed path).
pub fn put_store_path(buf: &mut BytesMut, p: &StorePath) {
    wire::put_str(buf, &p.to_absolute());
}

/// Writes an optional store path: `None` is `""`.
pub fn put_optional_store_path(buf: &mut BytesMut, p: Option<&StorePath>) {
    match p {
        Some(p) => put_store_path(buf, p),
        None => wire::put_str(buf, ""),
    }
}

/// Writes a set of store paths; a `BTreeSet` iterates in the order Nix writes.
pub fn put_store_path_set<'a, I>(buf: &mut BytesMut, paths: I)
where
    I: IntoIterator<Item = &'a StorePath>,
    I::IntoIter: ExactSizeIterator,
{
    let it = paths.into_iter();
    wire::put_u64(buf, it.len() as u64);
    for p in it {
        put_store_path(buf, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FOO: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";

    #[test]
    fn parses_and_prints() {
        let p = StorePath::from_absolute(FOO).unwrap();
        assert_eq!(p.hash_part(), "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q");
        assert_eq!(p.name(), "foo");
        assert_eq!(p.to_string(), FOO);
        assert_eq!(p.to_absolute(), FOO);
        assert!(!p.is_derivation());
        assert_eq!(
            StorePath::from_parts(*p.digest(), "foo").unwrap(),
            p,
            "digest must round-trip through nix32"
        );
        let d = StorePath::from_base_name("g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv").unwrap();
        assert!(d.is_derivation());
        assert_eq!(d.derivation_name(), Some("foo"));
    }

    #[test]
    fn rejects_bad_paths() {
        for bad in [
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q_foo",
            "/nix/store/e1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "/nix/store/G1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo/bin",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-fo o",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-.",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-..",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-.-x",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-..-x",
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hé3q-foo",
            "/nix/storeg1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "/gnu/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo",
            "",
        ] {
            assert!(StorePath::from_absolute(bad).is_err(), "accepted {bad:?}");
        }
        let long = format!(
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-{}",
            "a".repeat(212)
        );
        assert!(StorePath::from_absolute(&long).is_err());
        let ok = format!(
            "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-{}",
            "a".repeat(211)
        );
        assert!(StorePath::from_absolute(&ok).is_ok());
        // Nix 2.26+ accepts dot-names other than `.`/`..` components.
        assert!(
            StorePath::from_absolute("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-.foo").is_ok()
        );
        assert!(
            StorePath::from_absolute("/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-...").is_ok()
        );
    }

    #[test]
    fn orders_by_printed_form() {
        let a = StorePath::from_base_name("00000000000000000000000000000001-a").unwrap();
        let b = StorePath::from_base_name("00000000000000000000000000000001-ab").unwrap();
        let c = StorePath::from_base_name("10000000000000000000000000000000-a").unwrap();
        assert!(a < b && b < c);
        // nix32 order is not digest order: the last character holds the first byte's low bits.
        assert!(a.digest() > c.digest());
    }

    #[test]
    fn serde_as_absolute_string() {
        let p = StorePath::from_absolute(FOO).unwrap();
        let j = serde_json::to_string(&p).unwrap();
        assert_eq!(j, format!("\"{FOO}\""));
        assert_eq!(serde_json::from_str::<StorePath>(&j).unwrap(), p);
        assert!(serde_json::from_str::<StorePath>("\"/tmp/x\"").is_err());
    }

    #[test]
    fn fixed_output_paths_from_nix_2_8() {
        // `nix-instantiate --store <tmp>` with Nix 2.8.0 (see tests/data/nix-2.8.0).
        let h = |s| Hash::parse_any(s, None).unwrap();
        let flat = make_fixed_output_path(
            ContentAddressMethod::Flat,
            &h("sha256:5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"),
            "fo-flat",
        )
        .unwrap();
        assert_eq!(
            flat.to_string(),
            "/nix/store/dcdr9gzr8zi424r08bp2kmcd4d2wiw51-fo-flat"
        );
        let rec = make_fixed_output_path(
            ContentAddressMethod::Nar,
            &h("sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
            "fo-rec",
        )
        .unwrap();
        assert_eq!(
            rec.to_string(),
            "/nix/store/md5z1lyvll3yz7326jshp3k740h3qrng-fo-rec"
        );
        let rec_sha1 = make_fixed_output_path(
            ContentAddressMethod::Nar,
            &h("sha1:f572d396fae9206628714fb2ce00f72e94f2258f"),
            "fo-recsha1",
        )
        .unwrap();
        assert_eq!(
            rec_sha1.to_string(),
            "/nix/store/lpxsiwb5522vzbcxy54y83m4708ki4gi-fo-recsha1"
        );
        // `nix-store --add f.txt` (f.txt = "hello\n"): NAR hash, type "source".
        let added = make_store_path(
            "source",
            &h("sha256:1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13"),
            "f.txt",
        );
        assert_eq!(
            added.to_string(),
            "/nix/store/6h9lcbx523532ax1c5g2351w9bm8ykhy-f.txt"
        );
    }

    #[test]
    fn method_prefixes() {
        use ContentAddressMethod::*;
        assert_eq!(
            ContentAddressMethod::split_prefix("r:sha256"),
            (Nar, "sha256")
        );
        assert_eq!(ContentAddressMethod::split_prefix("sha1"), (Flat, "sha1"));
        assert_eq!(
            ContentAddressMethod::split_prefix("text:sha256"),
            (Text, "sha256")
        );
        assert_eq!(
            ContentAddressMethod::split_prefix("git:sha1"),
            (Git, "sha1")
        );
    }

    #[tokio::test]
    async fn wire_round_trip() {
        let p = StorePath::from_absolute(FOO).unwrap();
        let mut buf = BytesMut::new();
        put_store_path(&mut buf, &p);
        put_optional_store_path(&mut buf, None);
        put_optional_store_path(&mut buf, Some(&p));
        put_store_path_set(&mut buf, &BTreeSet::from([p.clone()]));
        let mut r = &buf[..];
        assert_eq!(read_store_path(&mut r).await.unwrap(), p);
        assert_eq!(read_optional_store_path(&mut r).await.unwrap(), None);
        assert_eq!(
            read_optional_store_path(&mut r).await.unwrap(),
            Some(p.clone())
        );
        assert_eq!(
            read_store_path_set(&mut r).await.unwrap(),
            BTreeSet::from([p])
        );
        assert!(r.is_empty());

        let mut buf = BytesMut::new();
        wire::put_str(&mut buf, "/tmp/not-a-store-path");
        let err = read_store_path(&mut &buf[..]).await.unwrap_err();
        assert!(
            matches!(
                err,
                WireError::BadValue {
                    what: "store path",
                    ..
                }
            ),
            "{err}"
        );
    }
}
