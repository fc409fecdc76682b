//! Checking a fixed output's content against the hash its `.drv` states, while its NAR streams
//! in, and the content address it is registered with.
//!
//! What Nix itself requires of a fixed output when it builds one (`registerOutputs` in Nix 2.8
//! `local-derivation-goal.cc`, 2.26 the same, 2.34 `derivation-builder.cc` and
//! `derivation-check.cc`), and so what the hook requires of one that comes from a builder:
//!
//! - flat (`outputHashMode = "flat"`, also `text`): the output is one **non-executable**
//!   regular file (Nix refuses an executable one with "should be a non-executable regular
//!   file"); the hash is over the file's bytes;
//! - recursive (`r:`): the hash is over the output's NAR serialisation;
//! - no references at all, not even to itself (2.26 and 2.34: "fixed-output derivations must
//!   not reference store paths"; 2.8 folds a self-reference into the path, which would then
//!   differ from the `.drv`'s);
//! - algorithms md5, sha1, sha256, sha512 (whatever `parseHashType` knows); `text` only with
//!   sha256; git-hashed outputs (experimental) are not supported here and fail clearly.
//!
//! The content address is rendered as `ContentAddress::render` does (identical in 2.8, 2.26
//! and 2.34): `fixed:<algo>:<nix32>` flat, `fixed:r:<algo>:<nix32>` recursive,
//! `text:sha256:<nix32>` text.

use std::collections::BTreeSet;

use hook_protocol::derivation::DerivationOutput;
use hook_protocol::hash::{Hash, HashAlgo};
use hook_protocol::store_path::{ContentAddressMethod, StorePath, StorePathError};

/// A content address: how the content was hashed, and the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentAddress {
    pub method: ContentAddressMethod,
    pub hash: Hash,
}

impl ContentAddress {
    /// The form Nix stores in `ValidPaths.ca` and prints in `nix path-info --json`.
    pub fn render(&self) -> String {
        let prefix = match self.method {
            ContentAddressMethod::Text => "text:",
            ContentAddressMethod::Flat => "fixed:",
            ContentAddressMethod::Nar => "fixed:r:",
            ContentAddressMethod::Git => "fixed:git:",
        };
        format!("{prefix}{}", self.hash)
    }

    /// The content address a fixed output of a `.drv` must have: `None` for an
    /// input-addressed output; an error for the kinds this hook cannot verify (floating,
    /// impure and git-hashed outputs) or a `.drv` whose output path does not follow from its
    /// hash. `drv_name` is the derivation's name (its `.drv` name without `.drv`).
    pub fn of_output(
        drv_name: &str,
        output_name: &str,
        output: &DerivationOutput,
    ) -> Result<Option<ContentAddress>, OutputCaError> {
        if output.hash_algo.is_empty() {
            return Ok(None);
        }
        let output_name = output_name.to_string();
        if !output.is_fixed() {
            return Err(OutputCaError::NotFixed { output_name });
        }
        let Some((method, _)) = output.method_and_algo() else {
            return Err(OutputCaError::UnknownAlgo {
                output_name,
                algo: output.hash_algo.clone(),
            });
        };
        let Some(hash) = output.fixed_hash() else {
            return Err(OutputCaError::BadHash {
                output_name,
                hash: output.hash.clone(),
            });
        };
        match method {
            ContentAddressMethod::Git => return Err(OutputCaError::Git { output_name }),
            ContentAddressMethod::Text if hash.algo() != HashAlgo::Sha256 => {
                return Err(OutputCaError::TextNotSha256 {
                    output_name,
                    algo: hash.algo(),
                });
            }
            _ => {}
        }
        // The .drv is the local store's own, but check that the path Nix locked is the one its
        // hash names, so the content check below checks the right thing.
        let computed = match output.fixed_output_path(drv_name, &output_name) {
            None => return Err(OutputCaError::NoPath { output_name }),
            Some(Err(source)) => {
                return Err(OutputCaError::BadPath {
                    output_name,
                    source,
                });
            }
            Some(Ok(p)) => p,
        };
        if output.path() != Some(computed.clone()) {
            return Err(OutputCaError::WrongPath {
                output_name,
                path: output.path.clone(),
                computed,
            });
        }
        Ok(Some(ContentAddress { method, hash }))
    }
}

