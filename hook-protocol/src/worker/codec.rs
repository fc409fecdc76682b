//! The encode/decode trait pair of worker-protocol values, and [`wire_struct!`], the table
//! that lists a message's fields once, each with the protocol versions it exists in, and
//! generates both directions from it.
//!
//! A table row is `field: Codec, [range];`, where `Codec` (a [`Codec`] type) says how the
//! field's value is written and `range` is a half-open range of protocol minor versions
//! (`[16..]` = from 1.16 on, `[11..30]`, `[..30]`, as `GET_PROTOCOL_MINOR` checks in Nix's
//! source); a row without a range exists in every version. A field absent at the negotiated
//! version is not sent and decodes as its type's `Default`. `_: Codec = value, [range];` is an
//! obsolete field: `value` is sent, and whatever arrives is read and dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;

use bytes::BytesMut;
use tokio::io::AsyncRead;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{
    StorePath, put_optional_store_path, put_store_path, put_store_path_set,
    read_optional_store_path, read_store_path, read_store_path_set,
};
use crate::wire::{self, WireError};

use super::ProtocolVersion;

/// A value with a worker-protocol encoding that depends on the negotiated version.
pub trait WireEncode {
    /// Appends the value's encoding at `version` to `buf`.
    fn encode(&self, buf: &mut BytesMut, version: ProtocolVersion);
}

/// A value that can be read from a worker-protocol stream at a negotiated version.
pub trait WireDecode: Sized {
    /// Reads the value as encoded at `version`.
    fn decode<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        version: ProtocolVersion,
    ) -> impl Future<Output = Result<Self, WireError>> + Send;
}

/// What an encoding depends on: the negotiated version and, for [`BuildResult`]'s built
/// outputs, the 2.35 feature `realisation-with-path-not-hash` (which nixdock never offers, so
/// the public traits always encode without it).
///
/// [`BuildResult`]: super::BuildResult
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx {
    pub version: ProtocolVersion,
    pub path_not_hash: bool,
}

impl Ctx {
    pub fn new(version: ProtocolVersion) -> Self {
        Ctx {
            version,
            path_not_hash: false,
        }
    }

    /// Whether a field that exists from minor version `since` until (not including) `until`
    /// is on the wire.
    pub fn has(self, (since, until): (Option<u8>, Option<u8>)) -> bool {
        let minor = self.version.minor();
        since.is_none_or(|s| minor >= s) && until.is_none_or(|u| minor < u)
    }
}

/// How one field is written: a unit type per wire form (several forms share a Rust type).
pub(crate) trait Codec {
    type Value;
    fn put(v: &Self::Value, buf: &mut BytesMut, ctx: Ctx);
    fn get<R: AsyncRead + Unpin + Send + ?Sized>(
        r: &mut R,
        ctx: Ctx,
    ) -> impl Future<Output = Result<Self::Value, WireError>> + Send;
}

