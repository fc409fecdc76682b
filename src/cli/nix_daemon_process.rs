//! Finding this machine's nix-daemon processes in /proc (Linux), for `install` (which Nix
//! version to write for) and `doctor` (what the running daemon was started with).
//!
//! Only processes in our own pid namespace count: the nix-daemons of builder containers run
//! in theirs.

use std::path::{Path, PathBuf};

/// The /proc of this machine.
const PROC: &str = "/proc";

/// Every nix-daemon process of this pid namespace (the listening daemon, its per-connection
/// children, `--stdio` ones), lowest pid first.
pub fn nix_daemons() -> Vec<u32> {
    scan(Path::new(PROC)).into_iter().map(|p| p.pid).collect()
}

/// The listening nix-daemon of this machine (not per-connection children, not `--stdio`, not
/// builders in containers); the lowest pid if there are several.
pub fn listening_nix_daemon() -> Option<u32> {
    listening(Path::new(PROC))
}

/// A process's NUL-separated /proc file (`cmdline`, `environ`) as strings; `None` if it
/// cannot be read (gone, or another user's).
pub fn proc_list(pid: u32, file: &str) -> Option<Vec<String>> {
    read_list(&Path::new(PROC).join(pid.to_string()).join(file))
}

/// The program a process runs; `None` if it cannot be read (gone, or another user's).
pub fn process_exe(pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("{PROC}/{pid}/exe")).ok()
}

/// The uid a process runs as (its /proc directory's owner); `None` if it is gone.
pub fn process_uid(pid: u32) -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("{PROC}/{pid}"))
        .ok()
        .map(|m| m.uid())
}

/// Whether this machine has a /proc to look in (not macOS).
pub fn have_proc() -> bool {
    Path::new(PROC).join("self").exists()
}

/// When a process started, in seconds since the epoch.
pub fn process_start(pid: u32) -> Option<i64> {
    let stat = std::fs::read_to_string(format!("{PROC}/{pid}/stat")).ok()?;
    // Field 22 (starttime) is the 20th after the command name.
    let ticks: i64 = stat_field_after_comm(&stat, 19)?.parse().ok()?;
    let btime: i64 = std::fs::read_to_string(format!("{PROC}/stat"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as i64;
    Some(btime + ticks / hz)
}

/// One nix-daemon process as /proc shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DaemonProcess {
    pid: u32,
    /// Its parent's pid (0 if unreadable).
    ppid: u32,
    /// Started as `nix-daemon --stdio` (one connection over stdin/stdout).
    stdio: bool,
}

/// The nix-daemon processes under `proc` that share our pid namespace (a namespace link that
/// cannot be read, ours or theirs, does not exclude a process), lowest pid first.
fn scan(proc: &Path) -> Vec<DaemonProcess> {
    let Ok(dir) = std::fs::read_dir(proc) else {
        return Vec::new();
    };
    let my_ns = std::fs::read_link(proc.join("self/ns/pid")).ok();
    let mut found = Vec::new();
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let dir = proc.join(pid.to_string());
        if comm(&dir).as_deref() != Some("nix-daemon") {
            continue;
        }
        if let (Some(mine), Ok(theirs)) = (&my_ns, std::fs::read_link(dir.join("ns/pid")))
            && *mine != theirs
        {
            continue;
        }
        let stdio = read_list(&dir.join("cmdline"))
            .unwrap_or_default()
            .iter()
            .any(|a| a == "--stdio");
        let ppid = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| stat_field_after_comm(&s, 1)?.parse().ok())
            .unwrap_or(0);
        found.push(DaemonProcess { pid, ppid, stdio });
    }
    found.sort_by_key(|p| p.pid);
    found
}

fn listening(proc: &Path) -> Option<u32> {
    scan(proc)
        .into_iter()
        .find(|p| !p.stdio && comm(&proc.join(p.ppid.to_string())).as_deref() != Some("nix-daemon"))
        .map(|p| p.pid)
}

