//! Text from a config file or a file name, made safe to print: every message that
//! quotes a value or names a file passes it through here, so a value holding a newline
//! cannot forge a log line, an ESC sequence cannot reach a terminal, and a 2 MB value
//! does not make a 2 MB message.
//!
//! The quoting is Go's `%q` (`strconv.Quote`), so ordinary values read exactly as in
//! upstream's messages; only the printability test is approximated without Unicode's
//! tables (see [`is_printable`]).

use std::fmt::Write as _;
use std::path::Path;

/// Most bytes of one value a message quotes; the rest is cut and counted. A CIDR is at
/// most 43 bytes and a key about 20; a path may be long, but not this long.
pub const MAX_QUOTED_BYTES: usize = 256;

/// Whether Go's `unicode.IsPrint` holds for `c`: letters, marks, numbers, punctuation,
/// symbols and the ASCII space. Without Unicode's tables this refuses the classes that
/// can change what a reader sees: control characters (Cc), separators other than the
/// ASCII space (Zs, Zl, Zp: U+2028 starts a new line in some viewers), format characters
/// (Cf: bidirectional overrides, zero-width characters, the byte-order mark) and private
/// use characters. Unassigned code points are printed as they are.
pub fn is_printable(c: char) -> bool {
    if c == ' ' {
        return true;
    }
    if c.is_control() || c.is_whitespace() {
        return false;
    }
    !matches!(c,
        '\u{00AD}'
        | '\u{0600}'..='\u{0605}'
        | '\u{061C}'
        | '\u{06DD}'
        | '\u{070F}'
        | '\u{0890}'..='\u{0891}'
        | '\u{08E2}'
        | '\u{180E}'
        | '\u{200B}'..='\u{200F}'
        | '\u{202A}'..='\u{202E}'
        | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{206F}'
        | '\u{FEFF}'
        | '\u{FFF9}'..='\u{FFFB}'
        | '\u{110BD}'
        | '\u{110CD}'
        | '\u{13430}'..='\u{1343F}'
        | '\u{1BCA0}'..='\u{1BCA3}'
        | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0001}'
        | '\u{E0020}'..='\u{E007F}'
        | '\u{E000}'..='\u{F8FF}'
        | '\u{F0000}'..='\u{FFFFD}'
        | '\u{100000}'..='\u{10FFFD}')
}

/// Whether `text` may be printed as it is: short, and every character printable.
pub fn is_ordinary(text: &str) -> bool {
    text.len() <= MAX_QUOTED_BYTES && text.chars().all(is_printable)
}

/// One character as Go's `strconv.Quote` writes it inside double quotes.
fn push_escaped(out: &mut String, c: char) {
    match c {
        '"' | '\\' => {
            out.push('\\');
            out.push(c);
        }
        c if is_printable(c) => out.push(c),
        '\u{7}' => out.push_str("\\a"),
        '\u{8}' => out.push_str("\\b"),
        '\u{c}' => out.push_str("\\f"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        '\u{b}' => out.push_str("\\v"),
        c if (c as u32) < 0x20 || c == '\u{7f}' => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        c if (c as u32) < 0x10000 => {
            let _ = write!(out, "\\u{:04x}", c as u32);
        }
        c => {
            let _ = write!(out, "\\U{:08x}", c as u32);
        }
    }
}

/// The byte index at which to cut `text` to at most `max` bytes, on a character boundary.
fn cut_at(text: &str, max: usize) -> usize {
    if text.len() <= max {
        return text.len();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    end
}

/// ` ... (N bytes in all)` after a quoted value that was cut, or nothing.
fn cut_note(shown: usize, total: usize) -> String {
    if shown < total {
        format!("... ({total} bytes in all)")
    } else {
        String::new()
    }
}

/// `text` as Go's `%q` writes it, cut after [`MAX_QUOTED_BYTES`] bytes with the length
/// said: `"10.0.0.0/8"`, `"10.0.0.0/8\n2026-..."`, `"xxxx"... (2097152 bytes in all)`.
pub fn quoted(text: &str) -> String {
    let end = cut_at(text, MAX_QUOTED_BYTES);
    let mut out = String::with_capacity(end + 2);
    out.push('"');
    for c in text[..end].chars() {
        push_escaped(&mut out, c);
    }
    out.push('"');
    out.push_str(&cut_note(end, text.len()));
    out
}

/// `text` as it is when it is ordinary (upstream's messages print some values raw, and
/// those must read the same), otherwise [`quoted`].
pub fn raw_or_quoted(text: &str) -> String {
    if is_ordinary(text) {
        text.to_string()
    } else {
        quoted(text)
    }
}

/// Bytes that may not be UTF-8 (a file name), as Go's `%q` writes them: invalid bytes as
/// `\xNN`, cut like [`quoted`].
fn quoted_bytes(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(MAX_QUOTED_BYTES)];
    let mut out = String::with_capacity(shown.len() + 2);
    out.push('"');
    for chunk in shown.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_escaped(&mut out, c);
        }
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out.push('"');
    out.push_str(&cut_note(shown.len(), bytes.len()));
    out
}

