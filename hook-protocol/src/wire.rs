//! Nix's wire primitives (`src/libutil/serialise.cc`, identical in 2.8, 2.26 and 2.35):
//! u64 little-endian integers, length-prefixed byte strings padded to 8 bytes, and
//! collections of them.
//!
//! Decoding is async over any [`AsyncRead`]; encoding is synchronous into a [`BytesMut`], which
//! the caller then writes in one go. Every length and count read from the wire is checked
//! against a limit before anything is allocated, and buffers grow only as bytes arrive, so a
//! hostile or truncated stream can neither exhaust memory nor cause a panic.

use std::collections::{BTreeMap, BTreeSet};

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest string accepted by default (structured-attrs `__json` values can be megabytes).
pub(crate) const MAX_STRING_LEN: u64 = 64 * 1024 * 1024;
/// Largest number of elements accepted in a list, set or map.
pub const MAX_COLLECTION_LEN: u64 = 1 << 20;

/// An error decoding or encoding a wire value.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream ended before the value (named here) was complete.
    #[error("the stream ended in the middle of {0}")]
    Truncated(&'static str),
    /// A length or count read from the wire is above the limit for it.
    #[error("{what} of length {len} exceeds the limit of {max}")]
    TooLong {
        /// What was being read ("string", "list", …).
        what: &'static str,
        /// The length the stream claimed.
        len: u64,
        /// The limit it exceeded.
        max: u64,
    },
    /// The padding after a string held a non-zero byte.
    #[error("non-zero padding after a string")]
    NonZeroPadding,
    /// A string that must be UTF-8 was not.
    #[error("{0} is not valid UTF-8")]
    NotUtf8(&'static str),
    /// A value that does not mean anything at this place (an unknown tag, a bad path, …).
    #[error("invalid {what}: {value}")]
    BadValue {
        /// What was being read.
        what: &'static str,
        /// The offending value, as text.
        value: String,
    },
    /// Reading failed other than by the stream ending.
    #[error("I/O error: {0}")]
    Io(#[source] std::io::Error),
}

impl WireError {
    /// A [`WireError::BadValue`] for `what`, with `value` shown as text.
    pub fn bad(what: &'static str, value: impl std::fmt::Display) -> Self {
        WireError::BadValue {
            what,
            value: value.to_string(),
        }
    }

    fn from_io(e: std::io::Error, what: &'static str) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            WireError::Truncated(what)
        } else {
            WireError::Io(e)
        }
    }
}

/// `Result` with [`WireError`] as the default error.
pub type Result<T, E = WireError> = std::result::Result<T, E>;

/// Number of zero bytes that follow a string of `len` bytes.
pub(crate) fn padding_len(len: u64) -> usize {
    ((8 - (len % 8)) % 8) as usize
}

/// Reads a little-endian u64.
pub async fn read_u64<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)
        .await
        .map_err(|e| WireError::from_io(e, "an integer"))?;
    Ok(u64::from_le_bytes(b))
}

/// A boolean is a u64 that must be 0 or 1.
pub(crate) async fn read_bool<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<bool> {
    match read_u64(r).await? {
        0 => Ok(false),
        1 => Ok(true),
        v => Err(WireError::bad("boolean", v)),
    }
}

/// Reads a u64 that must fit in `usize` and not exceed `max`.
pub async fn read_len<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    what: &'static str,
    max: u64,
) -> Result<usize> {
    let len = read_u64(r).await?;
    if len > max {
        return Err(WireError::TooLong { what, len, max });
    }
    usize::try_from(len).map_err(|_| WireError::TooLong { what, len, max })
}

/// Reads the zero padding after a string of `len` bytes.
pub(crate) async fn read_padding<R: AsyncRead + Unpin + ?Sized>(r: &mut R, len: u64) -> Result<()> {
    let pad = padding_len(len);
    if pad > 0 {
        let mut b = [0u8; 8];
        r.read_exact(&mut b[..pad])
            .await
            .map_err(|e| WireError::from_io(e, "string padding"))?;
        if b[..pad].iter().any(|&x| x != 0) {
            return Err(WireError::NonZeroPadding);
        }
    }
    Ok(())
}

/// Reads a byte string of at most `max` bytes. The buffer grows as data arrives, so a claimed
/// length the stream does not back up costs no memory.
pub(crate) async fn read_bytes_limited<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    max: u64,
) -> Result<Vec<u8>> {
    let len = read_len(r, "string", max).await?;
    let mut buf = Vec::with_capacity(len.min(64 * 1024));
    let got = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| WireError::from_io(e, "a string"))?;
    if got != len {
        return Err(WireError::Truncated("a string"));
    }
    read_padding(r, len as u64).await?;
    Ok(buf)
}

/// Reads a byte string (length, bytes, zero padding to 8) of at most 64 MiB.
pub async fn read_bytes<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Vec<u8>> {
    read_bytes_limited(r, MAX_STRING_LEN).await
}