/// The command name in `<proc>/<pid>/comm`, trimmed.
fn comm(pid_dir: &Path) -> Option<String> {
    let c = std::fs::read_to_string(pid_dir.join("comm")).ok()?;
    Some(c.trim().to_owned())
}

fn read_list(path: &Path) -> Option<Vec<String>> {
    let b = std::fs::read(path).ok()?;
    Some(
        b.split(|&c| c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect(),
    )
}

/// Field `n` (0 = state) after the parenthesised command name of a `/proc/<pid>/stat` line;
/// the name may itself hold spaces and parentheses, so the last `)` ends it.
fn stat_field_after_comm(stat: &str, n: usize) -> Option<&str> {
    stat.rsplit_once(')')?.1.split_whitespace().nth(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc entry: comm, cmdline, stat (with `ppid`) and a pid-namespace link.
    fn process(proc: &Path, pid: u32, comm: &str, args: &[&str], ppid: u32, ns: &str) {
        let d = proc.join(pid.to_string());
        std::fs::create_dir_all(d.join("ns")).unwrap();
        std::fs::write(d.join("comm"), format!("{comm}\n")).unwrap();
        let mut cmdline = Vec::new();
        for a in args {
            cmdline.extend_from_slice(a.as_bytes());
            cmdline.push(0);
        }
        std::fs::write(d.join("cmdline"), cmdline).unwrap();
        std::fs::write(
            d.join("stat"),
            format!("{pid} ({comm}) S {ppid} {pid} {pid} 0"),
        )
        .unwrap();
        std::os::unix::fs::symlink(ns, d.join("ns/pid")).unwrap();
    }

    #[test]
    fn finds_the_listening_daemon_of_our_namespace() {
        let tmp = tempfile::tempdir().unwrap();
        let proc = tmp.path();
        std::fs::create_dir_all(proc.join("self/ns")).unwrap();
        std::os::unix::fs::symlink("pid:[1]", proc.join("self/ns/pid")).unwrap();
        process(proc, 1, "systemd", &["/sbin/init"], 0, "pid:[1]");
        // A builder container's daemon: another namespace, lower pid.
        process(proc, 50, "nix-daemon", &["nix-daemon"], 1, "pid:[2]");
        // A single-user `nix-daemon --stdio`.
        process(
            proc,
            60,
            "nix-daemon",
            &["nix-daemon", "--stdio"],
            1,
            "pid:[1]",
        );
        process(
            proc,
            100,
            "nix-daemon",
            &["/bin/nix-daemon", "--daemon"],
            1,
            "pid:[1]",
        );
        // A per-connection child of the listening daemon.
        process(
            proc,
            120,
            "nix-daemon",
            &["/bin/nix-daemon", "--daemon"],
            100,
            "pid:[1]",
        );
        process(proc, 130, "(sd-pam) x", &["x"], 1, "pid:[1]");

        let pids: Vec<u32> = scan(proc).iter().map(|p| p.pid).collect();
        assert_eq!(pids, [60, 100, 120]);
        assert_eq!(listening(proc), Some(100));
    }

    #[test]
    fn nothing_without_a_daemon_or_proc() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(listening(tmp.path()), None);
        assert!(scan(&tmp.path().join("missing")).is_empty());
    }

    #[test]
    fn stat_fields_after_a_name_with_parentheses() {
        let stat = "42 (a) b) (c) S 7 42 42 0";
        assert_eq!(stat_field_after_comm(stat, 0), Some("S"));
        assert_eq!(stat_field_after_comm(stat, 1), Some("7"));
        assert_eq!(stat_field_after_comm("garbage", 1), None);
    }

    #[test]
    fn the_real_proc_lists_only_nix_daemons() {
        for pid in nix_daemons() {
            // A process may end between the scan and this read.
            if let Some(c) = comm(&Path::new(PROC).join(pid.to_string())) {
                assert_eq!(c, "nix-daemon");
            }
        }
        if let Some(pid) = listening_nix_daemon() {
            assert!(nix_daemons().contains(&pid) || proc_list(pid, "cmdline").is_none());
        }
    }
}
