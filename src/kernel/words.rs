//! The tokenizer shared by everything that reads `iptables-save` and `nft` listings.

/// Splits an iptables-save or nft line into words: whitespace separates, double quotes
/// group, and `\"` and `\\` inside them are literal characters (as iptables-save escapes a
/// comment). Each word comes with whether any of it was quoted.
pub fn words(line: &str) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    let mut current = String::new();
    let (mut in_word, mut quoted, mut was_quoted) = (false, false, false);
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
                was_quoted = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push((std::mem::take(&mut current), was_quoted));
                    in_word = false;
                    was_quoted = false;
                }
            }
            _ => {
                current.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push((current, was_quoted));
    }
    out
}

/// Walks `line` as [`words`] reads quotes, calling `outside` with each character that is
/// not inside double quotes; whether every quote was closed.
pub fn scan_outside_quotes(line: &str, mut outside: impl FnMut(char)) -> bool {
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                chars.next();
            }
            '"' => quoted = !quoted,
            c if !quoted => outside(c),
            _ => {}
        }
    }
    !quoted
}

/// An `iptables-save` listing with one rule per line: iptables accepts a newline inside a
/// quoted comment and prints it as it is, splitting that rule over two lines. Each such
/// newline becomes the two characters `\n`, so line-by-line readers see the whole rule
/// (the agent never writes a neighbour's rule back, so nothing is lost).
pub fn join_quoted_newlines(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains('"') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut quoted = false;
    let mut changed = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted => {
                out.push(c);
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            '"' => {
                quoted = !quoted;
                out.push(c);
            }
            '\n' if quoted => {
                out.push_str("\\n");
                changed = true;
            }
            // A line ends every quote iptables-save opened on it, unless it is in one.
            _ => out.push(c),
        }
    }
    if changed {
        std::borrow::Cow::Owned(out)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newline_in_a_quoted_comment_keeps_the_rule_on_one_line() {
        let saved = "-A HOSTPORT -m comment --comment \"hostport a\n(managed) \\\"q\\\"\" -j RETURN\n-A X -j Y\n";
        let joined = join_quoted_newlines(saved);
        assert_eq!(
            joined,
            "-A HOSTPORT -m comment --comment \"hostport a\\n(managed) \\\"q\\\"\" -j RETURN\n-A X -j Y\n"
        );
        assert_eq!(joined.lines().count(), 2);
        assert!(matches!(
            join_quoted_newlines("-A X -j Y\n"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
