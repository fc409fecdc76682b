//! What a remote engine said of itself in its `/version` answer, and when it last served a hook,
//! remembered in the state dir (`<state>/engines/<name>.known`) for every hook. Nix's worker
//! starts the hooks of one `nix-build` one after another, each waiting for the previous
//! `# accept`, so a `/version` round trip before accepting (a TLS handshake with a client
//! certificate included: ~9 ms on the test bed's second engine) is paid once per build in a
//! row. A hook that finds the engine served one less than [`FRESH`] ago at the same address only
//! checks that something still listens there before accepting (a TCP connection: it does not
//! prove the engine, so the window is short); every hook talks to it in the API version it gave,
//! so an engine older than bollard's API needs no second connection. A failure to get a builder
//! ready forgets it all, so the next hook asks again (and backs off if it does not answer).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long after the engine last served a hook (its `/version`, or a builder made ready
/// through it) the next hooks accept without asking it: long enough for the hooks Nix starts
/// one after another, short enough that an engine gone since fails hardly any build.
pub const FRESH: Duration = Duration::from_secs(2);

/// What one engine at `addr` answered, and when it last served (`at`, milliseconds since the
/// epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub addr: String,
    pub at: u64,
    /// Its API version as it gave it ("1.41").
    pub api: String,
    pub arch: String,
    pub os: String,
    pub podman: bool,
}

impl Known {
    /// Whether it served less than [`FRESH`] ago (and not in the future: a clock set back).
    pub fn fresh(&self) -> bool {
        let now = now_ms();
        self.at <= now && now - self.at < FRESH.as_millis() as u64
    }

    /// Whether every value is one an engine gives and the file can carry: the API version as
    /// digits and dots, architecture and OS short words. Anything else is not remembered (an
    /// engine's answer is its own to write, and a newline in it would add lines to the file).
    fn plausible(&self) -> bool {
        let word = |v: &str, max: usize| {
            !v.is_empty()
                && v.len() <= max
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        };
        let api = self.api.split('.').collect::<Vec<_>>();
        api.len() == 2
            && api
                .iter()
                .all(|n| !n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit()))
            && word(&self.arch, 32)
            && (self.os.is_empty() || word(&self.os, 32))
            && !self.addr.contains(['\n', '\r'])
    }

    fn to_text(&self) -> String {
        format!(
            "addr={}\nat={}\napi={}\narch={}\nos={}\npodman={}\n",
            self.addr, self.at, self.api, self.arch, self.os, self.podman
        )
    }

    fn parse(text: &str) -> Option<Known> {
        let mut k = Known {
            addr: String::new(),
            at: 0,
            api: String::new(),
            arch: String::new(),
            os: String::new(),
            podman: false,
        };
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            let (key, value) = line.split_once('=')?;
            if !seen.insert(key) {
                return None;
            }
            match key {
                "addr" => k.addr = value.to_string(),
                "at" => k.at = value.parse().ok()?,
                "api" => k.api = value.to_string(),
                "arch" => k.arch = value.to_string(),
                "os" => k.os = value.to_string(),
                "podman" => k.podman = value.parse().ok()?,
                _ => return None,
            }
        }
        (!k.addr.is_empty() && k.plausible()).then_some(k)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.known"))
}

/// What engine `name` answered when it was at `addr`; `None` when nothing (readable) was
/// remembered, or it was about another address.
pub fn read(dir: &Path, name: &str, addr: &str) -> Option<Known> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file(dir, name))
        .ok()?
        .take(MAX_FILE_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    Known::parse(&text).filter(|k| k.addr == addr)
}

/// A remembered answer is a few short lines.
const MAX_FILE_BYTES: u64 = 4096;

