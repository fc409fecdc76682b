//! Nix's hashes and their text encodings (`src/libutil/hash.cc` at 2.8.0, 2.26.3 and 2.35.2;
//! Base64 in `src/libutil/util.cc` / `base-n.cc`).
//!
//! Nix prints a hash in four ways: base-16 (lower-case hex), "nix32" (Nix's own base-32 with
//! the alphabet `0123456789abcdfghijklmnpqrsvwxyz` and a little-endian bit order, so it is *not*
//! RFC 4648 base-32), Base64 and SRI (`sha256-<base64>`). Which of the first three is meant is
//! decided purely by the length of the string, exactly as `Hash::parseAny` does.

use std::fmt;
use std::str::FromStr;

use sha2::Digest;

/// A hash algorithm Nix knows. Displayed and parsed as `md5`, `sha1`, `sha256`, `sha512`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HashAlgo {
    /// MD5 (16 bytes).
    Md5,
    /// SHA-1 (20 bytes).
    Sha1,
    /// SHA-256 (32 bytes).
    Sha256,
    /// SHA-512 (64 bytes).
    Sha512,
}

impl HashAlgo {
    /// Digest size in bytes.
    pub const fn size(self) -> usize {
        match self {
            HashAlgo::Md5 => 16,
            HashAlgo::Sha1 => 20,
            HashAlgo::Sha256 => 32,
            HashAlgo::Sha512 => 64,
        }
    }

    /// The name Nix uses: `md5`, `sha1`, `sha256` or `sha512`.
    pub const fn as_str(self) -> &'static str {
        match self {
            HashAlgo::Md5 => "md5",
            HashAlgo::Sha1 => "sha1",
            HashAlgo::Sha256 => "sha256",
            HashAlgo::Sha512 => "sha512",
        }
    }

    /// Length of the base-16 form of a digest of this algorithm.
    pub(crate) const fn base16_len(self) -> usize {
        self.size() * 2
    }

    /// Length of the nix32 form of a digest of this algorithm.
    pub(crate) const fn nix32_len(self) -> usize {
        nix32_len(self.size())
    }

    /// Length of the (padded) Base64 form of a digest of this algorithm.
    pub(crate) const fn base64_len(self) -> usize {
        self.size().div_ceil(3) * 4
    }
}

impl fmt::Display for HashAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for HashAlgo {
    type Err = HashError;

    fn from_str(s: &str) -> Result<Self, HashError> {
        match s {
            "md5" => Ok(HashAlgo::Md5),
            "sha1" => Ok(HashAlgo::Sha1),
            "sha256" => Ok(HashAlgo::Sha256),
            "sha512" => Ok(HashAlgo::Sha512),
            _ => Err(HashError::UnknownAlgo(s.to_string())),
        }
    }
}

/// An error parsing or constructing a hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashError {
    /// The algorithm name is none of `md5`, `sha1`, `sha256`, `sha512`.
    #[error("unknown hash algorithm '{0}'")]
    UnknownAlgo(String),
    /// A digest given to [`Hash::new`] has the wrong number of bytes for its algorithm.
    #[error("a {algo} digest is {expected} bytes, not {got}")]
    WrongDigestSize {
        /// The algorithm.
        algo: HashAlgo,
        /// Its digest size.
        expected: usize,
        /// The size given.
        got: usize,
    },
    /// The string names no algorithm and none was given.
    #[error("hash '{0}' does not include a type, nor is the type otherwise known from context")]
    NoAlgo(String),
    /// The string names an algorithm other than the one given.
    #[error("hash '{hash}' should have type '{expected}'")]
    AlgoMismatch {
        /// The string as given.
        hash: String,
        /// The algorithm the caller expected.
        expected: HashAlgo,
    },
    /// The digest's length is that of none of the encodings for the algorithm.
    #[error("hash '{hash}' has wrong length for hash algorithm '{algo}'")]
    WrongLength {
        /// The digest part of the string.
        hash: String,
        /// The algorithm.
        algo: HashAlgo,
    },
    /// The digest has the length of an encoding but is not valid in it.
    #[error("invalid {encoding} hash '{hash}'")]
    BadEncoding {
        /// The encoding its length implies ("base-16", "base-32", "base-64" or "SRI").
        encoding: &'static str,
        /// The digest part of the string.
        hash: String,
    },
}

