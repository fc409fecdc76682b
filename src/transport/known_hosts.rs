//! OpenSSH `known_hosts` files, read the way `ssh` reads them (sshd(8) "SSH_KNOWN_HOSTS FILE
//! FORMAT"), for the user's own remote builders that carry no pinned key.
//!
//! - A line is `[marker] hostpatterns keytype base64key [comment]`; blank lines and `#` lines are
//!   skipped, and so is any line that does not parse (OpenSSH skips them too).
//! - Host patterns are comma-separated, with `*` and `?` wildcards and `!` negation (a matching
//!   negated pattern makes the whole line not match). A non-standard port is written
//!   `[host]:port`. Hashed entries `|1|base64 salt|base64 HMAC-SHA1(salt, name)` match one name.
//! - `@revoked` keys are never accepted. They are treated as revoked for every host, which is
//!   stricter than OpenSSH (which applies them to the hosts they name, usually `*`).
//! - `@cert-authority` lines are ignored: nixdock does not accept host certificates, so they
//!   grant no trust.

use std::path::{Path, PathBuf};

use hmac::{KeyInit, Mac};
use hook_protocol::hash::base64_decode;
use russh::keys::PublicKey;

use super::keys::same_key;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Marker {
    None,
    Revoked,
    CertAuthority,
}

#[derive(Debug, Clone)]
enum Hosts {
    /// `|1|salt|hash`
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
    /// `(negated, lowercased pattern)`
    Patterns(Vec<(bool, String)>),
}

#[derive(Debug, Clone)]
struct Entry {
    marker: Marker,
    hosts: Hosts,
    key: PublicKey,
}

/// The entries of one or more known_hosts files.
#[derive(Debug, Clone, Default)]
pub struct KnownHosts {
    entries: Vec<Entry>,
    /// The files that were read (for messages).
    pub files: Vec<PathBuf>,
}

/// What known_hosts says about one host.
#[derive(Debug, Clone, Default)]
pub struct HostKeysFor {
    /// Keys listed for the host (not revoked).
    pub accepted: Vec<PublicKey>,
    /// Keys that must never be accepted.
    pub revoked: Vec<PublicKey>,
}

/// The name OpenSSH looks up for `host` at `port`: `host`, or `[host]:port` off port 22.
pub fn lookup_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// The files OpenSSH reads by default: `~/.ssh/known_hosts` (and `known_hosts2`) of `home`,
/// then `/etc/ssh/ssh_known_hosts` (and `ssh_known_hosts2`).
pub fn default_files(home: Option<&Path>) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(h) = home {
        v.push(h.join(".ssh/known_hosts"));
        v.push(h.join(".ssh/known_hosts2"));
    }
    v.push(PathBuf::from("/etc/ssh/ssh_known_hosts"));
    v.push(PathBuf::from("/etc/ssh/ssh_known_hosts2"));
    v
}

impl KnownHosts {
    /// Parses known_hosts text; lines that do not parse are skipped.
    pub fn parse(text: &str) -> KnownHosts {
        let mut k = KnownHosts::default();
        k.add_text(text);
        k
    }

    /// Reads each file that exists; unreadable ones are skipped with a debug log, as OpenSSH
    /// does.
    pub fn read_files(paths: &[PathBuf]) -> KnownHosts {
        let mut k = KnownHosts::default();
        for p in paths {
            match std::fs::read(p) {
                Ok(b) => {
                    k.add_text(&String::from_utf8_lossy(&b));
                    k.files.push(p.clone());
                }
                Err(e) => tracing::debug!(path = %p.display(), "known_hosts not read: {e}"),
            }
        }
        k
    }

    fn add_text(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(e) = parse_line(line) {
                self.entries.push(e);
            }
        }
    }

    /// The keys for `host` at `port`, plus every revoked key.
    pub fn lookup(&self, host: &str, port: u16) -> HostKeysFor {
        let name = lookup_name(host, port).to_ascii_lowercase();
        let mut out = HostKeysFor::default();
        for e in &self.entries {
            match e.marker {
                Marker::Revoked => out.revoked.push(e.key.clone()),
                Marker::CertAuthority => {}
                Marker::None if e.hosts.matches(&name) => out.accepted.push(e.key.clone()),
                Marker::None => {}
            }
        }
        out.accepted
            .retain(|k| !out.revoked.iter().any(|r| same_key(k, r)));
        out
    }

    /// Every revoked key, whatever host it names.
    pub fn revoked(&self) -> Vec<PublicKey> {
        self.entries
            .iter()
            .filter(|e| e.marker == Marker::Revoked)
            .map(|e| e.key.clone())
            .collect()
    }
}

