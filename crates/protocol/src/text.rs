//! Printing text that came from a peer.
//!
//! A server (or anything in the middle) chooses the bytes of its error
//! messages, its stderr and the names it sends. Written to a terminal as they
//! are, escape sequences in them could move the cursor, rewrite earlier
//! lines, set the window title or worse. Everything a peer sent goes through
//! [`escape_text`] or [`escape_bytes`] before it is shown: control
//! characters, bidirectional-text controls, backslashes and bytes that are not
//! UTF-8 come out as visible escapes, so the output is plain text and can be
//! read back unambiguously.

use std::fmt::Write;

/// Bidirectional formatting characters, which reorder what a terminal shows
/// (U+061C, U+200E-U+200F, U+202A-U+202E, U+2066-U+2069).
fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

fn push_char(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        // C0 controls, DEL and the C1 controls (U+0080-U+009F; some
        // terminals act on U+009B as CSI).
        c if c.is_control() => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if is_bidi_control(c) => {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
        c => out.push(c),
    }
}

/// `s` with every control character escaped: ESC becomes `\x1b`, a newline
/// `\x0a`, a tab `\x09`, a C1 control such as U+009B `\x9b`, a bidi override
/// `\u{202e}`, a backslash `\\`. Everything else is kept.
pub fn escape_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_char(&mut out, c);
    }
    out
}

/// `line` (one line of a log message, no newline) with its control
/// characters but tabs, and bidi controls, escaped as [`escape_text`]
/// escapes them; backslashes are kept. The last line of defence of what
/// the programs log: a message should show what others named escaped
/// already (and its own backslashes then doubled).
pub fn escape_controls(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        match c {
            '\t' | '\\' => out.push(c),
            c => push_char(&mut out, c),
        }
    }
    out
}

/// Like [`escape_text`] for bytes that may not be UTF-8: each byte of an
/// invalid sequence comes out as `\xNN`.
pub fn escape_bytes(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_char(&mut out, c);
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_unchanged() {
        for s in [
            "",
            "no snapshot taken: the newest is younger than the minimum interval",
            "héllo wörld ✓ 日本語",
            "quotes \" and ' and $ and %",
        ] {
            assert_eq!(escape_text(s), s);
            assert_eq!(escape_bytes(s.as_bytes()), s);
        }
    }

    #[test]
    fn every_c0_control_and_del_is_escaped() {
        for b in (0u8..0x20).chain([0x7f]) {
            let s = format!("a{}b", b as char);
            let e = escape_text(&s);
            assert_eq!(e, format!("a\\x{b:02x}b"));
            assert!(!e.chars().any(char::is_control), "{e:?}");
        }
        assert_eq!(
            escape_text("\x1b[2J\x1b]0;title\x07"),
            "\\x1b[2J\\x1b]0;title\\x07"
        );
        assert_eq!(escape_text("line\nnext\r"), "line\\x0anext\\x0d");
        assert_eq!(escape_text("\t"), "\\x09");
    }

    #[test]
    fn a_log_line_keeps_tabs_and_backslashes_and_escapes_the_rest() {
        assert_eq!(
            escape_controls("a\tb \\x1b \r\x0b\x1b]0;t\x07\u{202e}\u{85}é"),
            "a\tb \\x1b \\x0d\\x0b\\x1b]0;t\\x07\\u{202e}\\x85é"
        );
    }

    #[test]
    fn c1_controls_and_bidi_overrides_are_escaped() {
        assert_eq!(escape_text("\u{9b}31m"), "\\x9b31m");
        assert_eq!(escape_text("\u{85}"), "\\x85");
        assert_eq!(escape_text("a\u{202e}b"), "a\\u{202e}b");
        assert_eq!(escape_text("\u{2066}\u{2069}"), "\\u{2066}\\u{2069}");
        for c in ('\u{80}'..='\u{9f}').chain(['\u{200e}', '\u{061c}']) {
            let e = escape_text(&c.to_string());
            assert!(e.starts_with('\\'), "{c:?} -> {e:?}");
        }
    }

    #[test]
    fn backslashes_are_doubled_so_escapes_cannot_be_forged() {
        // Literal text "\x1b" from a peer must not look like an escaped ESC.
        assert_eq!(escape_text("\\x1b"), "\\\\x1b");
        assert_ne!(escape_text("\\x1b"), escape_text("\x1b"));
    }

    #[test]
    fn invalid_utf8_bytes_are_escaped() {
        assert_eq!(escape_bytes(b"\xff\xfeok"), "\\xff\\xfeok");
        assert_eq!(escape_bytes(b"a\x1b[1mb\xc3"), "a\\x1b[1mb\\xc3");
        // A raw C1 CSI byte (not UTF-8 on its own) and its UTF-8 encoding.
        assert_eq!(escape_bytes(b"\x9b"), "\\x9b");
        assert_eq!(escape_bytes("\u{9b}".as_bytes()), "\\x9b");
        assert_eq!(escape_bytes("é".as_bytes()), "é");
    }

    #[test]
    fn output_never_holds_a_control_character() {
        let all: Vec<u8> = (0..=255u8).collect();
        let e = escape_bytes(&all);
        assert!(!e.chars().any(|c| c.is_control() || is_bidi_control(c)));
        let mut s = String::new();
        for c in (0u32..0x3000).filter_map(char::from_u32) {
            s.push(c);
        }
        let e = escape_text(&s);
        assert!(!e.chars().any(|c| c.is_control() || is_bidi_control(c)));
    }
}
