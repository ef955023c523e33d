//! A config document as a tree of values that remember where they were written, so
//! every later complaint (a bad CIDR, a wrong type) can point at file:line:column.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Line and column of a value in the config file, both 1-based.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: u64,
    pub column: u64,
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A value of the document. Strings borrow from the text where the fast path read them
/// (no allocation per list item) and are owned where serde-saphyr did.
#[derive(Clone, Debug, PartialEq)]
pub enum Value<'a> {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(Cow<'a, str>),
    List(Vec<Located<'a>>),
    Map(Vec<(Located<'a>, Located<'a>)>),
}

impl Value<'_> {
    /// The JSON type name Go's encoding/json uses in "cannot unmarshal X into ..." messages.
    pub fn json_type(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::Float(_) => "number",
            Value::Str(_) => "string",
            Value::List(_) => "array",
            Value::Map(_) => "object",
        }
    }

    /// A short rendering of the value for error messages.
    pub fn describe(&self) -> String {
        match self {
            Value::Null => "null".to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Str(s) => super::quote::quoted(s),
            Value::List(items) => format!("a list of {} item(s)", items.len()),
            Value::Map(entries) => format!("a mapping of {} key(s)", entries.len()),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Located<'a> {
    pub value: Value<'a>,
    pub position: Option<Position>,
}

impl<'de> Deserialize<'de> for Value<'static> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ValueVisitor)
    }
}

impl<'de> Deserialize<'de> for Located<'static> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = Spanned::<Value<'static>>::deserialize(deserializer)?;
        let line = spanned.referenced.line();
        let position = (line > 0).then(|| Position {
            line,
            column: spanned.referenced.column(),
        });
        Ok(Located {
            value: spanned.value,
            position,
        })
    }
}

struct ValueVisitor;

