//! The common shape of a config, read without the general YAML parser: a top-level block
//! mapping of known keys (or a JSON object) whose values are block or flow lists of plain
//! or quoted CIDR strings and a few plain scalars. A 50,000-entry list is read here in a
//! few milliseconds; serde-saphyr takes about 40.
//!
//! It either builds exactly the tree the general path builds (values and positions: the
//! agreement property in `tests.rs` and the fuzz target check this on generated and
//! hostile documents) or gives up (`None`) and the general path reads the document. It
//! gives up at the first thing outside the shape it knows: anchors, aliases, tags, block
//! scalars, multi-line plain scalars, escapes, tabs, carriage returns, non-ASCII text,
//! document markers, nested collections, plain keys shorter than 6 characters that are not
//! the agent's (`yes`, `off`, `null` are not strings in YAML 1.1), and every plain scalar
//! whose YAML 1.1 type it does not decide with certainty (only CIDR-like strings, Go
//! durations, decimal integers, `true`/`false` and `null`/`~` are decided here). Near the
//! value bound it gives up too, before building anything (it counts the newlines and
//! commas first, and reads at most 64 keys), so every refusal for size comes from the
//! general path, and a hostile document costs no more memory than it did before.

use std::borrow::Cow;

use super::KNOWN_KEYS;
use super::document::{Located, MAX_DOCUMENT_SCALAR_BYTES, MAX_DOCUMENT_VALUES, Position, Value};

/// The fast path leaves documents this close to the value bound to the general path,
/// which refuses them with its own message and position.
const VALUE_MARGIN: usize = 64;

/// The most top-level keys the fast path reads: a config has seven keys, and a document of
/// thousands of keys is not the common shape (it is left to the general path before the
/// fast path has built anything big).
const MAX_KEYS: usize = 64;

/// The most newlines and commas a document the fast path reads may hold: with at most
/// [`MAX_KEYS`] keys, it then stays below the value bound by [`VALUE_MARGIN`].
pub(super) const MOST_SEPARATORS: usize = MAX_DOCUMENT_VALUES - VALUE_MARGIN - 4 * MAX_KEYS;

/// Items a list grows to as usual before room is made for all it can hold.
const FIRST_CAPACITY: usize = 1024;

/// Reads `text` if it has the common shape; `None` hands it to the general path. The
/// caller has checked that the document is not empty and, for JSON, strictly valid.
pub fn parse(text: &str, json: bool) -> Option<Located<'_>> {
    if text.len() > MAX_DOCUMENT_SCALAR_BYTES {
        return None;
    }
    // Printable ASCII and newlines only: no tab, carriage return, control character, or
    // any character a YAML 1.1 reader might take for a line break (NEL, LS, PS). Checked
    // a block at a time without an early exit, so that it vectorises. In the same pass,
    // the separators: every list item but the first of its list follows a newline or a
    // comma, so a document with more of them than the value bound allows (a hostile one)
    // goes to the general path before anything is built for it.
    let mut separators = 0;
    let printable = text.as_bytes().chunks(64).all(|chunk| {
        let (ok, count) = chunk.iter().fold((true, 0), |(ok, count), &b| {
            (
                ok & ((b == b'\n') | ((b' '..=b'~').contains(&b))),
                count + usize::from((b == b'\n') | (b == b',')),
            )
        });
        separators += count;
        ok
    });
    if !printable || separators > MOST_SEPARATORS {
        return None;
    }
    let mut reader = Reader {
        source: text,
        text: text.as_bytes(),
        at: 0,
        line: 1,
        line_start: 0,
        values: 0,
    };
    if json {
        reader.json_document()
    } else {
        reader.block_document()
    }
}

struct Reader<'a> {
    /// The text, and its bytes (printable ASCII and newlines: every index is a character
    /// boundary).
    source: &'a str,
    text: &'a [u8],
    at: usize,
    /// The line of `at`, from 1, and where it starts.
    line: u64,
    line_start: usize,
    values: usize,
}

