//! `--keep-failed` (`-K`) for a build in a builder: its Nix keeps the build directory inside the
//! container and says so ("note: keeping build directory '…'") to the hook's daemon connection,
//! not to the user. The hook tells the user where it is instead — which builder (system, engine,
//! container) and the `nixdock shell` command that reaches it — and never copies it to this
//! machine: its files are the builder's to write, and the hook runs as root.
//!
//! The directory named by the builder's Nix is builder-controlled text: it is only displayed,
//! and only when it looks like a plain absolute path.

use std::path::Path;

/// Where a Docker builder is, as the user reaches it with the CLI.
#[derive(Debug, Clone)]
pub struct BuilderPlace {
    pub system: String,
    pub engine: String,
    pub container: String,
    /// The config names more than one engine, so the CLI needs `--engine`.
    pub pool: bool,
    /// The CLI's global options that reach this hook's installation (its config and state
    /// directory, when they are not the defaults), and whether it must run as root.
    pub cli_options: Vec<String>,
    pub as_root: bool,
}

impl BuilderPlace {
    /// `nixdock [options] shell <system> [--engine E] -- <command…>`, quoted for a POSIX shell.
    pub fn shell_command(&self, command: &[&str]) -> String {
        let mut words: Vec<String> = vec!["nixdock".into()];
        words.extend(self.cli_options.iter().map(|o| shell_quote(o)));
        words.push("shell".into());
        words.push(shell_quote(&self.system));
        if self.pool {
            words.push("--engine".into());
            words.push(shell_quote(&self.engine));
        }
        if !command.is_empty() {
            words.push("--".into());
            words.extend(command.iter().map(|w| shell_quote(w)));
        }
        words.join(" ")
    }

    /// The message for a failed build whose directory the builder kept (`dir`, when its Nix
    /// named one that looks like a path).
    pub fn kept_message(&self, drv_path: &str, dir: Option<&str>) -> String {
        let root = if self.as_root { " (as root)" } else { "" };
        let builder = format!(
            "the nixdock {} builder (container {} on engine {})",
            self.system, self.container, self.engine
        );
        match dir {
            Some(dir) => format!(
                "note: the build directory of '{drv_path}' is kept in {builder}, not on this \
                 machine: {dir}\nlook at it with{root}: {}",
                self.shell_command(&["ls", "-la", dir])
            ),
            None => format!(
                "note: the build directory of '{drv_path}' is kept in {builder}, not on this \
                 machine (its Nix did not say where); look for it with{root}: {}",
                self.shell_command(&[
                    "sh",
                    "-c",
                    "ls -ld /tmp/nix-build-* /nix/var/nix/builds/* 2>/dev/null"
                ])
            ),
        }
    }
}

/// The CLI options that point `nixdock` at this hook's config and state directory, unless they
/// are the installed defaults the CLI finds by itself when run as root (the state directory
/// of a hook that is not root depends on its environment: always named).
pub fn cli_options(config: &Path, state: &Path, as_root: bool) -> Vec<String> {
    let mut opts = Vec::new();
    if config != Path::new(crate::config::DEFAULT_CONFIG_PATH) {
        opts.push(format!("--config={}", config.display()));
    }
    if !(as_root && state == Path::new(ROOT_STATE_DIR)) {
        opts.push(format!("--state-dir={}", state.display()));
    }
    opts
}

/// Root's state directory (`StateDir::locate`).
const ROOT_STATE_DIR: &str = "/var/lib/nixdock";

/// The directory in a "keeping build directory" note from the builder's Nix (2.8–2.26 quote
/// it with `'`, 2.34 with `"`; colours stripped), if the note is one and the directory a plain
/// absolute path.
pub fn parse_note(msg: &str) -> Option<String> {
    let plain = strip_ansi(msg);
    let rest = plain.split("keeping build directory ").nth(1)?.trim();
    let dir = rest
        .strip_prefix('\'')
        .and_then(|r| r.strip_suffix('\''))
        .or_else(|| rest.strip_prefix('"').and_then(|r| r.strip_suffix('"')))
        .unwrap_or(rest);
    plain_path(dir).then(|| dir.to_string())
}

/// Absolute, short, no `..`, and only the characters of store names and `/` — nothing a
/// terminal or shell would interpret beyond what [`shell_quote`] covers.
fn plain_path(dir: &str) -> bool {
    dir.starts_with('/')
        // Short enough that the note's command line stays whole (messages are cut at
        // `printable::MESSAGE_LINE_CHARS`).
        && dir.len() <= 512
        && dir
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-?=".contains(&b))
        && !dir.split('/').any(|c| c == "..")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte.
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `w` as one POSIX shell word: as is when it is plain, else in single quotes.
pub fn shell_quote(w: &str) -> String {
    let plain = !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._+-=:,@%".contains(&b));
    if plain {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_of_each_nix_version_give_the_directory() {
        assert_eq!(
            parse_note("note: keeping build directory '/tmp/nix-build-x.drv-0'\n").as_deref(),
            Some("/tmp/nix-build-x.drv-0")
        );
        assert_eq!(
            parse_note("note: keeping build directory \"/nix/var/nix/builds/nix-12-3\"").as_deref(),
            Some("/nix/var/nix/builds/nix-12-3")
        );
        assert_eq!(
            parse_note("note: keeping build directory '\x1b[35;1m/tmp/nix-build-a-1\x1b[0m'")
                .as_deref(),
            Some("/tmp/nix-build-a-1")
        );
    }

    #[test]
    fn anything_but_a_plain_path_is_refused() {
        for bad in [
            "note: keeping build directory '/tmp/x; rm -rf /'",
            "note: keeping build directory '/tmp/../etc'",
            "note: keeping build directory 'tmp/x'",
            "note: keeping build directory '/tmp/a\x07b'",
            "note: keeping build directory '/tmp/$(id)'",
            "building '/nix/store/x.drv'",
        ] {
            assert_eq!(parse_note(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn installed_defaults_are_left_out_of_the_command() {
        let cfg = Path::new(crate::config::DEFAULT_CONFIG_PATH);
        assert!(cli_options(cfg, Path::new(ROOT_STATE_DIR), true).is_empty());
        assert_eq!(
            cli_options(cfg, Path::new(ROOT_STATE_DIR), false),
            ["--state-dir=/var/lib/nixdock"]
        );
        assert_eq!(
            cli_options(Path::new("/x.toml"), Path::new("/s"), true),
            ["--config=/x.toml", "--state-dir=/s"]
        );
    }

    #[test]
    fn the_command_names_the_engine_in_a_pool_and_quotes() {
        let mut p = BuilderPlace {
            system: "x86_64-linux".into(),
            engine: "e2".into(),
            container: "nixdock-ab-e2-x86_64-linux".into(),
            pool: false,
            cli_options: vec!["--state-dir=/var/tmp/my state".into()],
            as_root: true,
        };
        assert_eq!(
            p.shell_command(&["ls", "/tmp/nix-build-a?b=c-0"]),
            "nixdock '--state-dir=/var/tmp/my state' shell x86_64-linux -- ls '/tmp/nix-build-a?b=c-0'"
        );
        p.pool = true;
        p.cli_options.clear();
        assert_eq!(
            p.shell_command(&["ls"]),
            "nixdock shell x86_64-linux --engine e2 -- ls"
        );
        let m = p.kept_message("/nix/store/x.drv", Some("/tmp/nix-build-x-0"));
        assert!(
            m.contains("container nixdock-ab-e2-x86_64-linux on engine e2"),
            "{m}"
        );
        assert!(m.contains("(as root): nixdock shell"), "{m}");
    }
}
