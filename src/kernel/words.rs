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
