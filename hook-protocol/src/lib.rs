//! Nix's wire formats as a build hook needs them: the build-hook channel ([`hook`]) and its
//! `@nix` log lines ([`log`]), a client of the daemon worker protocol 1.21–1.38 ([`worker`]),
//! NAR archives ([`nar`]), `.drv` files ([`derivation`]), store paths ([`store_path`]), hashes
//! ([`hash`]), machines files ([`machines`]), and the primitives under them ([`wire`],
//! [`framed`]). Written from Nix's source (2.8.0, 2.26.3, 2.35.2); no Docker, SSH or policy.
//!
//! Not here: the serve protocol (`nix-store --serve`), the daemon side of the worker protocol,
//! store directories other than `/nix/store`, dynamic derivations. See README.md.

#![warn(missing_docs)]

pub mod derivation;
pub mod framed;
pub mod hash;
pub mod hook;
pub mod log;
pub mod machines;
pub mod nar;
pub mod store_path;
pub mod wire;
pub mod worker;