const MAX_DIGEST: usize = 64;

/// A digest together with its algorithm.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Hash {
    algo: HashAlgo,
    // Only the first `algo.size()` bytes are meaningful; the rest stay zero so that the derived
    // `PartialEq`/`Hash` are correct.
    bytes: [u8; MAX_DIGEST],
}

impl Hash {
    /// Wraps a digest, checking that its length matches the algorithm.
    pub fn new(algo: HashAlgo, digest: &[u8]) -> Result<Hash, HashError> {
        if digest.len() != algo.size() {
            return Err(HashError::WrongDigestSize {
                algo,
                expected: algo.size(),
                got: digest.len(),
            });
        }
        let mut bytes = [0u8; MAX_DIGEST];
        bytes[..digest.len()].copy_from_slice(digest);
        Ok(Hash { algo, bytes })
    }

    /// Wraps a SHA-256 digest.
    pub fn sha256(digest: [u8; 32]) -> Hash {
        let mut bytes = [0u8; MAX_DIGEST];
        bytes[..32].copy_from_slice(&digest);
        Hash {
            algo: HashAlgo::Sha256,
            bytes,
        }
    }

    /// SHA-256 of `data`.
    pub fn sha256_of(data: &[u8]) -> Hash {
        Hash::sha256(sha2::Sha256::digest(data).into())
    }

    /// SHA-512 of `data`.
    pub fn sha512_of(data: &[u8]) -> Hash {
        let d = sha2::Sha512::digest(data);
        Hash::new(HashAlgo::Sha512, &d).expect("a SHA-512 digest is 64 bytes")
    }

    /// The algorithm.
    pub fn algo(&self) -> HashAlgo {
        self.algo
    }

    /// The digest bytes (as many as the algorithm's size).
    pub fn digest(&self) -> &[u8] {
        &self.bytes[..self.algo.size()]
    }

    /// Lower-case hex, no algorithm prefix.
    pub fn to_base16(&self) -> String {
        base16_encode(self.digest())
    }

    /// Nix's base-32, no algorithm prefix.
    pub fn to_nix32(&self) -> String {
        nix32_encode(self.digest())
    }

    /// Padded standard Base64, no algorithm prefix.
    pub fn to_base64(&self) -> String {
        base64_encode(self.digest())
    }

    /// `<algo>-<base64>`.
    pub fn to_sri(&self) -> String {
        format!("{}-{}", self.algo, self.to_base64())
    }

    /// Parses a hash the way Nix's `Hash::parseAny` does: `<algo>:<base16|nix32|base64>`,
    /// SRI `<algo>-<base64>`, or a bare base-16/nix32/Base64 string when `algo` is given. If
    /// both the string and `algo` name an algorithm they must agree. Base-16 may be upper-case.
    pub fn parse_any(s: &str, algo: Option<HashAlgo>) -> Result<Hash, HashError> {
        let (parsed_algo, rest, is_sri) = if let Some((a, rest)) = s.split_once(':') {
            (Some(a.parse::<HashAlgo>()?), rest, false)
        } else if let Some((a, rest)) = s.split_once('-') {
            (Some(a.parse::<HashAlgo>()?), rest, true)
        } else {
            (None, s, false)
        };
        let algo = match (parsed_algo, algo) {
            (None, None) => return Err(HashError::NoAlgo(s.to_string())),
            (Some(p), Some(a)) if p != a => {
                return Err(HashError::AlgoMismatch {
                    hash: s.to_string(),
                    expected: a,
                });
            }
            (Some(p), _) => p,
            (None, Some(a)) => a,
        };
        Hash::parse_encoded(rest, algo, is_sri)
    }

