//! Go's `time.ParseDuration`, reproduced exactly so that every `resyncInterval` an
//! upstream ConfigMap holds means the same here, including its error texts.

use std::fmt;
use std::fmt::Write as _;

use super::quote::MAX_QUOTED_BYTES;

/// A Go duration in nanoseconds; negative values are representable because Go
/// accepts them (validation rejects them later, with its own message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub i64);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DurationError(String);

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DurationError {}

const OVERFLOW_LIMIT: u64 = 1 << 63;

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

/// Go's `time.quote`: the text in double quotes with `"` and `\\` escaped and every byte
/// of a control or non-ASCII character as `\\xNN`, so a value holding a newline or an ESC
/// sequence cannot forge a log line. Cut after [`MAX_QUOTED_BYTES`] bytes (Go does not
/// cut; a 2 MB value must not make a 2 MB message).
fn go_quote(s: &str) -> String {
    let mut end = s.len().min(MAX_QUOTED_BYTES);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::with_capacity(end + 2);
    out.push('"');
    for c in s[..end].chars() {
        if c < ' ' || !c.is_ascii() {
            let mut bytes = [0; 4];
            for byte in c.encode_utf8(&mut bytes).bytes() {
                let _ = write!(out, "\\x{byte:02x}");
            }
            continue;
        }
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    if end < s.len() {
        let _ = write!(out, "... ({} bytes in all)", s.len());
    }
    out
}

/// Consumes leading ASCII digits; `None` when the value overflows Go's limit.
fn leading_int(s: &[u8]) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut consumed = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        if value > OVERFLOW_LIMIT / 10 {
            return None;
        }
        value = value * 10 + u64::from(c - b'0');
        if value > OVERFLOW_LIMIT {
            return None;
        }
        consumed += 1;
    }
    Some((value, consumed))
}

/// Consumes leading fraction digits; digits past the precision are dropped, as in Go.
fn leading_fraction(s: &[u8]) -> (u64, f64, usize) {
    let mut value: u64 = 0;
    let mut scale = 1.0;
    let mut overflow = false;
    let mut consumed = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            break;
        }
        consumed += 1;
        if overflow {
            continue;
        }
        if value > (OVERFLOW_LIMIT - 1) / 10 {
            overflow = true;
            continue;
        }
        let next = value * 10 + u64::from(c - b'0');
        if next > OVERFLOW_LIMIT {
            overflow = true;
            continue;
        }
        value = next;
        scale *= 10.0;
    }
    (value, scale, consumed)
}

