//! `nixdock doctor`: checks everything between `nix build` and a builder container, and
//! prints a fix for every failed check. The most important question is whether Nix will
//! really start nixdock-hook, for the daemon and for direct builds: Nix 2.25–2.33 ignore
//! `build-hook` in the system nix.conf.

mod daemon;
mod engine;
mod installation;
mod machines;
mod nix;
mod running_builders;
mod state_dir;
mod systems;

use serde::Serialize;

use super::Env;
use super::engines::{self, EngineRow};
use super::host;
use super::status::EngineInfo;
use daemon::check_daemon;
use engine::check_engine;
use installation::{check_config, check_hook_program};
use machines::check_builders;
use nix::{check_direct_builds, check_nix};
use running_builders::check_ssh;
use state_dir::check_state_dir;
use systems::check_systems;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Checks, in order:
  - the config file, and nixdock-hook next to this program
  - the state directory: mode 0700, owned by you
  - each Docker engine of the pool (the top-level one, then each
    [engines.NAME], connected at once within 5 s each): it answers, how it
    was found, its TLS or SSH access
  - per served system on each engine: can it run there, is its image present
  - Nix's version, and the build-hook direct builds use
    (`nix show-config` / `nix config show`)
  - the build-hook the running nix-daemon uses: its command line, environment
    and config files, read from /proc (Nix 2.25-2.33 ignore build-hook in
    /etc/nix/nix.conf; this is flagged)
  - machines in Nix's `builders`: listed, and each checked (reachable, host
    key trusted, nix-daemon answering)
  - an SSH (or Engine API exec) and nix-daemon handshake with every running
    builder on each engine
Every failed check prints its fix. Run it as root to see what nix-daemon's hook
sees. Exits 1 when any check fails; warnings do not fail.")]
pub struct Args {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Info,
    Warn,
    Fail,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub status: Status,
    pub detail: String,
    pub fix: Option<String>,
}

#[derive(Debug, Serialize)]
struct Report {
    ok: bool,
    config: String,
    state_dir: String,
    /// The top-level (default) engine, when it answered.
    engine: Option<EngineInfo>,
    /// Every engine of the pool, the top-level one first.
    engines: Vec<EngineRow>,
    nix_version: Option<String>,
    daemon: Option<DaemonInfo>,
    checks: Vec<Check>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct DaemonInfo {
    pid: u32,
    version: Option<String>,
    command_line: Vec<String>,
    build_hook: Option<String>,
    build_hook_source: String,
}

struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, name: &str, status: Status, detail: impl Into<String>, fix: Option<String>) {
        self.0.push(Check {
            name: name.to_string(),
            status,
            detail: detail.into(),
            fix,
        });
    }
    fn ok(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Ok, detail, None);
    }
    fn info(&mut self, name: &str, detail: impl Into<String>) {
        self.push(name, Status::Info, detail, None);
    }
    fn warn(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Warn, detail, Some(fix.into()));
    }
    fn fail(&mut self, name: &str, detail: impl Into<String>, fix: impl Into<String>) {
        self.push(name, Status::Fail, detail, Some(fix.into()));
    }
}

pub async fn run(env: &Env, args: Args) -> anyhow::Result<i32> {
    let mut c = Checks(Vec::new());
    let hook = host::hook_next_to_me()?;

    let config = check_config(&mut c, env);
    check_hook_program(&mut c, &hook);
    // The state directory, looked at without creating it.
    let instance = check_state_dir(&mut c, env);
    // Every engine of the pool, connected at once, each within the hook's deadline.
    let pool = engines::connect_all(&config, None).await?;
    for pe in &pool {
        check_engine(&mut c, env, &config, pe).await;
    }
    check_systems(&mut c, &config, instance.as_deref(), &pool).await;
    let nix = check_nix(&mut c);
    check_direct_builds(&mut c, &nix);
    let daemon = if host::single_user_nix() {
        c.info(
            "nix-daemon",
            "single-user Nix: your builds open the store themselves and run the hook as you; \
             no nix-daemon is involved",
        );
        None
    } else {
        check_daemon(&mut c, &hook)
    };
    // Machines in `builders`.
    if let Some(s) = &nix.settings {
        check_builders(
            &mut c,
            s.builders.as_deref().unwrap_or(""),
            s.system.as_deref(),
        )
        .await;
    }
    // SSH (or the engine's exec) to running builders, engine by engine.
    if let Some(id) = &instance {
        for e in pool.iter().filter_map(|pe| pe.engine.as_ref().ok()) {
            check_ssh(&mut c, e, env, id).await;
        }
    }
    let ok = !c.0.iter().any(|x| x.status == Status::Fail);
    let report = Report {
        ok,
        config: env.config_path.display().to_string(),
        state_dir: env.state_path.display().to_string(),
        engine: pool
            .first()
            .and_then(|pe| pe.engine.as_ref().ok())
            .map(EngineInfo::of),
        engines: pool.iter().map(EngineRow::of).collect(),
        nix_version: nix.version.map(|v| v.1),
        daemon,
        checks: c.0,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(if ok { 0 } else { 1 })
}

fn print_report(r: &Report) {
    for ch in &r.checks {
        let tag = match ch.status {
            Status::Ok => " ok ",
            Status::Info => "info",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        };
        let first = format!("{}: ", ch.name);
        let mut out = Vec::new();
        for (i, l) in ch.detail.lines().enumerate() {
            let text = if i == 0 {
                format!("{first}{l}")
            } else {
                l.to_string()
            };
            out.extend(wrap(&text, 80 - 7));
        }
        if let Some(fix) = &ch.fix
            && ch.status != Status::Ok
        {
            let mut fix_lines = wrap(&format!("fix: {fix}"), 80 - 7).into_iter();
            out.extend(fix_lines.next());
            out.extend(fix_lines.map(|l| format!("     {l}")));
        }
        for (i, l) in out.iter().enumerate() {
            if i == 0 {
                println!("[{tag}] {l}");
            } else {
                println!("       {l}");
            }
        }
    }
    let fails = r.checks.iter().filter(|c| c.status == Status::Fail).count();
    let warns = r.checks.iter().filter(|c| c.status == Status::Warn).count();
    println!();
    if fails == 0 {
        println!("All checks passed ({warns} warning(s)).");
    } else {
        println!("{fails} check(s) failed, {warns} warning(s).");
    }
}

/// Breaks `text` into lines of at most `width` characters at spaces (a longer word stays
/// whole).
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for word in text.split(' ') {
        if !cur.is_empty() && cur.chars().count() + 1 + word.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(word);
    }
    lines.push(cur);
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_at_spaces() {
        assert_eq!(wrap("aaa bbb ccc", 7), vec!["aaa bbb", "ccc"]);
        assert_eq!(wrap("a-very-long-word x", 5), vec!["a-very-long-word", "x"]);
        assert_eq!(wrap("", 5), vec![""]);
    }
}