/// How a plain scalar ends: in a block (end of line, or a comment) or in a flow list
/// (also `,` and `]`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Context {
    Block,
    Flow,
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn position(&self, at: usize) -> Position {
        Position {
            line: self.line,
            column: (at - self.line_start + 1) as u64,
        }
    }

    /// Counts one value; `None` once the document comes near the bound.
    fn count(&mut self) -> Option<()> {
        self.values += 1;
        (self.values <= MAX_DOCUMENT_VALUES - VALUE_MARGIN).then_some(())
    }

    fn located(&mut self, value: Value<'a>, at: usize) -> Option<Located<'a>> {
        self.count()?;
        Some(Located {
            value,
            position: Some(self.position(at)),
        })
    }

    /// Pushes a list item. Once a list has outgrown [`FIRST_CAPACITY`] items, room is made
    /// at once for as many more as `separator`s are left in the text (each further item
    /// follows one), so a list of 50,000 items costs no copy while it grows, and a short
    /// list (or one the fast path gives up on early) no large allocation.
    fn push_item(&self, items: &mut Vec<Located<'a>>, item: Located<'a>, separator: u8) {
        if items.len() == items.capacity() && items.len() >= FIRST_CAPACITY {
            let left = self.text[self.at..]
                .iter()
                .filter(|&&b| b == separator)
                .count();
            items.reserve_exact(left.clamp(1, MAX_DOCUMENT_VALUES));
        }
        items.push(item);
    }

    fn skip_spaces(&mut self) {
        while self.peek() == Some(b' ') {
            self.at += 1;
        }
    }

    /// Past the newline at `at` (or at the end), onto the next line.
    fn next_line(&mut self) {
        if self.at < self.text.len() {
            self.at += 1;
        }
        self.line += 1;
        self.line_start = self.at;
    }

    /// From `at`, the rest of the line may be spaces and a comment only; then onto the
    /// next line.
    fn end_of_line(&mut self) -> Option<()> {
        let start = self.at;
        self.skip_spaces();
        match self.peek() {
            None | Some(b'\n') => {}
            // A comment needs a space before it.
            Some(b'#') if self.at > start => {
                self.at += self.text[self.at..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(self.text.len() - self.at);
            }
            Some(_) => return None,
        }
        self.next_line();
        Some(())
    }

    /// At the start of a line: its indentation, and whether it holds nothing but spaces
    /// or a comment. Does not move.
    fn line_shape(&self) -> (usize, bool) {
        let rest = &self.text[self.at..];
        let indent = rest.iter().take_while(|&&b| b == b' ').count();
        let empty = matches!(rest.get(indent), None | Some(b'\n') | Some(b'#'));
        (indent, empty)
    }

    /// Skips the rest of the current line, whatever it holds (a blank or comment line).
    fn skip_line(&mut self) {
        self.at += self.text[self.at..]
            .iter()
            .position(|&b| b == b'\n')
            .unwrap_or(self.text.len() - self.at);
        self.next_line();
    }

    fn block_document(&mut self) -> Option<Located<'a>> {
        let mut entries = Vec::new();
        let mut map_at: Option<Position> = None;
        while self.at < self.text.len() {
            let (indent, empty) = self.line_shape();
            if empty {
                self.skip_line();
                continue;
            }
            if indent > 0 {
                return None;
            }
            let rest = &self.text[self.at..];
            if rest.starts_with(b"---") || rest.starts_with(b"...") {
                return None;
            }
            if map_at.is_none() {
                map_at = Some(self.position(self.at));
                self.count()?;
            }
            if entries.len() == MAX_KEYS {
                return None;
            }
            let key = self.plain_key()?;
            let value = self.block_value()?;
            entries.push((key, value));
        }
        let position = map_at?;
        entries.shrink_to_fit();
        Some(Located {
            value: Value::Map(entries),
            position: Some(position),
        })
    }

    /// A plain key at the start of a line: letters and digits from a letter, one of the
    /// agent's keys in any case or at least 6 long (shorter words can be YAML 1.1
    /// booleans or null: `yes`, `off`, `n`, `null`, `false`), then `:` and a space or the
    /// end of the line.
    fn plain_key(&mut self) -> Option<Located<'a>> {
        let start = self.at;
        let len = self.text[start..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let key = self.source.get(start..start + len)?;
        let plain_string = key.len() >= 6 && key.as_bytes()[0].is_ascii_alphabetic();
        if !plain_string && !KNOWN_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return None;
        }
        self.at += len;
        if self.peek() != Some(b':') {
            return None;
        }
        self.at += 1;
        if !matches!(self.peek(), None | Some(b' ') | Some(b'\n')) {
            return None;
        }
        self.located(Value::Str(Cow::Borrowed(key)), start)
    }

    /// The value after `key:` on the same line, a block list on the next lines, or
    /// nothing (null, placed at the `:`).
    fn block_value(&mut self) -> Option<Located<'a>> {
        let before = self.at;
        let colon = self.position(before - 1);
        self.skip_spaces();
        match self.peek() {
            None | Some(b'\n') => {
                self.next_line();
                self.block_list_or_null(colon)
            }
            Some(b'#') if self.at > before => {
                self.skip_line();
                self.block_list_or_null(colon)
            }
            Some(b'[') => {
                let list = self.flow_list()?;
                self.end_of_line()?;
                Some(list)
            }
            Some(_) => {
                let value = self.scalar(Context::Block)?;
                self.end_of_line()?;
                Some(value)
            }
        }
    }

    /// `- item` lines, all at one indentation (which may be 0: an indentless list), or
    /// null when the next key (or the end) comes first.
    fn block_list_or_null(&mut self, colon: Position) -> Option<Located<'a>> {
        // Blank and comment lines before the first item.
        loop {
            if self.at >= self.text.len() {
                self.count()?;
                return Some(Located {
                    value: Value::Null,
                    position: Some(colon),
                });
            }
            let (_, empty) = self.line_shape();
            if !empty {
                break;
            }
            self.skip_line();
        }
        let (indent, _) = self.line_shape();
        if indent == 0 && self.peek() != Some(b'-') {
            self.count()?;
            return Some(Located {
                value: Value::Null,
                position: Some(colon),
            });
        }
        self.count()?;
        let mut items = Vec::new();
        let mut list_position = None;
        loop {
            // At the start of an item line at `indent`.
            self.at += indent;
            let dash = self.at;
            if self.peek() != Some(b'-') {
                return None;
            }
            self.at += 1;
            if self.peek() != Some(b' ') {
                return None;
            }
            self.skip_spaces();
            if matches!(self.peek(), None | Some(b'\n') | Some(b'#')) {
                return None;
            }
            if list_position.is_none() {
                // serde-saphyr places an indented list at its first `-`, an indentless
                // one at its first item.
                list_position = Some(if indent == 0 {
                    self.position(self.at)
                } else {
                    self.position(dash)
                });
            }
            let item = self.scalar(Context::Block)?;
            self.push_item(&mut items, item, b'\n');
            self.end_of_line()?;
            // The next item, or the end of the list.
            loop {
                if self.at >= self.text.len() {
                    return Some(finish_list(items, list_position));
                }
                let (line_indent, empty) = self.line_shape();
                if empty {
                    self.skip_line();
                    continue;
                }
                if line_indent == indent && self.text.get(self.at + indent) == Some(&b'-') {
                    break;
                }
                if line_indent == 0 {
                    // The next key ends the list.
                    return Some(finish_list(items, list_position));
                }
                // Deeper (a continuation line) or anything else.
                return None;
            }
        }
    }

    /// Spaces and newlines inside a flow list; no comments.
    fn skip_flow_space(&mut self) {
        while let Some(b) = self.peek() {
            match b {
                b' ' => self.at += 1,
                b'\n' => self.next_line(),
                _ => break,
            }
        }
    }

    /// `[item, item, ...]`, possibly over several lines; no trailing comma.
    fn flow_list(&mut self) -> Option<Located<'a>> {
        let open = self.at;
        let position = self.position(open);
        self.count()?;
        self.at += 1;
        let mut items = Vec::new();
        self.skip_flow_space();
        if self.peek() == Some(b']') {
            self.at += 1;
            return Some(Located {
                value: Value::List(items),
                position: Some(position),
            });
        }
        loop {
            let item = self.scalar(Context::Flow)?;
            self.push_item(&mut items, item, b',');
            self.skip_flow_space();
            match self.peek() {
                Some(b',') => {
                    self.at += 1;
                    self.skip_flow_space();
                    if matches!(self.peek(), Some(b']') | Some(b',')) {
                        return None;
                    }
                }
                Some(b']') => {
                    self.at += 1;
                    break;
                }
                _ => return None,
            }
        }
        items.shrink_to_fit();
        Some(Located {
            value: Value::List(items),
            position: Some(position),
        })
    }

    /// A quoted or plain scalar at `at`.
    fn scalar(&mut self, context: Context) -> Option<Located<'a>> {
        let start = self.at;
        match self.peek()? {
            quote @ (b'\'' | b'"') => {
                let body = start + 1;
                let len = self.text[body..]
                    .iter()
                    .position(|&b| b == quote || b == b'\n' || b == b'\\')?;
                if self.text[body + len] != quote {
                    return None;
                }
                self.at = body + len + 1;
                // `''` is an escaped quote; `'a':` a key, `'a'b` an error.
                match self.peek() {
                    None | Some(b' ') | Some(b'\n') => {}
                    Some(b',') | Some(b']') if context == Context::Flow => {}
                    Some(_) => return None,
                }
                let text = self.source.get(body..body + len)?;
                self.located(Value::Str(Cow::Borrowed(text)), start)
            }
            first => {
                if b"-?:,[]{}#&*!|>'\"%@`".contains(&first) {
                    return None;
                }
                let mut end = start;
                while let Some(&b) = self.text.get(end) {
                    match b {
                        b'\n' => break,
                        b' ' => {
                            // Trailing spaces, a comment, or the end of the scalar in a
                            // flow list.
                            let mut after = end + 1;
                            while self.text.get(after) == Some(&b' ') {
                                after += 1;
                            }
                            match self.text.get(after) {
                                None | Some(b'\n') | Some(b'#') => break,
                                Some(b',') | Some(b']') if context == Context::Flow => break,
                                // A second word: still one scalar in YAML, not a shape
                                // decided here.
                                Some(_) => return None,
                            }
                        }
                        b',' | b']' if context == Context::Flow => break,
                        b',' | b'[' | b']' | b'{' | b'}' | b'#' => return None,
                        b':' => {
                            // `key: value` inside the scalar, or a trailing `:`.
                            if matches!(
                                self.text.get(end + 1),
                                None | Some(b' ') | Some(b'\n') | Some(b',') | Some(b']')
                            ) {
                                return None;
                            }
                        }
                        _ => {}
                    }
                    end += 1;
                }
                let text = self.source.get(start..end)?;
                let value = plain_value(text)?;
                // In a flow list the caller wants `,` or `]` next: anything else (a word
                // on the next line) would continue this scalar.
                self.at = end;
                self.located(value, start)
            }
        }
    }

    fn json_document(&mut self) -> Option<Located<'a>> {
        self.skip_flow_space();
        if self.peek() != Some(b'{') {
            return None;
        }
        let position = self.position(self.at);
        self.count()?;
        self.at += 1;
        let mut entries = Vec::new();
        self.skip_flow_space();
        if self.peek() == Some(b'}') {
            self.at += 1;
        } else {
            loop {
                self.skip_flow_space();
                if self.peek() != Some(b'"') {
                    return None;
                }
                let key = self.json_string()?;
                self.skip_flow_space();
                if self.peek() != Some(b':') {
                    return None;
                }
                self.at += 1;
                self.skip_flow_space();
                if entries.len() == MAX_KEYS {
                    return None;
                }
                let value = match self.peek()? {
                    b'[' => self.json_list()?,
                    b'"' => self.json_string()?,
                    _ => self.json_word()?,
                };
                entries.push((key, value));
                self.skip_flow_space();
                match self.peek() {
                    Some(b',') => self.at += 1,
                    Some(b'}') => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        self.skip_flow_space();
        if self.at != self.text.len() {
            return None;
        }
        entries.shrink_to_fit();
        Some(Located {
            value: Value::Map(entries),
            position: Some(position),
        })
    }

    /// A JSON list of strings.
    fn json_list(&mut self) -> Option<Located<'a>> {
        let position = self.position(self.at);
        self.count()?;
        self.at += 1;
        let mut items = Vec::new();
        self.skip_flow_space();
        if self.peek() == Some(b']') {
            self.at += 1;
        } else {
            loop {
                self.skip_flow_space();
                if self.peek() != Some(b'"') {
                    return None;
                }
                let item = self.json_string()?;
                self.push_item(&mut items, item, b',');
                self.skip_flow_space();
                match self.peek() {
                    Some(b',') => self.at += 1,
                    Some(b']') => {
                        self.at += 1;
                        break;
                    }
                    _ => return None,
                }
            }
        }
        items.shrink_to_fit();
        Some(Located {
            value: Value::List(items),
            position: Some(position),
        })
    }

    /// A JSON string without escapes (the document is valid JSON: what follows it is
    /// checked by the caller).
    fn json_string(&mut self) -> Option<Located<'a>> {
        let start = self.at;
        let body = start + 1;
        let len = self.text[body..]
            .iter()
            .position(|&b| b == b'"' || b == b'\\')?;
        if self.text[body + len] != b'"' {
            return None;
        }
        self.at = body + len + 1;
        let text = self.source.get(body..body + len)?;
        self.located(Value::Str(Cow::Borrowed(text)), start)
    }

    /// `true`, `false`, `null` or a whole number without sign, in JSON.
    fn json_word(&mut self) -> Option<Located<'a>> {
        let start = self.at;
        let len = self.text[start..]
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        let word = self.source.get(start..start + len)?;
        let value = match word {
            "null" => Value::Null,
            _ => plain_value(word)?,
        };
        self.at += len;
        self.located(value, start)
    }
}

