//! The launchd plist of nix-daemon (macOS): `NIX_CONFIG` in its environment (Nix 2.25–2.33).

use std::path::Path;

/// nix-daemon's plist, under the install root.
pub const PLIST: &str = "Library/LaunchDaemons/org.nixos.nix-daemon.plist";
/// nix-daemon's launchd job.
pub const LAUNCHD_LABEL: &str = "org.nixos.nix-daemon";

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn xml_unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// The whitespace before position `at` on its line.
fn indent_at(text: &str, at: usize) -> &str {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let ws = &text[start..at];
    if ws.chars().all(char::is_whitespace) {
        ws
    } else {
        ""
    }
}

/// Adds `NIX_CONFIG = build-hook = <hook>` to the EnvironmentVariables of a launchd plist,
/// editing the XML as text so everything else stays byte for byte. An existing NIX_CONFIG
/// keeps its other settings.
pub fn plist_set_hook(text: &str, hook: &Path) -> anyhow::Result<String> {
    let setting = format!("build-hook = {}", hook.display());
    let bad = |what: &str| anyhow::anyhow!("cannot edit the launchd plist: {what}");
    if let Some(k) = text.find("<key>EnvironmentVariables</key>") {
        let after_key = k + "<key>EnvironmentVariables</key>".len();
        let rest = &text[after_key..];
        let ws = rest.len() - rest.trim_start().len();
        let dict_at = after_key + ws;
        let key_indent = indent_at(text, k).to_string();
        let inner = format!("{key_indent}\t");
        if text[dict_at..].starts_with("<dict/>") {
            let replacement = format!(
                "<dict>\n{inner}<key>NIX_CONFIG</key>\n{inner}<string>{}</string>\n{key_indent}</dict>",
                xml_escape(&setting)
            );
            return Ok(format!(
                "{}{replacement}{}",
                &text[..dict_at],
                &text[dict_at + "<dict/>".len()..]
            ));
        }
        if !text[dict_at..].starts_with("<dict>") {
            return Err(bad("EnvironmentVariables is not followed by a <dict>"));
        }
        let body_start = dict_at + "<dict>".len();
        let body_end = body_start
            + text[body_start..]
                .find("</dict>")
                .ok_or_else(|| bad("unterminated EnvironmentVariables <dict>"))?;
        let body = &text[body_start..body_end];
        if let Some(nk) = body.find("<key>NIX_CONFIG</key>") {
            let s_rel = body[nk..]
                .find("<string>")
                .ok_or_else(|| bad("NIX_CONFIG has no <string> value"))?;
            let v_start = body_start + nk + s_rel + "<string>".len();
            let v_end = v_start
                + text[v_start..]
                    .find("</string>")
                    .ok_or_else(|| bad("unterminated NIX_CONFIG <string>"))?;
            let old = xml_unescape(&text[v_start..v_end]);
            let mut lines: Vec<&str> = old
                .lines()
                .filter(|l| {
                    l.split_once('=')
                        .is_none_or(|(k, _)| k.trim() != "build-hook")
                })
                .collect();
            lines.push(&setting);
            let new = xml_escape(&lines.join("\n"));
            return Ok(format!("{}{new}{}", &text[..v_start], &text[v_end..]));
        }
        let insert = format!(
            "\n{inner}<key>NIX_CONFIG</key>\n{inner}<string>{}</string>",
            xml_escape(&setting)
        );
        return Ok(format!(
            "{}{insert}{}",
            &text[..body_start],
            &text[body_start..]
        ));
    }
    // No EnvironmentVariables yet: add it at the end of the top-level dict.
    let plist_end = text.rfind("</plist>").ok_or_else(|| bad("no </plist>"))?;
    let dict_end = text[..plist_end]
        .rfind("</dict>")
        .ok_or_else(|| bad("no top-level </dict>"))?;
    let indent = text
        .find("<key>")
        .map(|k| indent_at(text, k).to_string())
        .unwrap_or_else(|| "\t".into());
    let line_start = text[..dict_end].rfind('\n').map_or(0, |i| i + 1);
    let (at, prefix) = if text[line_start..dict_end].trim().is_empty() {
        (line_start, String::new())
    } else {
        (dict_end, "\n".to_string())
    };
    let block = format!(
        "{prefix}{indent}<key>EnvironmentVariables</key>\n{indent}<dict>\n{indent}\t<key>NIX_CONFIG</key>\n{indent}\t<string>{}</string>\n{indent}</dict>\n",
        xml_escape(&setting)
    );
    Ok(format!("{}{block}{}", &text[..at], &text[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLIST_NO_ENV: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>org.nixos.nix-daemon</string>
	<key>ProgramArguments</key>
	<array>
		<string>/bin/sh</string>
	</array>
</dict>
</plist>
"#;

    #[test]
    fn plist_gets_environment_variables() {
        let out = plist_set_hook(PLIST_NO_ENV, Path::new("/usr/local/bin/nixdock-hook")).unwrap();
        assert!(out.contains(
            "\t</array>\n\t<key>EnvironmentVariables</key>\n\t<dict>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>build-hook = /usr/local/bin/nixdock-hook</string>\n\t</dict>\n</dict>\n</plist>\n"
        ), "{out}");
        // Idempotent in effect: a second edit keeps one NIX_CONFIG with one build-hook.
        let again = plist_set_hook(&out, Path::new("/x/nixdock-hook")).unwrap();
        assert_eq!(again.matches("<key>NIX_CONFIG</key>").count(), 1);
        assert!(
            again.contains("<string>build-hook = /x/nixdock-hook</string>"),
            "{again}"
        );
    }

    #[test]
    fn plist_keeps_other_environment() {
        let with_env = PLIST_NO_ENV.replace(
            "</array>\n",
            "</array>\n\t<key>EnvironmentVariables</key>\n\t<dict>\n\t\t<key>NIX_SSL_CERT_FILE</key>\n\t\t<string>/etc/ssl/cert.pem</string>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>max-jobs = 4</string>\n\t</dict>\n",
        );
        let out = plist_set_hook(&with_env, Path::new("/h/nixdock-hook")).unwrap();
        assert!(out.contains("<string>/etc/ssl/cert.pem</string>"));
        assert!(
            out.contains("<string>max-jobs = 4\nbuild-hook = /h/nixdock-hook</string>"),
            "{out}"
        );
        let empty = PLIST_NO_ENV.replace(
            "</array>\n",
            "</array>\n\t<key>EnvironmentVariables</key>\n\t<dict/>\n",
        );
        let out = plist_set_hook(&empty, Path::new("/h/nixdock-hook")).unwrap();
        assert!(out.contains("<dict>\n\t\t<key>NIX_CONFIG</key>\n\t\t<string>build-hook = /h/nixdock-hook</string>\n\t</dict>"), "{out}");
    }
}
