//! nix.conf: the `build-hook` line install sets (the system nix.conf, or root's user one).

/// Sets `key = value` in nix.conf text: replaces every uncommented assignment of `key`, or
/// appends one.
pub fn set_conf(original: Option<&str>, key: &str, value: &str) -> String {
    let line = format!("{key} = {value}");
    let text = original.unwrap_or("");
    let is_key = |l: &str| {
        let l = l.split('#').next().unwrap_or("");
        l.split_once('=').is_some_and(|(k, _)| k.trim() == key)
    };
    if text.lines().any(is_key) {
        let mut out = String::with_capacity(text.len() + line.len());
        for l in text.split_inclusive('\n') {
            let (body, nl) = match l.strip_suffix('\n') {
                Some(b) => (b, "\n"),
                None => (l, ""),
            };
            if is_key(body) {
                out.push_str(&line);
            } else {
                out.push_str(body);
            }
            out.push_str(nl);
        }
        return out;
    }
    let mut out = text.to_string();
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(
        "# nixdock-hook builds foreign systems in Docker containers (added by `nixdock install`;\n\
         # `nixdock uninstall` removes it)\n",
    );
    out.push_str(&line);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_conf_appends_or_replaces() {
        let a = set_conf(None, "build-hook", "/h");
        assert!(a.ends_with("build-hook = /h\n"), "{a}");
        let b = set_conf(Some("sandbox = false"), "build-hook", "/h");
        assert!(b.starts_with("sandbox = false\n#"), "{b}");
        let c = set_conf(
            Some("x = 1\nbuild-hook = /old # comment\n# build-hook = /c\ny = 2"),
            "build-hook",
            "/h",
        );
        assert_eq!(c, "x = 1\nbuild-hook = /h\n# build-hook = /c\ny = 2");
    }
}