    /// A bare base-16, nix32 or Base64 digest of a known algorithm (Nix's
    /// `Hash::parseNonSRIUnprefixed`, used for the hash field of `.drv` outputs).
    pub(crate) fn parse_non_sri_unprefixed(s: &str, algo: HashAlgo) -> Result<Hash, HashError> {
        Hash::parse_encoded(s, algo, false)
    }

    fn parse_encoded(rest: &str, algo: HashAlgo, is_sri: bool) -> Result<Hash, HashError> {
        let bad = |encoding| HashError::BadEncoding {
            encoding,
            hash: rest.to_string(),
        };
        let digest = if !is_sri && rest.len() == algo.base16_len() {
            base16_decode(rest).ok_or_else(|| bad("base-16"))?
        } else if !is_sri && rest.len() == algo.nix32_len() {
            nix32_decode(rest).map_err(|_| bad("base-32"))?
        } else if is_sri || rest.len() == algo.base64_len() {
            let d = base64_decode(rest).map_err(|_| bad(if is_sri { "SRI" } else { "base-64" }))?;
            if d.len() != algo.size() {
                return Err(bad(if is_sri { "SRI" } else { "base-64" }));
            }
            d
        } else {
            return Err(HashError::WrongLength {
                hash: rest.to_string(),
                algo,
            });
        };
        Hash::new(algo, &digest)
    }
}

impl fmt::Display for Hash {
    /// `<algo>:<nix32>`, as Nix prints a hash with its type in nix32.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algo, self.to_nix32())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash({}:{})", self.algo, self.to_base16())
    }
}

impl FromStr for Hash {
    type Err = HashError;

    /// A hash that names its algorithm (`algo:…` or SRI).
    fn from_str(s: &str) -> Result<Hash, HashError> {
        Hash::parse_any(s, None)
    }
}

// ----------------------------------------------------------------------------------------------
// Encodings

/// Nix's base-32 alphabet: digits and lower-case letters without `e`, `o`, `u`, `t`.
pub(crate) const NIX32_CHARS: &[u8; 32] = b"0123456789abcdfghijklmnpqrsvwxyz";

const fn nix32_len(bytes: usize) -> usize {
    if bytes == 0 {
        0
    } else {
        (bytes * 8 - 1) / 5 + 1
    }
}

fn nix32_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'd' => Some(c - b'a' + 10),
        b'f'..=b'n' => Some(c - b'f' + 14),
        b'p'..=b's' => Some(c - b'p' + 23),
        b'v'..=b'z' => Some(c - b'v' + 27),
        _ => None,
    }
}

/// Encodes bytes in Nix's base-32 (`printHash32`): the output's *last* character holds the
/// lowest five bits of the first byte.
pub fn nix32_encode(bytes: &[u8]) -> String {
    let len = nix32_len(bytes.len());
    let mut s = String::with_capacity(len);
    for n in (0..len).rev() {
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        let lo = u32::from(bytes[i]) >> j;
        let hi = bytes.get(i + 1).map_or(0, |&x| u32::from(x) << (8 - j));
        s.push(char::from(NIX32_CHARS[((lo | hi) & 0x1f) as usize]));
    }
    s
}

/// An error decoding a nix32 string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nix32Error {
    /// No byte string encodes to this many characters.
    #[error("{0} characters is not the nix32 length of any byte string")]
    BadLength(usize),
    /// A character outside the nix32 alphabet.
    #[error("invalid nix32 character {0:?}")]
    BadChar(char),
    /// The string sets bits beyond the end of the decoded bytes.
    #[error("nix32 string has bits set beyond the end of the data")]
    Overflow,
}

