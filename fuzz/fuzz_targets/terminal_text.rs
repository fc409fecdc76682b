//! Text others wrote, made fit for the terminal (`nixdock::printable`): a builder's error
//! message, a container's log line. Asserts: no escape, control (but tab and, in a message,
//! newline) or format character comes through; lines and line counts stay within the bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nixdock::printable::{self, MESSAGE_LINE_CHARS, MESSAGE_LINES, format_char};

fn shown(c: char, newline: bool) -> bool {
    !(c.is_control() && c != '\t' && !(newline && c == '\n')) && !format_char(c)
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let line = printable::line(&text, 300);
    assert!(line.chars().all(|c| shown(c, false)), "{line:?}");
    assert!(line.chars().count() <= 301);
    let message = printable::message(&text);
    assert!(message.chars().all(|c| shown(c, true)), "{message:?}");
    let lines: Vec<&str> = message.split('\n').collect();
    assert!(lines.len() <= MESSAGE_LINES + 1);
    assert!(lines.iter().all(|l| l.chars().count() <= MESSAGE_LINE_CHARS + 1));
    // What is printable already is shown as it is.
    if text.chars().all(|c| shown(c, true) && c != '\u{1b}')
        && text.split('\n').count() <= MESSAGE_LINES
        && text.split('\n').all(|l| l.chars().count() <= MESSAGE_LINE_CHARS)
    {
        assert_eq!(message, text);
    }
});