/// Why a `.drv`'s output has no content address this hook can check
/// ([`ContentAddress::of_output`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputCaError {
    #[error(
        "output '{output_name}' is content-addressed without a fixed hash (floating or impure), which nixdock does not support"
    )]
    NotFixed { output_name: String },
    #[error("output '{output_name}': unknown hash algorithm '{algo}'")]
    UnknownAlgo { output_name: String, algo: String },
    #[error("output '{output_name}': unparsable hash '{hash}'")]
    BadHash { output_name: String, hash: String },
    #[error("output '{output_name}' is git-hashed (experimental), which nixdock cannot verify")]
    Git { output_name: String },
    #[error("output '{output_name}' is text-hashed with {algo}; Nix allows only sha256")]
    TextNotSha256 { output_name: String, algo: HashAlgo },
    #[error("output '{output_name}': no fixed output path")]
    NoPath { output_name: String },
    #[error("output '{output_name}': {source}")]
    BadPath {
        output_name: String,
        source: StorePathError,
    },
    #[error("output '{output_name}' is at '{path}', but its hash gives '{computed}'")]
    WrongPath {
        output_name: String,
        path: String,
        computed: StorePath,
    },
}

/// Checks the references a builder claims for `path`: a fixed output has none; any other
/// output's lie in `allowed` (the input closure and the derivation's own outputs). Returns the
/// offending references, sorted, in the error.
pub fn check_references(
    path: &StorePath,
    references: &BTreeSet<StorePath>,
    fixed: bool,
    allowed: &BTreeSet<StorePath>,
) -> Result<(), ReferenceError> {
    if fixed {
        if references.is_empty() {
            return Ok(());
        }
        return Err(ReferenceError::FixedHasReferences {
            path: path.clone(),
            references: references.iter().cloned().collect(),
        });
    }
    let outside: Vec<StorePath> = references.difference(allowed).cloned().collect();
    if outside.is_empty() {
        return Ok(());
    }
    Err(ReferenceError::Outside {
        path: path.clone(),
        outside,
    })
}

/// References a builder claims that its output may not have ([`check_references`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error(
        "the builder says fixed output {path} references {}, but fixed-output derivations must not reference store paths",
        list(.references.iter())
    )]
    FixedHasReferences {
        path: StorePath,
        /// Sorted.
        references: Vec<StorePath>,
    },
    #[error(
        "the builder says output {path} references {}, which {} neither in the build's input closure nor among the derivation's outputs",
        list(.outside.iter()),
        if .outside.len() == 1 { "is" } else { "are" }
    )]
    Outside {
        path: StorePath,
        /// Sorted.
        outside: Vec<StorePath>,
    },
}

fn list<'a>(paths: impl Iterator<Item = &'a StorePath>) -> String {
    paths
        .map(|p| format!("'{p}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why an output's content does not match its content address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaError {
    #[error(
        "a flat (outputHashMode = \"flat\") fixed output must be a single regular file, but this one is a directory or a symlink"
    )]
    NotRegularFile,
    #[error(
        "a flat (outputHashMode = \"flat\") fixed output must be a non-executable regular file, as Nix builds it, but this one is executable"
    )]
    Executable,
    #[error("hash mismatch: the .drv specifies {specified}, the content has {got}")]
    Mismatch { specified: String, got: String },
}