/// A path for a message: as it is when it is ordinary UTF-8, otherwise quoted (a file
/// name with a newline, an ESC sequence or bytes that are not UTF-8).
pub fn path(path: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(text) if text.chars().all(is_printable) && text.len() <= 4 * MAX_QUOTED_BYTES => {
            text.to_string()
        }
        _ => quoted_bytes(bytes),
    }
}

/// Text from elsewhere (a parser's message that may echo the input) with every
/// character that is not printable escaped as in [`quoted`], without quotes, and cut.
pub fn escaped(text: &str) -> String {
    if is_ordinary(text) {
        return text.to_string();
    }
    let end = cut_at(text, 4 * MAX_QUOTED_BYTES);
    let mut out = String::with_capacity(end);
    for c in text[..end].chars() {
        match c {
            '"' | '\\' => out.push(c),
            c => push_escaped(&mut out, c),
        }
    }
    out.push_str(&cut_note(end, text.len()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_matches_go_percent_q() {
        // Go: fmt.Sprintf("%q", s)
        for (text, go) in [
            ("10.0.0.0/8", r#""10.0.0.0/8""#),
            (" 10.0.0.0/8", r#"" 10.0.0.0/8""#),
            ("a\"b\\c", r#""a\"b\\c""#),
            ("\n\t\r\u{7}\u{8}\u{c}\u{b}", r#""\n\t\r\a\b\f\v""#),
            ("\u{1b}[31m", r#""\x1b[31m""#),
            ("\u{7f}\u{0}", r#""\x7f\x00""#),
            ("é µs", r#""é µs""#),
            (
                "\u{85}\u{a0}\u{2028}\u{202e}\u{feff}",
                r#""\u0085\u00a0\u2028\u202e\ufeff""#,
            ),
            ("\u{e0041}\u{10fffd}", r#""\U000e0041\U0010fffd""#),
        ] {
            assert_eq!(quoted(text), go, "{text:?}");
        }
    }

    #[test]
    fn long_values_are_cut_and_counted() {
        let long = "x".repeat(2 * 1024 * 1024);
        let q = quoted(&long);
        assert!(q.len() < MAX_QUOTED_BYTES + 40, "{}", q.len());
        assert!(q.ends_with("\"... (2097152 bytes in all)"), "{q}");
        // Cut on a character boundary.
        let wide = "é".repeat(MAX_QUOTED_BYTES);
        assert!(quoted(&wide).contains("\"... ("));
        assert_eq!(raw_or_quoted(&long), q);
    }

    #[test]
    fn ordinary_text_stays_raw() {
        assert_eq!(raw_or_quoted(" 10.0.0.0/8"), " 10.0.0.0/8");
        assert_eq!(raw_or_quoted("a\nb"), r#""a\nb""#);
        assert_eq!(
            path(Path::new("/etc/config/ip-masq-agent")),
            "/etc/config/ip-masq-agent"
        );
        assert_eq!(path(Path::new("/d/ip-masq\nx")), r#""/d/ip-masq\nx""#);
        use std::os::unix::ffi::OsStrExt;
        let bytes = std::ffi::OsStr::from_bytes(b"/d/ip-masq-\xff");
        assert_eq!(path(Path::new(bytes)), r#""/d/ip-masq-\xff""#);
        assert_eq!(escaped("plain"), "plain");
        assert_eq!(escaped("a\u{1b}b \"q\""), r#"a\x1bb "q""#);
    }
}
