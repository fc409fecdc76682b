//! Text that others wrote, made fit for the user's terminal: a builder's error messages, a
//! container's log, an engine's answers. None of it may move the cursor, change colours or
//! titles, reorder what is shown or hide part of it, and none of it may be of any length.

/// Characters kept of one line of a message.
pub const MESSAGE_LINE_CHARS: usize = 1000;
/// Lines kept of a message: the first and the last halves of this many.
pub const MESSAGE_LINES: usize = 100;

/// Unicode's format characters (general category Cf, Unicode 15): invisible, and some change
/// how the text around them reads (bidirectional overrides and isolates) or hide it (tags,
/// zero-width characters).
pub fn format_char(c: char) -> bool {
    matches!(c,
        '\u{ad}'
        | '\u{600}'..='\u{605}'
        | '\u{61c}'
        | '\u{6dd}'
        | '\u{70f}'
        | '\u{890}'..='\u{891}'
        | '\u{8e2}'
        | '\u{180e}'
        | '\u{200b}'..='\u{200f}'
        | '\u{202a}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206f}'
        | '\u{feff}'
        | '\u{fff9}'..='\u{fffb}'
        | '\u{110bd}'
        | '\u{110cd}'
        | '\u{13430}'..='\u{1343f}'
        | '\u{1bca0}'..='\u{1bca3}'
        | '\u{1d173}'..='\u{1d17a}'
        | '\u{e0001}'
        | '\u{e0020}'..='\u{e007f}')
}

/// `line` made printable: escape sequences dropped, every other control character and every
/// format character a `?` (a tab stays), cut after `max_chars` characters with `…`.
pub fn line(line: &str, max_chars: usize) -> String {
    let mut out = String::new();
    let mut chars = line.chars().peekable();
    let mut kept = 0;
    while let Some(c) = chars.next() {
        if kept == max_chars {
            out.push('…');
            break;
        }
        if c == '\x1b' {
            // CSI (`ESC [` … final byte) and two-character escapes alike.
            if chars.next_if_eq(&'[').is_some() {
                for d in chars.by_ref() {
                    if ('\x40'..='\x7e').contains(&d) {
                        break;
                    }
                }
            } else {
                chars.next();
            }
            continue;
        }
        out.push(if (c.is_control() && c != '\t') || format_char(c) {
            '?'
        } else {
            c
        });
        kept += 1;
    }
    out
}

/// A message of several lines made printable: each line as [`line`] makes it (at most
/// [`MESSAGE_LINE_CHARS`]), and of more than [`MESSAGE_LINES`] lines the first and the last
/// halves, with how many were left out between them.
pub fn message(text: &str) -> String {
    let lines: Vec<&str> = text.split('\n').collect();
    let half = MESSAGE_LINES / 2;
    let shown: Vec<String> = if lines.len() > MESSAGE_LINES {
        let left_out = lines.len() - 2 * half;
        lines[..half]
            .iter()
            .map(|l| line(l, MESSAGE_LINE_CHARS))
            .chain(std::iter::once(format!("… ({left_out} lines left out)")))
            .chain(
                lines[lines.len() - half..]
                    .iter()
                    .map(|l| line(l, MESSAGE_LINE_CHARS)),
            )
            .collect()
    } else {
        lines.iter().map(|l| line(l, MESSAGE_LINE_CHARS)).collect()
    };
    shown.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_and_control_characters_do_not_pass() {
        let p = |s| line(s, 300);
        assert_eq!(p("\x1b[31mred\x1b[0m plain"), "red plain");
        assert_eq!(p("a\x1b]0;title\x07b"), "a0;title?b");
        assert_eq!(p("bell\x07 cr\r nul\0 tab\tend"), "bell? cr? nul? tab\tend");
        assert_eq!(p("\u{9b}31m"), "?31m");
        assert_eq!(p("abc\u{202e}fed\u{200b}"), "abc?fed?");
        // Format characters beyond the bidirectional ones: Arabic letter mark, word joiner,
        // soft hyphen, interlinear annotation, a tag.
        assert_eq!(
            p("a\u{61c}b\u{2060}c\u{ad}d\u{fff9}e\u{e0041}"),
            "a?b?c?d?e?"
        );
        // Visible text of any script passes.
        assert_eq!(p("ünïcode → 構築 ✓"), "ünïcode → 構築 ✓");
    }

    #[test]
    fn long_lines_are_cut() {
        let long = "x".repeat(900);
        let p = line(&long, 300);
        assert_eq!(p.chars().count(), 301);
        assert!(p.ends_with('…'));
    }

    #[test]
    fn a_message_keeps_its_lines_within_bounds() {
        assert_eq!(
            message("error: \x1b[31mbuild failed\x1b[0m\nlast line\r"),
            "error: build failed\nlast line?"
        );
        let many: Vec<String> = (0..1000).map(|i| format!("line {i}")).collect();
        let m = message(&many.join("\n"));
        let out: Vec<&str> = m.lines().collect();
        assert_eq!(out.len(), MESSAGE_LINES + 1);
        assert_eq!(out[0], "line 0");
        assert_eq!(out[MESSAGE_LINES / 2], "… (900 lines left out)");
        assert_eq!(out[MESSAGE_LINES], "line 999");
        let wide = message(&"y".repeat(5 * MESSAGE_LINE_CHARS));
        assert_eq!(wide.chars().count(), MESSAGE_LINE_CHARS + 1);
    }
}