/// Remembers `known` for engine `name` (the state dir is the hook user's own, 0700); not
/// synced to disk: a lost answer only means the next hook asks.
pub fn write(dir: &Path, name: &str, known: &Known) {
    if !known.plausible() {
        tracing::debug!(engine = %name, ?known, "not remembered: not an answer an engine gives");
        forget(dir, name);
        return;
    }
    let f = file(dir, name);
    if let Err(e) = crate::state::write_private_cache(&f, known.to_text().as_bytes(), 0o600) {
        tracing::warn!(engine = %name, "cannot remember the engine's answer in {}: {e}", f.display());
    }
}

/// Forgets what engine `name` answered, so the next hook asks it again.
pub fn forget(dir: &Path, name: &str) {
    match std::fs::remove_file(file(dir, name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(engine = %name, "cannot forget the engine's answer: {e}");
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(addr: &str, at: u64) -> Known {
        Known {
            addr: addr.into(),
            at,
            api: "1.41".into(),
            arch: "x86_64".into(),
            os: "linux".into(),
            podman: false,
        }
    }

    #[test]
    fn an_answer_is_read_back_for_its_address_only_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let k = known("tcp://10.0.0.1:2376", now_ms());
        write(dir.path(), "arm", &k);
        assert_eq!(read(dir.path(), "arm", "tcp://10.0.0.1:2376"), Some(k));
        // The config now names another address: nothing is known about that one.
        assert_eq!(read(dir.path(), "arm", "tcp://10.0.0.2:2376"), None);
        assert_eq!(read(dir.path(), "x86", "tcp://10.0.0.1:2376"), None);
        forget(dir.path(), "arm");
        assert_eq!(read(dir.path(), "arm", "tcp://10.0.0.1:2376"), None);
        forget(dir.path(), "arm");
    }

    #[test]
    fn only_a_recent_answer_is_fresh() {
        let now = now_ms();
        let fresh = FRESH.as_millis() as u64;
        assert!(known("a", now).fresh());
        assert!(known("a", now - fresh + 500).fresh());
        assert!(!known("a", now - fresh).fresh());
        // A timestamp ahead of the clock (set back since) proves nothing.
        assert!(!known("a", now + 30_000).fresh());
    }

    #[test]
    fn an_answer_no_engine_gives_is_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let addr = "tcp://10.0.0.1:2376";
        write(dir.path(), "e", &known(addr, now_ms()));
        for bad in [
            Known {
                os: "linux\nat=99999999999999\napi=1.12".into(),
                ..known(addr, now_ms())
            },
            Known {
                arch: "x".repeat(1 << 20),
                ..known(addr, now_ms())
            },
            Known {
                api: "1.41.0".into(),
                ..known(addr, now_ms())
            },
        ] {
            write(dir.path(), "e", &bad);
            // Not written, and what was remembered before is forgotten.
            assert_eq!(read(dir.path(), "e", addr), None);
        }
        // A file past any answer's size is not read whole (its end, and so the answer, is
        // not there).
        let long = format!("tcp://{}:2376", "h".repeat(5000));
        let big = known(&long, now_ms()).to_text();
        std::fs::write(file(dir.path(), "e"), &big).unwrap();
        assert_eq!(read(dir.path(), "e", &long), None);
        assert!(Known::parse(&big).is_some());
    }

    #[test]
    fn a_damaged_file_is_not_an_answer() {
        let dir = tempfile::tempdir().unwrap();
        for text in [
            "",
            "addr=tcp://h:1\n",
            "addr=tcp://h:1\nat=x\napi=1.41\narch=x86_64\n",
            "addr=tcp://h:1\nat=1\napi=1.41\narch=x86_64\nextra=1\n",
            "garbage",
            // A later line may not overrule an earlier one.
            "addr=tcp://h:1\nat=1\napi=1.41\narch=x86_64\napi=1.12\n",
            "addr=tcp://h:1\nat=1\napi=1.41 x\narch=x86_64\n",
        ] {
            std::fs::write(file(dir.path(), "e"), text).unwrap();
            assert_eq!(read(dir.path(), "e", "tcp://h:1"), None, "{text:?}");
        }
    }
}
