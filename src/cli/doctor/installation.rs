//! The installation itself: the config file, and nixdock-hook next to this program.

use std::path::Path;

use crate::config::Config;

use super::super::{Env, host};
use super::Checks;

/// The config file parses; what it configures. A broken one fails and the defaults stand in.
pub(super) fn check_config(c: &mut Checks, env: &Env) -> Config {
    match env.config() {
        Ok(cfg) => {
            let what = if env.config_path.exists() {
                if cfg.builders.is_empty() {
                    "no [builders] table: serving the engine's own system and the emulated ones"
                        .to_string()
                } else {
                    format!("{} builder(s) configured", cfg.builders.len())
                }
            } else {
                "absent: defaults apply (`nixdock install` writes a commented one)".to_string()
            };
            c.ok("config", format!("{}: {what}", env.config_path.display()));
            cfg
        }
        Err(e) => {
            c.fail(
                "config",
                format!("{e:#}"),
                format!(
                    "edit {} (every key is listed in the file `nixdock install` writes)",
                    env.config_path.display()
                ),
            );
            Default::default()
        }
    }
}

/// The hook program is installed next to this one.
pub(super) fn check_hook_program(c: &mut Checks, hook: &Path) {
    if host::is_executable(hook) {
        c.ok("hook program", hook.display().to_string());
    } else {
        c.fail(
            "hook program",
            format!("{} is missing or not executable", hook.display()),
            "install nixdock-hook in the same directory as nixdock",
        );
    }
}