enum AnyHasher {
    Md5(md5::Context),
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl AnyHasher {
    fn new(algo: HashAlgo) -> AnyHasher {
        use sha1::Digest as _;
        use sha2::Digest as _;
        match algo {
            HashAlgo::Md5 => AnyHasher::Md5(md5::Context::new()),
            HashAlgo::Sha1 => AnyHasher::Sha1(sha1::Sha1::new()),
            HashAlgo::Sha256 => AnyHasher::Sha256(sha2::Sha256::new()),
            HashAlgo::Sha512 => AnyHasher::Sha512(sha2::Sha512::new()),
        }
    }

    fn update(&mut self, b: &[u8]) {
        match self {
            AnyHasher::Md5(h) => h.consume(b),
            AnyHasher::Sha1(h) => sha1::Digest::update(h, b),
            AnyHasher::Sha256(h) => sha2::Digest::update(h, b),
            AnyHasher::Sha512(h) => sha2::Digest::update(h, b),
        }
    }

    fn finish(self) -> Hash {
        let (algo, digest): (HashAlgo, Vec<u8>) = match self {
            AnyHasher::Md5(h) => (HashAlgo::Md5, h.finalize().0.to_vec()),
            AnyHasher::Sha1(h) => (HashAlgo::Sha1, sha1::Digest::finalize(h).to_vec()),
            AnyHasher::Sha256(h) => (HashAlgo::Sha256, sha2::Digest::finalize(h).to_vec()),
            AnyHasher::Sha512(h) => (HashAlgo::Sha512, sha2::Digest::finalize(h).to_vec()),
        };
        // Each digest has its algorithm's size.
        Hash::new(algo, &digest).unwrap_or_else(|_| unreachable!("digest size of {algo}"))
    }
}

/// `algo` of `data`, in one piece.
pub fn hash_of(algo: HashAlgo, data: &[u8]) -> Hash {
    let mut h = AnyHasher::new(algo);
    h.update(data);
    h.finish()
}

/// A NAR string: length, bytes, zero padding to 8.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

/// The bytes a NAR of a single regular file has before its size field, Nix's canonical form
/// (the NAR parser accepts nothing else).
fn flat_prefix(executable: bool) -> Vec<u8> {
    let mut p = Vec::new();
    for s in ["nix-archive-1", "(", "type", "regular"] {
        nar_str(&mut p, s.as_bytes());
    }
    if executable {
        nar_str(&mut p, b"executable");
        nar_str(&mut p, b"");
    }
    nar_str(&mut p, b"contents");
    p
}

enum State {
    /// Recursive: every NAR byte is hashed.
    Nar,
    /// Flat: collecting the NAR's header (everything up to and including the size field).
    Header(Vec<u8>),
    /// Flat: `left` content bytes still to hash.
    Contents {
        left: u64,
    },
    /// Flat: the contents are hashed; the rest is the NAR's closing, checked by the unpacker.
    Trailer,
    Failed(CaError),
}

/// Hashes a NAR stream the way the content address `expected` is computed, fed chunk by chunk
/// (never holding more than the NAR's header), then compares. The NAR's own structure and hash
/// are checked by the unpacker beside it.
pub struct CaHasher {
    expected: ContentAddress,
    hasher: AnyHasher,
    state: State,
    header_len: usize,
}

impl CaHasher {
    pub fn new(expected: ContentAddress) -> CaHasher {
        let hasher = AnyHasher::new(expected.hash.algo());
        let header_len = flat_prefix(false).len() + 8;
        let state = match expected.method {
            ContentAddressMethod::Nar => State::Nar,
            _ => State::Header(Vec::with_capacity(header_len)),
        };
        CaHasher {
            expected,
            hasher,
            state,
            header_len,
        }
    }