/// Parses `[-+]?([0-9]*(\.[0-9]*)?[a-zµμ]+)+` or `0`, exactly as Go 1.22's `time.ParseDuration`.
pub fn parse_go_duration(text: &str) -> Result<GoDuration, DurationError> {
    let invalid = || DurationError(format!("time: invalid duration {}", go_quote(text)));
    let mut s = text.as_bytes();
    let mut negative = false;
    if let Some(&sign) = s.first()
        && (sign == b'-' || sign == b'+')
    {
        negative = sign == b'-';
        s = &s[1..];
    }
    if s == b"0" {
        return Ok(GoDuration(0));
    }
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    while !s.is_empty() {
        if !(s[0] == b'.' || s[0].is_ascii_digit()) {
            return Err(invalid());
        }
        let (mut value, int_len) = leading_int(s).ok_or_else(invalid)?;
        s = &s[int_len..];
        let has_int = int_len > 0;
        let mut fraction = 0;
        let mut scale = 1.0;
        let mut has_fraction = false;
        if s.first() == Some(&b'.') {
            s = &s[1..];
            let (f, sc, len) = leading_fraction(s);
            fraction = f;
            scale = sc;
            has_fraction = len > 0;
            s = &s[len..];
        }
        if !has_int && !has_fraction {
            return Err(invalid());
        }
        let unit_len = s
            .iter()
            .position(|&c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(s.len());
        if unit_len == 0 {
            return Err(DurationError(format!(
                "time: missing unit in duration {}",
                go_quote(text)
            )));
        }
        let unit_bytes = &s[..unit_len];
        s = &s[unit_len..];
        let unit_text = String::from_utf8_lossy(unit_bytes);
        let unit = unit_nanos(&unit_text).ok_or_else(|| {
            DurationError(format!(
                "time: unknown unit {} in duration {}",
                go_quote(&unit_text),
                go_quote(text)
            ))
        })?;
        if value > OVERFLOW_LIMIT / unit {
            return Err(invalid());
        }
        value *= unit;
        if fraction > 0 {
            // Go converts through float64 here; truncation matches its result.
            value += (fraction as f64 * (unit as f64 / scale)) as u64;
            if value > OVERFLOW_LIMIT {
                return Err(invalid());
            }
        }
        total += value;
        if total > OVERFLOW_LIMIT {
            return Err(invalid());
        }
    }
    if negative {
        // total <= 2^63 here, so the negation always fits.
        return Ok(GoDuration((total as i128).wrapping_neg() as i64));
    }
    if total > OVERFLOW_LIMIT - 1 {
        return Err(invalid());
    }
    Ok(GoDuration(total as i64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;
    const MINUTE: i64 = 60 * SECOND;
    const HOUR: i64 = 60 * MINUTE;
    const MS: i64 = 1_000_000;
    const US: i64 = 1_000;

    /// The accepted cases of Go's own `TestParseDuration`.
    #[test]
    fn accepts_go_examples() {
        let cases: &[(&str, i64)] = &[
            ("0", 0),
            ("5s", 5 * SECOND),
            ("30s", 30 * SECOND),
            ("1478s", 1478 * SECOND),
            ("-5s", -5 * SECOND),
            ("+5s", 5 * SECOND),
            ("-0", 0),
            ("+0", 0),
            ("5.0s", 5 * SECOND),
            ("5.6s", 5 * SECOND + 600 * MS),
            ("5.s", 5 * SECOND),
            (".5s", 500 * MS),
            ("1.0s", SECOND),
            ("1.00s", SECOND),
            ("1.004s", SECOND + 4 * MS),
            ("1.0040s", SECOND + 4 * MS),
            ("100.00100s", 100 * SECOND + MS),
            ("10ns", 10),
            ("11us", 11 * US),
            ("12µs", 12 * US),
            ("12μs", 12 * US),
            ("13ms", 13 * MS),
            ("14s", 14 * SECOND),
            ("15m", 15 * MINUTE),
            ("16h", 16 * HOUR),
            ("3h30m", 3 * HOUR + 30 * MINUTE),
            ("10.5s4m", 4 * MINUTE + 10 * SECOND + 500 * MS),
            ("-2m3.4s", -(2 * MINUTE + 3 * SECOND + 400 * MS)),
            (
                "1h2m3s4ms5us6ns",
                HOUR + 2 * MINUTE + 3 * SECOND + 4 * MS + 5 * US + 6,
            ),
            (
                "39h9m14.425s",
                39 * HOUR + 9 * MINUTE + 14 * SECOND + 425 * MS,
            ),
            ("52763797000ns", 52763797000),
            ("0.3333333333333333333h", 20 * MINUTE),
            ("9007199254740993ns", (1 << 53) + 1),
            ("9223372036854775807ns", i64::MAX),
            ("9223372036854775.807us", i64::MAX),
            ("9223372036s854ms775us807ns", i64::MAX),
            ("-9223372036854775808ns", i64::MIN),
            ("-9223372036854775.808us", i64::MIN),
            ("-9223372036s854ms775us808ns", i64::MIN),
            ("-2562047h47m16.854775808s", i64::MIN),
            ("0.100000000000000000000h", 6 * MINUTE),
            (
                "0.830103483285477580700h",
                49 * MINUTE + 48 * SECOND + 372_539_827,
            ),
            ("60s", 60 * SECOND),
            ("1m30s", 90 * SECOND),
            ("500ms", 500 * MS),
            ("1.5h", 90 * MINUTE),
            ("2h45m", 2 * HOUR + 45 * MINUTE),
        ];
        for (text, want) in cases {
            assert_eq!(parse_go_duration(text), Ok(GoDuration(*want)), "{text}");
        }
    }

    /// The rejected cases of Go's own `TestParseDuration`, with Go's messages.
    #[test]
    fn rejects_go_examples_with_go_messages() {
        let cases: &[(&str, &str)] = &[
            ("", r#"time: invalid duration """#),
            ("3", r#"time: missing unit in duration "3""#),
            ("-", r#"time: invalid duration "-""#),
            ("s", r#"time: invalid duration "s""#),
            (".", r#"time: invalid duration ".""#),
            ("-.", r#"time: invalid duration "-.""#),
            (".s", r#"time: invalid duration ".s""#),
            ("+.s", r#"time: invalid duration "+.s""#),
            ("1d", r#"time: unknown unit "d" in duration "1d""#),
            (
                "9223372036854775810ns",
                r#"time: invalid duration "9223372036854775810ns""#,
            ),
            (
                "9223372036854775808ns",
                r#"time: invalid duration "9223372036854775808ns""#,
            ),
            (
                "-9223372036854775809ns",
                r#"time: invalid duration "-9223372036854775809ns""#,
            ),
            (
                "9223372036854776us",
                r#"time: invalid duration "9223372036854776us""#,
            ),
            ("3000000h", r#"time: invalid duration "3000000h""#),
            (
                "9223372036854775.808us",
                r#"time: invalid duration "9223372036854775.808us""#,
            ),
            (
                "9223372036854ms775us808ns",
                r#"time: invalid duration "9223372036854ms775us808ns""#,
            ),
            (" 60s", r#"time: invalid duration " 60s""#),
            ("60 s", r#"time: unknown unit " s" in duration "60 s""#),
            ("1h-5m", r#"time: unknown unit "h-" in duration "1h-5m""#),
            // Go's time.quote: control and non-ASCII characters byte by byte as \xNN.
            ("1\n", r#"time: unknown unit "\x0a" in duration "1\x0a""#),
            (
                "1µ",
                r#"time: unknown unit "\xc2\xb5" in duration "1\xc2\xb5""#,
            ),
            ("\u{1b}[2J", r#"time: invalid duration "\x1b[2J""#),
        ];
        for (text, want) in cases {
            let got = parse_go_duration(text).expect_err(text);
            assert_eq!(got.to_string(), *want, "{text:?}");
        }
    }
}
