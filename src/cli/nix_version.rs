//! Nix versions: parsing `nix --version`, and what a version implies for the hook's setup.

use std::path::Path;

/// `X.Y` (and patch) from `nix --version` output such as `nix (Nix) 2.26.3`.
pub fn parse_nix_version(s: &str) -> Option<(u32, u32)> {
    let word = s
        .split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let mut it = word.split('.');
    let major = it.next()?.parse().ok()?;
    let minor: String = it
        .next()?
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    Some((major, minor.parse().ok()?))
}

/// Nix 2.25 to 2.33 overwrite `build-hook` from the system nix.conf with the default
/// (fixed in 2.34).
pub fn has_nix_conf_bug(v: (u32, u32)) -> bool {
    ((2, 25)..(2, 34)).contains(&v)
}

/// Runs `prog --version` and parses it.
pub fn nix_version_of(prog: &Path) -> Option<((u32, u32), String)> {
    let out = std::process::Command::new(prog)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((parse_nix_version(&text)?, text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_versions() {
        assert_eq!(parse_nix_version("nix (Nix) 2.8.0"), Some((2, 8)));
        assert_eq!(parse_nix_version("nix (Nix) 2.26.3\n"), Some((2, 26)));
        assert_eq!(
            parse_nix_version("nix (Nix) 2.18pre20231020"),
            Some((2, 18))
        );
        assert!(!has_nix_conf_bug((2, 8)));
        assert!(has_nix_conf_bug((2, 25)));
        assert!(has_nix_conf_bug((2, 33)));
        assert!(!has_nix_conf_bug((2, 34)));
        assert!(!has_nix_conf_bug((3, 0)));
    }
}