fn parse_line(line: &str) -> Option<Entry> {
    let line = line.trim_start();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut words = line.split_ascii_whitespace();
    let mut first = words.next()?;
    let marker = match first {
        "@revoked" => Marker::Revoked,
        "@cert-authority" => Marker::CertAuthority,
        m if m.starts_with('@') => return None,
        _ => Marker::None,
    };
    if marker != Marker::None {
        first = words.next()?;
    }
    let hosts = parse_hosts(first)?;
    let keytype = words.next()?;
    let blob = words.next()?;
    let key = PublicKey::from_openssh(&format!("{keytype} {blob}")).ok()?;
    Some(Entry { marker, hosts, key })
}

fn parse_hosts(field: &str) -> Option<Hosts> {
    if let Some(rest) = field.strip_prefix("|1|") {
        let (salt, hash) = rest.split_once('|')?;
        let salt = base64_decode(salt).ok()?;
        let hash = base64_decode(hash).ok()?;
        if salt.len() != 20 || hash.len() != 20 {
            return None;
        }
        return Some(Hosts::Hashed { salt, hash });
    }
    if field.starts_with('|') {
        return None;
    }
    let pats = field
        .split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.strip_prefix('!') {
            Some(n) => (true, n.to_ascii_lowercase()),
            None => (false, p.to_ascii_lowercase()),
        })
        .collect::<Vec<_>>();
    (!pats.is_empty()).then_some(Hosts::Patterns(pats))
}

impl Hosts {
    fn matches(&self, name: &str) -> bool {
        match self {
            Hosts::Hashed { salt, hash } => {
                let Ok(mut mac) = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt) else {
                    return false;
                };
                mac.update(name.as_bytes());
                mac.verify_slice(hash).is_ok()
            }
            Hosts::Patterns(pats) => {
                let mut positive = false;
                for (negated, p) in pats {
                    if wildcard(p.as_bytes(), name.as_bytes()) {
                        if *negated {
                            return false;
                        }
                        positive = true;
                    }
                }
                positive
            }
        }
    }
}

/// `*` and `?` glob match (OpenSSH's `match_pattern`), iterative so no input can blow the stack.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == b'*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::keys::generate_host_key;

    fn key() -> (PublicKey, String) {
        let k = generate_host_key().unwrap();
        (k.public_key().clone(), k.public_openssh())
    }

    fn hashed(name: &str, salt: &[u8; 20]) -> String {
        let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let h = mac.finalize().into_bytes();
        format!(
            "|1|{}|{}",
            hook_protocol::hash::base64_encode(salt),
            hook_protocol::hash::base64_encode(&h)
        )
    }

    #[test]
    fn plain_patterns_ports_and_negation() {
        let (a, la) = key();
        let (b, lb) = key();
        let (c, lc) = key();
        let kh = KnownHosts::parse(&format!(
            "# comment\n\nbuild.example.org,10.0.0.1 {la}\n[127.0.0.1]:2222 {lb} c\n*.example.org,!secret.example.org {lc}\ngarbage line\n"
        ));
        let got = |h: &str, p: u16| kh.lookup(h, p).accepted;
        assert!(same_key(&got("build.example.org", 22)[0], &a));
        assert!(same_key(&got("BUILD.example.org", 22)[0], &a));
        assert_eq!(
            got("build.example.org", 22).len(),
            2,
            "the wildcard line too"
        );
        assert!(got("10.0.0.1", 2222).is_empty(), "port must match");
        assert!(same_key(&got("127.0.0.1", 2222)[0], &b));
        assert!(got("127.0.0.1", 22).is_empty());
        assert!(same_key(&got("x.example.org", 22)[0], &c));
        assert!(got("secret.example.org", 22).is_empty());
        assert!(got("example.org", 22).is_empty());
    }

    #[test]
    fn hashed_hosts_match_only_their_name() {
        let (a, la) = key();
        let kh = KnownHosts::parse(&format!(
            "{} {la}\n{} {la}\n",
            hashed("builder.lan", &[7; 20]),
            hashed("[127.0.0.1]:2222", &[9; 20])
        ));
        assert!(same_key(&kh.lookup("builder.lan", 22).accepted[0], &a));
        assert!(kh.lookup("builder.lan", 23).accepted.is_empty());
        assert!(kh.lookup("other.lan", 22).accepted.is_empty());
        assert_eq!(kh.lookup("127.0.0.1", 2222).accepted.len(), 1);
    }

    #[test]
    fn revoked_and_cert_authority_grant_nothing() {
        let (a, la) = key();
        let (_, lb) = key();
        let kh = KnownHosts::parse(&format!(
            "host {la}\n@revoked * {la}\n@cert-authority host {lb}\n@bogus host {lb}\n"
        ));
        let r = kh.lookup("host", 22);
        assert!(r.accepted.is_empty());
        assert!(same_key(&r.revoked[0], &a));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard(b"*", b"anything"));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!wildcard(b"a?c", b"abbc"));
        assert!(wildcard(b"*.x.*", b"a.x.y"));
        assert!(!wildcard(b"*.x", b"x"));
        assert!(wildcard(&[b'*'; 64], &[b'a'; 4096]));
    }
}