/// Defines a unit [`Codec`] type from a put and a get expression.
macro_rules! codec {
    ($(#[$m:meta])* $name:ident: $t:ty,
     put($v:ident, $buf:ident, $pctx:pat) $put:block,
     get($r:ident, $gctx:pat) $get:block) => {
        $(#[$m])*
        pub(crate) struct $name;
        impl Codec for $name {
            type Value = $t;
            fn put($v: &$t, $buf: &mut BytesMut, $pctx: Ctx) $put
            async fn get<R: AsyncRead + Unpin + Send + ?Sized>(
                $r: &mut R,
                $gctx: Ctx,
            ) -> Result<$t, WireError> $get
        }
    };
}

codec!(
    /// A u64.
    U64: u64,
    put(v, buf, _) { wire::put_u64(buf, *v) },
    get(r, _) { wire::read_u64(r).await }
);

codec!(
    /// A boolean that must be 0 or 1.
    Bool: bool,
    put(v, buf, _) { wire::put_bool(buf, *v) },
    get(r, _) { wire::read_bool(r).await }
);

codec!(
    /// A boolean read as Nix's daemon reads `SetOptions` flags: any non-zero value is true.
    LaxBool: bool,
    put(v, buf, _) { wire::put_bool(buf, *v) },
    get(r, _) { Ok(wire::read_u64(r).await? != 0) }
);

codec!(
    /// `verboseBuild`, sent as `lvlError` (0) when true and `lvlVomit` (7) when false.
    VerboseBuild: bool,
    put(v, buf, _) { wire::put_u64(buf, if *v { 0 } else { 7 }) },
    get(r, _) { Ok(wire::read_u64(r).await? == 0) }
);

codec!(
    /// A string that is always present when the field is (`None` is sent as "").
    SomeStr: Option<String>,
    put(v, buf, _) { wire::put_str(buf, v.as_deref().unwrap_or("")) },
    get(r, _) { Ok(Some(wire::read_string(r).await?)) }
);

codec!(
    /// An optional string: "" means none.
    OptStr: Option<String>,
    put(v, buf, _) { wire::put_str(buf, v.as_deref().unwrap_or("")) },
    get(r, _) {
        let s = wire::read_string(r).await?;
        Ok((!s.is_empty()).then_some(s))
    }
);

codec!(
    /// A byte string shown as text, invalid UTF-8 replaced (error messages).
    LossyStr: String,
    put(v, buf, _) { wire::put_str(buf, v) },
    get(r, _) { Ok(String::from_utf8_lossy(&wire::read_bytes(r).await?).into_owned()) }
);

codec!(
    /// A set of strings.
    StringSet: BTreeSet<String>,
    put(v, buf, _) { wire::put_strings(buf, v) },
    get(r, _) { wire::read_string_set(r).await }
);

codec!(
    /// A map of strings.
    StringMap: BTreeMap<String, String>,
    put(v, buf, _) { wire::put_string_map(buf, v) },
    get(r, _) { wire::read_string_map(r).await }
);

codec!(
    /// A store path.
    Path: StorePath,
    put(v, buf, _) { put_store_path(buf, v) },
    get(r, _) { read_store_path(r).await }
);

codec!(
    /// An optional store path: "" means none.
    OptPath: Option<StorePath>,
    put(v, buf, _) { put_optional_store_path(buf, v.as_ref()) },
    get(r, _) { read_optional_store_path(r).await }
);

codec!(
    /// A set of store paths.
    PathSet: BTreeSet<StorePath>,
    put(v, buf, _) { put_store_path_set(buf, v) },
    get(r, _) { read_store_path_set(r).await }
);

codec!(
    /// A SHA-256 NAR hash in base16 without the algorithm prefix (any form is accepted).
    NarHash: Hash,
    put(v, buf, _) { wire::put_str(buf, &v.to_base16()) },
    get(r, _) {
        let s = wire::read_string(r).await?;
        Hash::parse_any(&s, Some(HashAlgo::Sha256)).map_err(|e| WireError::bad("NAR hash", e))
    }
);

codec!(
    /// The optional trusted flag: 0 = unknown, 1 = trusted, 2 = not trusted.
    TrustedFlag: Option<bool>,
    put(v, buf, _) { super::types::put_trusted_flag(buf, *v) },
    get(r, _) { super::types::read_trusted_flag(r).await }
);

/// Defines a [`Codec`] for an `i64` Nix reads as a signed number (`readNum<int64_t>` rejects
/// values above `i64::MAX`), named `what` in errors.
macro_rules! i64_codec {
    ($name:ident, $what:literal) => {
        codec!(
            #[doc = concat!("A signed 64-bit ", $what, ".")]
            $name: i64,
            put(v, buf, _) { wire::put_u64(buf, *v as u64) },
            get(r, _) { read_i64(r, $what).await }
        );
    };
}

i64_codec!(RegistrationTime, "registration time");
i64_codec!(StartTime, "start time");
i64_codec!(StopTime, "stop time");

codec!(
    /// An optional CPU time in microseconds: tag 0, or tag 1 and the value.
    OptMicros: Option<i64>,
    put(v, buf, _) {
        match v {
            None => wire::put_u64(buf, 0),
            Some(us) => {
                wire::put_u64(buf, 1);
                wire::put_u64(buf, *us as u64);
            }
        }
    },
    get(r, _) {
        match wire::read_u64(r).await? {
            0 => Ok(None),
            1 => Ok(Some(read_i64(r, "CPU time").await?)),
            t => Err(WireError::bad("optional tag", t)),
        }
    }
);

/// Reads a u64 that Nix reads as a signed 64-bit value, which must not exceed `i64::MAX`.
async fn read_i64<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    what: &'static str,
) -> Result<i64, WireError> {
    let v = wire::read_u64(r).await?;
    i64::try_from(v).map_err(|_| WireError::bad(what, v))
}

/// Generates the encoder and decoder of a struct from its table of fields (see the module
/// documentation): inherent `encode_in`/`decode_in` taking a [`Ctx`], and [`WireEncode`] and
/// [`WireDecode`] at a plain version. Every field of the struct must be listed (the decoder
/// builds the struct from the rows), in wire order.
///
/// `Type keyed by field: Codec { rows }` puts `field` in front of the rows and also generates
/// `encode_unkeyed_in`/`decode_unkeyed_in` for the form without it.
macro_rules! wire_struct {
    ($ty:ident keyed by $kf:ident : $kc:ty { $($rows:tt)* }) => {
        impl $ty {
            pub(crate) fn encode_unkeyed_in(&self, buf: &mut BytesMut, ctx: $crate::worker::codec::Ctx) {
                $crate::worker::codec::wire_struct!(@enc self buf ctx; $($rows)*);
            }

            pub(crate) async fn decode_unkeyed_in<R: AsyncRead + Unpin + Send + ?Sized>(
                r: &mut R,
                $kf: <$kc as $crate::worker::codec::Codec>::Value,
                ctx: $crate::worker::codec::Ctx,
            ) -> Result<Self, WireError> {
                $crate::worker::codec::wire_struct!(@dec r ctx [$kf]; $($rows)*)
            }

            pub(crate) fn encode_in(&self, buf: &mut BytesMut, ctx: $crate::worker::codec::Ctx) {
                <$kc as $crate::worker::codec::Codec>::put(&self.$kf, buf, ctx);
                self.encode_unkeyed_in(buf, ctx);
            }

            pub(crate) async fn decode_in<R: AsyncRead + Unpin + Send + ?Sized>(
                r: &mut R,
                ctx: $crate::worker::codec::Ctx,
            ) -> Result<Self, WireError> {
                let key = <$kc as $crate::worker::codec::Codec>::get(r, ctx).await?;
                Self::decode_unkeyed_in(r, key, ctx).await
            }
        }
        $crate::worker::codec::wire_struct!(@traits $ty);
    };
    ($ty:ident { $($rows:tt)* }) => {
        impl $ty {
            pub(crate) fn encode_in(&self, buf: &mut BytesMut, ctx: $crate::worker::codec::Ctx) {
                $crate::worker::codec::wire_struct!(@enc self buf ctx; $($rows)*);
            }

            pub(crate) async fn decode_in<R: AsyncRead + Unpin + Send + ?Sized>(
                r: &mut R,
                ctx: $crate::worker::codec::Ctx,
            ) -> Result<Self, WireError> {
                $crate::worker::codec::wire_struct!(@dec r ctx []; $($rows)*)
            }
        }
        $crate::worker::codec::wire_struct!(@traits $ty);
    };

    (@traits $ty:ident) => {
        impl $crate::worker::codec::WireEncode for $ty {
            fn encode(&self, buf: &mut BytesMut, version: ProtocolVersion) {
                self.encode_in(buf, $crate::worker::codec::Ctx::new(version));
            }
        }
        impl $crate::worker::codec::WireDecode for $ty {
            async fn decode<R: AsyncRead + Unpin + Send + ?Sized>(
                r: &mut R,
                version: ProtocolVersion,
            ) -> Result<Self, WireError> {
                Self::decode_in(r, $crate::worker::codec::Ctx::new(version)).await
            }
        }
    };

    // The version range of a row, as (since, until) minor versions.
    (@range) => { (None, None) };
    (@range $lo:literal ..) => { (Some($lo), None) };
    (@range .. $hi:literal) => { (None, Some($hi)) };
    (@range $lo:literal .. $hi:literal) => { (Some($lo), Some($hi)) };

    // Encoder: one statement per row.
    (@enc $s:ident $b:ident $ctx:ident;) => {};
    (@enc $s:ident $b:ident $ctx:ident; _ : $c:ty = $val:expr $(, [$($range:tt)*])? ; $($rest:tt)*) => {
        if $ctx.has($crate::worker::codec::wire_struct!(@range $($($range)*)?)) {
            <$c as $crate::worker::codec::Codec>::put(&$val, $b, $ctx);
        }
        $crate::worker::codec::wire_struct!(@enc $s $b $ctx; $($rest)*);
    };
    (@enc $s:ident $b:ident $ctx:ident; $f:ident : $c:ty $(, [$($range:tt)*])? ; $($rest:tt)*) => {
        if $ctx.has($crate::worker::codec::wire_struct!(@range $($($range)*)?)) {
            <$c as $crate::worker::codec::Codec>::put(&$s.$f, $b, $ctx);
        }
        $crate::worker::codec::wire_struct!(@enc $s $b $ctx; $($rest)*);
    };

    // Decoder: a `let` per row, collecting the field names, then the struct.
    (@dec $r:ident $ctx:ident [$($done:ident)*];) => {
        Ok(Self { $($done),* })
    };
    (@dec $r:ident $ctx:ident [$($done:ident)*]; _ : $c:ty = $val:expr $(, [$($range:tt)*])? ; $($rest:tt)*) => {{
        if $ctx.has($crate::worker::codec::wire_struct!(@range $($($range)*)?)) {
            <$c as $crate::worker::codec::Codec>::get($r, $ctx).await?;
        }
        $crate::worker::codec::wire_struct!(@dec $r $ctx [$($done)*]; $($rest)*)
    }};
    (@dec $r:ident $ctx:ident [$($done:ident)*]; $f:ident : $c:ty, [$($range:tt)*] ; $($rest:tt)*) => {{
        let $f = if $ctx.has($crate::worker::codec::wire_struct!(@range $($range)*)) {
            <$c as $crate::worker::codec::Codec>::get($r, $ctx).await?
        } else {
            Default::default()
        };
        $crate::worker::codec::wire_struct!(@dec $r $ctx [$($done)* $f]; $($rest)*)
    }};
    (@dec $r:ident $ctx:ident [$($done:ident)*]; $f:ident : $c:ty ; $($rest:tt)*) => {{
        let $f = <$c as $crate::worker::codec::Codec>::get($r, $ctx).await?;
        $crate::worker::codec::wire_struct!(@dec $r $ctx [$($done)* $f]; $($rest)*)
    }};
}

pub(crate) use wire_struct;