fn finish_list(mut items: Vec<Located<'_>>, position: Option<Position>) -> Located<'_> {
    items.shrink_to_fit();
    Located {
        value: Value::List(items),
        position,
    }
}

/// The YAML 1.1 type of a plain scalar, where it is certain; `None` otherwise.
fn plain_value(text: &str) -> Option<Value<'_>> {
    let bytes = text.as_bytes();
    // One pass: which kinds of characters the scalar holds.
    let (mut digits, mut slash, mut cidr_chars) = (true, false, true);
    for &b in bytes {
        let digit = b.is_ascii_digit();
        digits &= digit;
        slash |= b == b'/';
        cidr_chars &= digit | matches!(b, b'a'..=b'f' | b'A'..=b'F' | b'.' | b':' | b'/');
    }
    // A CIDR (or anything of its characters with a `/`): no YAML 1.1 number, boolean,
    // null or timestamp holds a `/`.
    if slash && cidr_chars {
        return Some(Value::Str(Cow::Borrowed(text)));
    }
    // A whole number in decimal: no sign, no leading zero (octal in YAML 1.1), no `_`.
    if digits && !bytes.is_empty() {
        if bytes.len() > 18 || (bytes.len() > 1 && bytes[0] == b'0') {
            return None;
        }
        return text.parse::<i128>().ok().map(Value::Int);
    }
    match text {
        "true" => return Some(Value::Bool(true)),
        "false" => return Some(Value::Bool(false)),
        "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        _ => {}
    }
    // A Go duration of whole numbers and units (`60s`, `1m30s`, `500ms`).
    if is_plain_duration(bytes) {
        return Some(Value::Str(Cow::Borrowed(text)));
    }
    None
}

fn is_plain_duration(mut bytes: &[u8]) -> bool {
    if bytes.is_empty() {
        return false;
    }
    while !bytes.is_empty() {
        let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            return false;
        }
        bytes = &bytes[digits..];
        let unit = [&b"ns"[..], b"us", b"ms", b"s", b"m", b"h"]
            .into_iter()
            .find(|unit| {
                bytes.starts_with(unit)
                    && !bytes[unit.len()..]
                        .first()
                        .is_some_and(u8::is_ascii_alphabetic)
            });
        let Some(unit) = unit else {
            return false;
        };
        bytes = &bytes[unit.len()..];
    }
    true
}