    /// Feeds the next bytes of the NAR.
    pub fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match &mut self.state {
                State::Nar => {
                    self.hasher.update(bytes);
                    return;
                }
                State::Header(h) => {
                    let take = (self.header_len - h.len()).min(bytes.len());
                    h.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    if h.len() == self.header_len {
                        self.state = Self::parse_header(h);
                    }
                }
                State::Contents { left } => {
                    let take = (*left).min(bytes.len() as u64) as usize;
                    self.hasher.update(&bytes[..take]);
                    bytes = &bytes[take..];
                    *left -= take as u64;
                    if *left == 0 {
                        self.state = State::Trailer;
                    }
                }
                State::Trailer | State::Failed(_) => return,
            }
        }
    }

    fn parse_header(h: &[u8]) -> State {
        let prefix = flat_prefix(false);
        if h[..prefix.len()] == prefix[..] {
            let size = u64::from_le_bytes(h[prefix.len()..].try_into().unwrap_or([0; 8]));
            return if size == 0 {
                State::Trailer
            } else {
                State::Contents { left: size }
            };
        }
        // The executable marker comes where "contents" would (the header is shorter than the
        // executable form's prefix).
        if h[..] == flat_prefix(true)[..h.len()] {
            return State::Failed(CaError::Executable);
        }
        State::Failed(CaError::NotRegularFile)
    }

    /// The hash of what was fed, if it matches the expected content address. Call after the
    /// whole NAR was fed (and the unpacker accepted it).
    pub fn finish(self) -> Result<ContentAddress, CaError> {
        match self.state {
            State::Failed(e) => return Err(e),
            // A NAR that ended inside its header or contents is refused by the unpacker; if
            // it gets here, it is no single file.
            State::Header(_) | State::Contents { .. } => return Err(CaError::NotRegularFile),
            State::Nar | State::Trailer => {}
        }
        let got = self.hasher.finish();
        if got != self.expected.hash {
            return Err(CaError::Mismatch {
                specified: self.expected.hash.to_sri(),
                got: got.to_sri(),
            });
        }
        Ok(self.expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hook_protocol::derivation::Derivation;
    use hook_protocol::nar::{DumpOptions, dump_path};
    use std::os::unix::fs::PermissionsExt;

    async fn nar_of(p: &std::path::Path) -> Vec<u8> {
        let mut out = Vec::new();
        dump_path(p, &mut out, DumpOptions::default())
            .await
            .unwrap();
        out
    }

    /// Feeds `nar` in pieces of `chunk` bytes.
    fn run(expected: ContentAddress, nar: &[u8], chunk: usize) -> Result<ContentAddress, CaError> {
        let mut h = CaHasher::new(expected);
        for c in nar.chunks(chunk) {
            h.update(c);
        }
        h.finish()
    }

    #[test]
    fn known_digests() {
        // Vectors from Nix's own tests (tests/unit/libutil/hash.cc): "abc".
        assert_eq!(
            hash_of(HashAlgo::Md5, b"abc").to_base16(),
            "900150983cd24fb0d6963f7d28e17f72"
        );
        assert_eq!(
            hash_of(HashAlgo::Sha1, b"abc").to_base16(),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
        assert_eq!(
            hash_of(HashAlgo::Sha256, b"abc").to_base16(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(
            hash_of(HashAlgo::Sha512, b"abc")
                .to_base16()
                .starts_with("ddaf35a193617aba")
        );
    }

    #[tokio::test]
    async fn flat_hashes_the_file_contents_in_any_chunking() {
        let t = tempfile::tempdir().unwrap();
        for (i, content) in [&b""[..], b"x", b"hello\n", &[7u8; 100_003][..]]
            .iter()
            .enumerate()
        {
            let f = t.path().join(format!("f{i}"));
            std::fs::write(&f, content).unwrap();
            let nar = nar_of(&f).await;
            for algo in [
                HashAlgo::Md5,
                HashAlgo::Sha1,
                HashAlgo::Sha256,
                HashAlgo::Sha512,
            ] {
                for method in [ContentAddressMethod::Flat, ContentAddressMethod::Text] {
                    let ca = ContentAddress {
                        method,
                        hash: hash_of(algo, content),
                    };
                    for chunk in [1, 7, 8, 4096, nar.len().max(1)] {
                        assert_eq!(run(ca, &nar, chunk), Ok(ca), "{algo} chunk {chunk}");
                    }
                    let wrong = ContentAddress {
                        method,
                        hash: hash_of(algo, b"something else"),
                    };
                    assert!(matches!(
                        run(wrong, &nar, 4096),
                        Err(CaError::Mismatch { .. })
                    ));
                }
            }
        }
    }

    #[tokio::test]
    async fn flat_refuses_executables_directories_and_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let f = t.path().join("exe");
        std::fs::write(&f, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = ContentAddress {
            method: ContentAddressMethod::Flat,
            hash: hash_of(HashAlgo::Sha256, b"#!/bin/sh\n"),
        };
        assert_eq!(run(ca, &nar_of(&f).await, 3), Err(CaError::Executable));

        let d = t.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        assert_eq!(run(ca, &nar_of(&d).await, 5), Err(CaError::NotRegularFile));
        std::fs::write(d.join("a"), b"#!/bin/sh\n").unwrap();
        assert_eq!(run(ca, &nar_of(&d).await, 5), Err(CaError::NotRegularFile));

        let l = t.path().join("link");
        std::os::unix::fs::symlink("exe", &l).unwrap();
        assert_eq!(run(ca, &nar_of(&l).await, 64), Err(CaError::NotRegularFile));
        // Cut short inside the header.
        assert_eq!(
            run(ca, &nar_of(&f).await[..40], 64),
            Err(CaError::NotRegularFile)
        );
    }

    #[tokio::test]
    async fn recursive_hashes_the_whole_nar() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("dir");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("a"), b"aaa").unwrap();
        std::os::unix::fs::symlink("a", d.join("l")).unwrap();
        let nar = nar_of(&d).await;
        for algo in [
            HashAlgo::Md5,
            HashAlgo::Sha1,
            HashAlgo::Sha256,
            HashAlgo::Sha512,
        ] {
            let ca = ContentAddress {
                method: ContentAddressMethod::Nar,
                hash: hash_of(algo, &nar),
            };
            assert_eq!(run(ca, &nar, 13), Ok(ca));
            let mut bad = nar.clone();
            let n = bad.len();
            bad[n - 20] ^= 1;
            assert!(matches!(run(ca, &bad, 13), Err(CaError::Mismatch { .. })));
        }
    }

    #[test]
    fn renders_like_nix() {
        let h = Hash::parse_any(
            "sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s",
            None,
        )
        .unwrap();
        let ca = |method| ContentAddress { method, hash: h }.render();
        assert_eq!(
            ca(ContentAddressMethod::Flat),
            "fixed:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        assert_eq!(
            ca(ContentAddressMethod::Nar),
            "fixed:r:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
        assert_eq!(
            ca(ContentAddressMethod::Text),
            "text:sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
        );
    }

    #[test]
    fn of_output_reads_the_drv_and_checks_its_path() {
        // `derivation { name = "fo"; outputHash = <sha256 of "hi\n">; … }`: the path follows
        // from the hash.
        let hash = hash_of(HashAlgo::Sha256, b"hi\n");
        let path = hook_protocol::store_path::make_fixed_output_path(
            ContentAddressMethod::Flat,
            &hash,
            "fo",
        )
        .unwrap();
        let drv = format!(
            "Derive([(\"out\",\"{path}\",\"sha256\",\"{}\")],[],[],\"aarch64-linux\",\"/bin/sh\",[],[(\"out\",\"{path}\")])",
            hash.to_base16()
        );
        let drv = Derivation::parse(drv.as_bytes()).unwrap();
        let out = &drv.outputs["out"];
        assert_eq!(
            ContentAddress::of_output("fo", "out", out),
            Ok(Some(ContentAddress {
                method: ContentAddressMethod::Flat,
                hash
            }))
        );
        // Another name gives another path.
        assert!(ContentAddress::of_output("other", "out", out).is_err());
        // Recursive with the same hash is another path too.
        let mut r = out.clone();
        r.hash_algo = "r:sha256".into();
        assert!(ContentAddress::of_output("fo", "out", &r).is_err());
        let mut git = out.clone();
        git.hash_algo = "git:sha1".into();
        assert!(ContentAddress::of_output("fo", "out", &git).is_err());
        let ia = DerivationOutput {
            path: path.to_string(),
            ..Default::default()
        };
        assert_eq!(ContentAddress::of_output("fo", "out", &ia), Ok(None));
    }

    #[test]
    fn references_outside_the_closure_are_named() {
        let p = |n: &str| {
            StorePath::from_absolute(&format!("/nix/store/{}-{n}", "a".repeat(32))).unwrap()
        };
        let allowed: BTreeSet<_> = [p("in"), p("out"), p("dev")].into();
        let ok: BTreeSet<_> = [p("in"), p("out")].into();
        assert!(check_references(&p("out"), &ok, false, &allowed).is_ok());
        let bad: BTreeSet<_> = [p("in"), p("evil"), p("zzz")].into();
        let e = check_references(&p("out"), &bad, false, &allowed)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("-evil'") && e.contains("-zzz'") && !e.contains("-in'"),
            "{e}"
        );
        // A fixed output may reference nothing, not even itself.
        assert!(check_references(&p("out"), &BTreeSet::new(), true, &allowed).is_ok());
        let own: BTreeSet<_> = [p("out")].into();
        assert!(check_references(&p("out"), &own, true, &allowed).is_err());
    }
}