/// Decodes Nix's base-32. The number of bytes is the largest whose encoding has this many
/// characters; lengths no byte string encodes to, and high bits set beyond the last byte, are
/// rejected (as in `Hash::Hash(std::string_view, …)`), so decoding is the exact inverse of
/// [`nix32_encode`].
pub fn nix32_decode(s: &str) -> Result<Vec<u8>, Nix32Error> {
    let s = s.as_bytes();
    let size = s.len() * 5 / 8;
    if nix32_len(size) != s.len() {
        return Err(Nix32Error::BadLength(s.len()));
    }
    let mut out = vec![0u8; size];
    for (n, &c) in s.iter().rev().enumerate() {
        let digit = u32::from(nix32_digit(c).ok_or(Nix32Error::BadChar(char::from(c)))?);
        let b = n * 5;
        let (i, j) = (b / 8, b % 8);
        out[i] |= (digit << j) as u8;
        let carry = digit >> (8 - j);
        if i + 1 < size {
            out[i + 1] |= carry as u8;
        } else if carry != 0 {
            return Err(Nix32Error::Overflow);
        }
    }
    Ok(out)
}

fn base16_encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    s
}

fn base16_decode(s: &str) -> Option<Vec<u8>> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let pairs = s.as_bytes().chunks_exact(2);
    if !pairs.remainder().is_empty() {
        return None;
    }
    pairs
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

const BASE64_CHARS: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard Base64 with `=` padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                s.push(char::from(
                    BASE64_CHARS[(n >> (18 - 6 * k) & 0x3f) as usize],
                ));
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// Decodes Base64 as Nix's `base64Decode` does: stops at the first `=`, skips `\n`, tolerates
/// missing padding, and rejects any other character outside the standard alphabet.
pub fn base64_decode(s: &str) -> Result<Vec<u8>, HashError> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        if c == b'=' {
            break;
        }
        if c == b'\n' {
            continue;
        }
        let d = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => {
                return Err(HashError::BadEncoding {
                    encoding: "base-64",
                    hash: s.to_string(),
                });
            }
        };
        acc = (acc << 6 | u32::from(d)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn sha256_of_empty_string_in_every_encoding() {
        // nix-hash --to-base32 --type sha256 e3b0c4…
        let h = Hash::sha256_of(b"");
        assert_eq!(h.to_base16(), EMPTY_SHA256);
        assert_eq!(
            h.to_nix32(),
            "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
        assert_eq!(
            h.to_base64(),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            h.to_sri(),
            "sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
        assert_eq!(
            h.to_string(),
            "sha256:0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"
        );
    }

    #[test]
    fn nix32_small_values() {
        assert_eq!(nix32_encode(&[]), "");
        assert_eq!(nix32_encode(&[0]), "00");
        assert_eq!(nix32_encode(&[1]), "01");
        assert_eq!(nix32_encode(&[0x1f]), "0z");
        assert_eq!(nix32_encode(&[0x20]), "10");
        assert_eq!(nix32_encode(&[0xff]), "7z");
        assert_eq!(nix32_decode("7z").unwrap(), vec![0xff]);
        assert_eq!(nix32_decode("8z"), Err(Nix32Error::Overflow));
        assert_eq!(nix32_decode("0"), Err(Nix32Error::BadLength(1)));
        assert_eq!(nix32_decode("000"), Err(Nix32Error::BadLength(3)));
        assert_eq!(nix32_decode("0e"), Err(Nix32Error::BadChar('e')));
        assert_eq!(nix32_decode("").unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn nix32_alphabet_decodes_to_its_index() {
        for (i, &c) in NIX32_CHARS.iter().enumerate() {
            assert_eq!(nix32_digit(c), Some(i as u8));
        }
        for c in [b'e', b'o', b'u', b't', b'A', b'-', b' '] {
            assert_eq!(nix32_digit(c), None);
        }
    }

    #[test]
    fn base64_matches_rfc4648_examples() {
        for (plain, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(plain.as_bytes()), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain.as_bytes());
        }
        assert!(base64_decode("Zm9v!").is_err());
        assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
    }

    #[test]
    fn lengths_per_algo() {
        let t = |a: HashAlgo| (a.base16_len(), a.nix32_len(), a.base64_len());
        assert_eq!(t(HashAlgo::Md5), (32, 26, 24));
        assert_eq!(t(HashAlgo::Sha1), (40, 32, 28));
        assert_eq!(t(HashAlgo::Sha256), (64, 52, 44));
        assert_eq!(t(HashAlgo::Sha512), (128, 103, 88));
    }
}