impl<'de> Visitor<'de> for ValueVisitor {
    type Value = Value<'static>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML or JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value<'static>, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value<'static>, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value<'static>, D::Error> {
        Value::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value<'static>, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value<'static>, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value<'static>, E> {
        Ok(Value::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value<'static>, E> {
        Ok(Value::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value<'static>, E> {
        Ok(i128::try_from(v).map_or(Value::Float(v as f64), Value::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value<'static>, E> {
        Ok(Value::Float(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value<'static>, E> {
        Ok(Value::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value<'static>, E> {
        Ok(Value::Str(Cow::Owned(v)))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Value<'static>, E> {
        Ok(Value::Str(Cow::Owned(
            String::from_utf8_lossy(v).into_owned(),
        )))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value<'static>, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Located<'static>>()? {
            items.push(item);
        }
        // A growing Vec keeps room for at least four items; many one-item lists would
        // otherwise cost four times their size.
        items.shrink_to_fit();
        Ok(Value::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value<'static>, A::Error> {
        let mut entries = Vec::new();
        while let Some((key, value)) = map.next_entry::<Located<'static>, Located<'static>>()? {
            entries.push((key, value));
        }
        entries.shrink_to_fit();
        Ok(Value::Map(entries))
    }
}

/// Why a document could not be read as YAML or JSON at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub position: Option<Position>,
    pub message: String,
}

/// Most values (scalars, lists, mappings, each alias expansion counted again) one document
/// may hold. The largest list in use is 50,000 CIDRs; each value costs about 100 bytes in the
/// tree, so a hostile document is refused before the tree reaches about 10 MB.
pub const MAX_DOCUMENT_VALUES: usize = 100_000;
/// Most bytes of scalar text one document may hold, alias expansions counted again: twice
/// what 50,000 IPv6 CIDRs need, and as much as the file itself may hold.
pub const MAX_DOCUMENT_SCALAR_BYTES: usize = 4 * 1024 * 1024;
/// Deepest nesting of lists and mappings: the config itself needs two levels; the bound keeps
/// a `[[[[...` file from costing stack or memory.
pub const MAX_DOCUMENT_DEPTH: usize = 32;
/// Most anchors (`&name`) one document may define; each one keeps a copy of its events.
const MAX_DOCUMENT_ANCHORS: usize = 1_000;
/// Most events the anchors (`&name`) of one document may keep copies of, nested anchors
/// counted again. A copy costs more than a value in the tree, and replaying an anchor
/// more than half the value bound is refused by that bound anyway.
const MAX_ANCHORED_EVENTS: usize = MAX_DOCUMENT_VALUES / 2;
/// Deepest chain of aliases replaying aliases (`*c` -> `*b` -> `*a`).
const MAX_ALIAS_NESTING: usize = 16;

fn yaml_options() -> serde_saphyr::Options {
    let mut options = serde_saphyr::Options::default();
    // Keys are matched case-insensitively later, so every entry must reach us.
    options.duplicate_keys = serde_saphyr::DuplicateKeyPolicy::PassThrough;
    // Kubernetes reads this file with a YAML 1.1 parser: yes/no/on/off are booleans
    // and a leading zero makes an integer octal (`010` is 8).
    options.strict_booleans = false;
    options.legacy_octal_numbers = true;
    // A snippet needs an index of every line of the input, which costs more memory than
    // the document itself for a file of short lines; the message carries line and column.
    options.with_snippet = false;

    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = MAX_DOCUMENT_VALUES;
    budget.max_total_scalar_bytes = MAX_DOCUMENT_SCALAR_BYTES;
    budget.max_depth = MAX_DOCUMENT_DEPTH;
    budget.max_anchors = MAX_DOCUMENT_ANCHORS;
    // What anchors keep, and what alias replay may produce, is bounded like the tree.
    budget.max_recorded_anchor_events = MAX_ANCHORED_EVENTS;
    budget.max_recorded_anchor_bytes = MAX_DOCUMENT_SCALAR_BYTES;
    // The ratio check runs after the whole document was built, so it saves no memory
    // (the bounds above do), and upstream accepts many aliases of one anchor.
    budget.enforce_alias_anchor_ratio = false;
    options.budget = Some(budget);

    let mut alias_limits = serde_saphyr::options::AliasLimits::default();
    alias_limits.max_total_replayed_events = MAX_DOCUMENT_VALUES;
    alias_limits.max_replay_stack_depth = MAX_ALIAS_NESTING;
    options.alias_limits = alias_limits;
    options
}

/// The error behind alias and snippet wrappers.
fn original_error(mut err: &serde_saphyr::Error) -> &serde_saphyr::Error {
    loop {
        match err {
            serde_saphyr::Error::AliasError { error, .. }
            | serde_saphyr::Error::WithSnippet { error, .. } => err = error,
            other => return other,
        }
    }
}

/// Why the document was refused for its size, in the agent's words; `None` for other errors.
fn limit_message(err: &serde_saphyr::Error) -> Option<String> {
    use serde_saphyr::budget::BudgetBreach;
    let refused = "the agent refuses it to bound its memory";
    let message = match original_error(err) {
        serde_saphyr::Error::Budget { breach, .. } => match breach {
            BudgetBreach::Nodes { .. } => format!(
                "the document holds more than {MAX_DOCUMENT_VALUES} values (lists, mappings and scalars, each alias expansion counted again); {refused}"
            ),
            BudgetBreach::ScalarBytes { .. } => format!(
                "the document holds more than {MAX_DOCUMENT_SCALAR_BYTES} bytes of text (each alias expansion counted again); {refused}"
            ),
            BudgetBreach::Depth { .. } => format!(
                "lists and mappings are nested more than {MAX_DOCUMENT_DEPTH} deep; {refused}"
            ),
            BudgetBreach::Anchors { .. } => {
                format!("the document defines more than {MAX_DOCUMENT_ANCHORS} anchors; {refused}")
            }
            BudgetBreach::RecordedAnchorEvents { .. }
            | BudgetBreach::RecordedAnchorBytes { .. } => {
                format!(
                    "the anchors (&name) of the document hold more than {MAX_ANCHORED_EVENTS} values or {MAX_DOCUMENT_SCALAR_BYTES} bytes, nested anchors counted again; {refused}"
                )
            }
            other => format!("the document exceeds a parser limit ({other:?}); {refused}"),
        },
        serde_saphyr::Error::AliasReplayLimitExceeded { .. } => {
            format!("aliases (*name) expand to more than {MAX_DOCUMENT_VALUES} values; {refused}")
        }
        serde_saphyr::Error::AliasReplayStackDepthExceeded { .. } => format!(
            "aliases (*name) replay aliases more than {MAX_ALIAS_NESTING} levels deep; {refused}"
        ),
        _ => return None,
    };
    Some(message)
}

fn saphyr_error(err: &serde_saphyr::Error) -> SyntaxError {
    let position = err.location().and_then(|loc| {
        (loc.line() > 0).then(|| Position {
            line: loc.line(),
            column: loc.column(),
        })
    });
    let message = limit_message(err).unwrap_or_else(|| {
        let message = err.without_snippet().to_string();
        // The message may repeat the location; keep the first line for a one-line log,
        // and escape what it may echo of the input.
        super::quote::escaped(message.lines().next().unwrap_or_default())
    });
    SyntaxError { position, message }
}

/// True when the text is JSON by Kubernetes' rule: the first non-space character is `{`.
pub fn looks_like_json(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Parses the text into a located tree with serde-saphyr; `Ok(None)` for an empty
/// document. The general path, and the reference the fast path for the common shape
/// (`config::fast_path`, chosen in `config::read_document`) must agree with.
pub fn parse_document_general(text: &str) -> Result<Option<Located<'_>>, SyntaxError> {
    match prepare(text)? {
        None => Ok(None),
        Some(_) => parse_yaml(text),
    }
}

/// The checks before any parsing: strict JSON for text that is JSON by Kubernetes' rule,
/// and whether there is any content. `Ok(None)`: an empty document; `Ok(Some(json))`.
pub fn prepare(text: &str) -> Result<Option<bool>, SyntaxError> {
    let json = looks_like_json(text);
    if json {
        // Kubernetes passes JSON straight to Go's strict decoder: check it strictly first.
        if let Err(err) = serde_json::from_str::<serde::de::IgnoredAny>(text) {
            return Err(SyntaxError {
                position: Some(Position {
                    line: err.line() as u64,
                    column: err.column() as u64,
                }),
                message: err.to_string(),
            });
        }
    }
    let no_content = text
        .lines()
        .all(|line| line.trim().is_empty() || line.trim_start().starts_with('#'));
    Ok((!no_content).then_some(json))
}

/// The general path: serde-saphyr with the agent's bounds.
pub fn parse_yaml(text: &str) -> Result<Option<Located<'static>>, SyntaxError> {
    // Go's yaml.Unmarshal reads the first document of the stream and never looks further,
    // so a second document (or a trailing `---`) is not an error. serde-saphyr reports one
    // only after the first document has been read, so keep that document when it does.
    let mut first_document: Option<Option<Located<'static>>> = None;
    let parsed =
        serde_saphyr::with_deserializer_from_str_with_options(text, yaml_options(), |de| {
            first_document = Some(Option::<Located<'static>>::deserialize(de)?);
            Ok(())
        });
    let document = match (parsed, first_document) {
        (Ok(()), Some(document)) => document,
        (Err(err), Some(document))
            if matches!(
                original_error(&err),
                serde_saphyr::Error::MultipleDocuments { .. }
            ) =>
        {
            document
        }
        (Err(err), _) => return Err(saphyr_error(&err)),
        (Ok(()), None) => None,
    };
    Ok(document.filter(|d| d.value != Value::Null))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(text: &str) -> Vec<(Located<'_>, Located<'_>)> {
        match parse_document_general(text).unwrap().unwrap().value {
            Value::Map(m) => m,
            other => panic!("not a map: {other:?}"),
        }
    }

    #[test]
    fn yaml_values_keep_their_positions() {
        let m = map_of("a: 1\nlist:\n  - x\n  - y\n");
        assert_eq!(m[0].1.value, Value::Int(1));
        let Value::List(items) = &m[1].1.value else {
            panic!()
        };
        assert_eq!(items[1].position, Some(Position { line: 4, column: 5 }));
    }

    #[test]
    fn yaml_1_1_booleans_are_booleans() {
        let m = map_of("a: yes\nb: off\nc: On\nd: 'yes'\n");
        assert_eq!(m[0].1.value, Value::Bool(true));
        assert_eq!(m[1].1.value, Value::Bool(false));
        assert_eq!(m[2].1.value, Value::Bool(true));
        assert_eq!(m[3].1.value, Value::Str("yes".into()));
    }

    #[test]
    fn json_is_checked_strictly() {
        let err = parse_document_general("{\"a\": yes}").unwrap_err();
        assert_eq!(err.position, Some(Position { line: 1, column: 7 }));
        assert!(parse_document_general("{\"a\": 1} trailing").is_err());
        let m = map_of("{\"a\": true,\n \"b\": [\"x\"]}");
        assert_eq!(m[1].1.position.map(|p| p.line), Some(2));
    }

    #[test]
    fn empty_and_comment_only_documents_are_empty() {
        assert_eq!(parse_document_general("").unwrap(), None);
        assert_eq!(parse_document_general("\n# nothing\n  \n").unwrap(), None);
        assert_eq!(parse_document_general("null\n").unwrap(), None);
    }

    #[test]
    fn duplicate_keys_reach_the_caller() {
        assert_eq!(map_of("a: 1\na: 2\n").len(), 2);
    }
}