/// Reads a string that must be UTF-8 (store paths, setting names, output names, …).
pub async fn read_string<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<String> {
    String::from_utf8(read_bytes(r).await?).map_err(|_| WireError::NotUtf8("a string"))
}

/// Reads a list of UTF-8 strings: a count (at most [`MAX_COLLECTION_LEN`]), then each string.
pub async fn read_string_list<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<Vec<String>> {
    let n = read_len(r, "list", MAX_COLLECTION_LEN).await?;
    let mut out = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        out.push(read_string(r).await?);
    }
    Ok(out)
}

/// Reads a set of strings: the same encoding as a list; duplicates collapse.
pub async fn read_string_set<R: AsyncRead + Unpin + ?Sized>(r: &mut R) -> Result<BTreeSet<String>> {
    Ok(read_string_list(r).await?.into_iter().collect())
}

/// Reads a map of strings: a count, then key and value for each entry.
pub(crate) async fn read_string_map<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<BTreeMap<String, String>> {
    let n = read_len(r, "map", MAX_COLLECTION_LEN).await?;
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let k = read_string(r).await?;
        let v = read_string(r).await?;
        out.insert(k, v);
    }
    Ok(out)
}

/// Writes a little-endian u64.
pub fn put_u64(buf: &mut BytesMut, v: u64) {
    buf.put_u64_le(v);
}

/// Writes a boolean as the u64 0 or 1.
pub fn put_bool(buf: &mut BytesMut, v: bool) {
    buf.put_u64_le(u64::from(v));
}

/// Writes a byte string: its length, the bytes, and zero padding to a multiple of 8.
pub fn put_bytes(buf: &mut BytesMut, b: &[u8]) {
    buf.put_u64_le(b.len() as u64);
    buf.put_slice(b);
    buf.put_bytes(0, padding_len(b.len() as u64));
}

/// Writes a string as a byte string.
pub fn put_str(buf: &mut BytesMut, s: &str) {
    put_bytes(buf, s.as_bytes());
}

/// Writes a list or set of strings; a `BTreeSet` iterates in the byte-wise order Nix expects.
pub fn put_strings<I, S>(buf: &mut BytesMut, items: I)
where
    I: IntoIterator<Item = S>,
    I::IntoIter: ExactSizeIterator,
    S: AsRef<str>,
{
    let it = items.into_iter();
    buf.put_u64_le(it.len() as u64);
    for s in it {
        put_str(buf, s.as_ref());
    }
}

/// Writes a map of strings: the count, then key and value for each entry in key order.
pub(crate) fn put_string_map(buf: &mut BytesMut, map: &BTreeMap<String, String>) {
    buf.put_u64_le(map.len() as u64);
    for (k, v) in map {
        put_str(buf, k);
        put_str(buf, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn string_round_trip_matches_reference_bytes() {
        let mut b = BytesMut::new();
        put_str(&mut b, "out");
        assert_eq!(
            &b[..],
            &[3, 0, 0, 0, 0, 0, 0, 0, b'o', b'u', b't', 0, 0, 0, 0, 0]
        );
        let mut r = &b[..];
        assert_eq!(read_string(&mut r).await.unwrap(), "out");
        assert!(r.is_empty());
    }

    #[tokio::test]
    async fn empty_string_is_just_a_length() {
        let mut b = BytesMut::new();
        put_str(&mut b, "");
        assert_eq!(&b[..], &[0u8; 8]);
    }

    #[tokio::test]
    async fn rejects_non_zero_padding() {
        let bytes = [1u8, 0, 0, 0, 0, 0, 0, 0, b'x', 0, 0, 1, 0, 0, 0, 0];
        let err = read_string(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, WireError::NonZeroPadding), "{err}");
    }

    #[tokio::test]
    async fn huge_length_is_an_error_not_an_allocation() {
        let bytes = u64::MAX.to_le_bytes();
        let err = read_bytes(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, WireError::TooLong { .. }), "{err}");
        let bytes = (MAX_STRING_LEN - 1).to_le_bytes();
        let err = read_bytes(&mut &bytes[..]).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated(_)), "{err}");
    }

    #[tokio::test]
    async fn truncated_integer() {
        let err = read_u64(&mut &[1u8, 2, 3][..]).await.unwrap_err();
        assert!(matches!(err, WireError::Truncated(_)));
    }

    #[tokio::test]
    async fn bool_accepts_only_zero_and_one() {
        assert!(read_bool(&mut &1u64.to_le_bytes()[..]).await.unwrap());
        assert!(read_bool(&mut &2u64.to_le_bytes()[..]).await.is_err());
    }

    #[tokio::test]
    async fn map_round_trip() {
        let mut m = BTreeMap::new();
        m.insert("b".to_string(), "2".to_string());
        m.insert("a".to_string(), "1".to_string());
        let mut b = BytesMut::new();
        put_string_map(&mut b, &m);
        assert_eq!(read_string_map(&mut &b[..]).await.unwrap(), m);
    }
}
