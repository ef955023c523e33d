//! Windows nodes: win-bridge networks get the agent's effect from the OutBoundNAT
//! policy's exception list in the CNI config. This renders that list and rewrites it in
//! place, replacing only the list's bytes so every other field, the key order and the
//! formatting stay exactly as they were.

use std::ops::Range;
use std::path::Path;

use anyhow::{Context, bail};

use crate::policy::{Family, Policy};

/// The exception list for a policy: the IPv4 prefixes that keep the pod's address.
pub fn exception_list(policy: &Policy) -> Vec<String> {
    let Some(v4) = policy.family(Family::V4) else {
        return Vec::new();
    };
    let mut list: Vec<String> = Vec::new();
    for prefix in v4.link_local.iter().chain(&v4.non_masq.0) {
        let text = prefix.to_string();
        if !list.contains(&text) {
            list.push(text);
        }
    }
    list
}

/// A JSON value's location: the path of keys/indices to it and its byte range.
#[derive(Debug)]
struct Located {
    path: Vec<PathStep>,
    span: Range<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PathStep {
    Key(String),
    Index(usize),
}

/// Records the span of every value in a JSON document.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
    found: Vec<Located>,
}

impl<'a> Scanner<'a> {
    fn skip_space(&mut self) {
        while self.at < self.text.len() && self.text[self.at].is_ascii_whitespace() {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> anyhow::Result<()> {
        self.skip_space();
        if self.text.get(self.at) != Some(&byte) {
            bail!("expected '{}' at byte {}", byte as char, self.at);
        }
        self.at += 1;
        Ok(())
    }

    fn string(&mut self) -> anyhow::Result<String> {
        self.skip_space();
        let start = self.at;
        self.expect(b'"')?;
        while self.at < self.text.len() {
            match self.text[self.at] {
                b'\\' => self.at += 2,
                b'"' => {
                    self.at += 1;
                    let raw = std::str::from_utf8(&self.text[start..self.at])?;
                    return Ok(serde_json::from_str(raw)?);
                }
                _ => self.at += 1,
            }
        }
        bail!("unterminated string at byte {start}")
    }

    fn value(&mut self, path: &mut Vec<PathStep>) -> anyhow::Result<()> {
        self.skip_space();
        let start = self.at;
        match self.text.get(self.at) {
            Some(b'{') => {
                self.at += 1;
                self.skip_space();
                if self.text.get(self.at) == Some(&b'}') {
                    self.at += 1;
                } else {
                    loop {
                        let key = self.string()?;
                        self.expect(b':')?;
                        path.push(PathStep::Key(key));
                        self.value(path)?;
                        path.pop();
                        self.skip_space();
                        match self.text.get(self.at) {
                            Some(b',') => self.at += 1,
                            Some(b'}') => {
                                self.at += 1;
                                break;
                            }
                            _ => bail!("expected ',' or '}}' at byte {}", self.at),
                        }
                    }
                }
            }
            Some(b'[') => {
                self.at += 1;
                self.skip_space();
                if self.text.get(self.at) == Some(&b']') {
                    self.at += 1;
                } else {
                    let mut index = 0;
                    loop {
                        path.push(PathStep::Index(index));
                        self.value(path)?;
                        path.pop();
                        index += 1;
                        self.skip_space();
                        match self.text.get(self.at) {
                            Some(b',') => self.at += 1,
                            Some(b']') => {
                                self.at += 1;
                                break;
                            }
                            _ => bail!("expected ',' or ']' at byte {}", self.at),
                        }
                    }
                }
            }
            Some(b'"') => {
                self.string()?;
            }
            Some(_) => {
                while self.at < self.text.len()
                    && !matches!(self.text[self.at], b',' | b'}' | b']')
                    && !self.text[self.at].is_ascii_whitespace()
                {
                    self.at += 1;
                }
            }
            None => bail!("unexpected end of input"),
        }
        self.found.push(Located {
            path: path.clone(),
            span: start..self.at,
        });
        Ok(())
    }
}

/// Where the exception lists are: `[..., policies, i, value, ExceptionList]` (v1) or
/// `[..., policies, i, value, Settings, Exceptions]` (apiVersion 2), for OutBoundNAT
/// policies in a conf or in each plugin of a conflist.
fn exception_list_paths(document: &serde_json::Value) -> Vec<(Vec<PathStep>, bool)> {
    let mut paths = Vec::new();
    let mut visit = |base: Vec<PathStep>, conf: &serde_json::Value| {
        let Some(policies) = conf.get("policies").and_then(|p| p.as_array()) else {
            return;
        };
        for (i, policy) in policies.iter().enumerate() {
            let Some(value) = policy.get("value") else {
                continue;
            };
            let is_outbound_nat = value
                .get("Type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.eq_ignore_ascii_case("OutBoundNAT"));
            if !is_outbound_nat {
                continue;
            }
            let mut path = base.clone();
            path.extend([
                PathStep::Key("policies".into()),
                PathStep::Index(i),
                PathStep::Key("value".into()),
            ]);
            if value.get("Settings").is_some() {
                path.extend([
                    PathStep::Key("Settings".into()),
                    PathStep::Key("Exceptions".into()),
                ]);
                paths.push((path, true));
            } else {
                path.push(PathStep::Key("ExceptionList".into()));
                paths.push((path, false));
            }
        }
    };
    visit(Vec::new(), document);
    if let Some(plugins) = document.get("plugins").and_then(|p| p.as_array()) {
        for (i, plugin) in plugins.iter().enumerate() {
            visit(
                vec![PathStep::Key("plugins".into()), PathStep::Index(i)],
                plugin,
            );
        }
    }
    paths
}

/// Formats the list like the one it replaces: one entry per line with the same
/// indentation if the old list spanned lines, otherwise inline.
fn format_list(list: &[String], old: &str, text: &str, old_start: usize) -> String {
    let quoted: Vec<String> = list.iter().map(|s| format!("{s:?}")).collect();
    if !old.contains('\n') || list.is_empty() {
        return format!("[{}]", quoted.join(", "));
    }
    let line_start = text[..old_start].rfind('\n').map_or(0, |i| i + 1);
    let outer: String = text[line_start..old_start]
        .chars()
        .take_while(|c| c.is_whitespace())
        .collect();
    let inner = old
        .lines()
        .nth(1)
        .map(|l| {
            l.chars()
                .take_while(|c| c.is_whitespace())
                .collect::<String>()
        })
        .unwrap_or_else(|| format!("{outer}  "));
    format!(
        "[\n{inner}{}\n{outer}]",
        quoted.join(&format!(",\n{inner}"))
    )
}

/// Returns the CNI config text with every OutBoundNAT exception list replaced by `list`.
pub fn rewrite_exception_lists(text: &str, list: &[String]) -> anyhow::Result<String> {
    let document: serde_json::Value =
        serde_json::from_str(text).context("the CNI config is not valid JSON")?;
    let wanted = exception_list_paths(&document);
    if wanted.is_empty() {
        bail!("no OutBoundNAT policy found (looked in policies[] and plugins[].policies[])");
    }
    let mut scanner = Scanner {
        text: text.as_bytes(),
        at: 0,
        found: Vec::new(),
    };
    scanner.value(&mut Vec::new())?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for (path, _v2) in &wanted {
        match scanner.found.iter().find(|l| &l.path == path) {
            Some(located) => {
                let old = &text[located.span.clone()];
                edits.push((
                    located.span.clone(),
                    format_list(list, old, text, located.span.start),
                ));
            }
            None => bail!(
                "the OutBoundNAT policy has no {} list to rewrite",
                match path.last() {
                    Some(PathStep::Key(k)) => k.as_str(),
                    _ => "exception",
                }
            ),
        }
    }
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut out = text.to_string();
    for (span, replacement) in edits {
        out.replace_range(span, &replacement);
    }
    Ok(out)
}

/// Rewrites the file atomically: a temporary file beside it, then a rename.
pub fn rewrite_file(path: &Path, list: &[String]) -> anyhow::Result<bool> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let updated = rewrite_exception_lists(&text, list)
        .with_context(|| format!("rewriting {}", path.display()))?;
    if updated == text {
        return Ok(false);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temporary = dir.join(format!(".{name}.ip-masq-agent.tmp"));
    std::fs::write(&temporary, &updated)
        .with_context(|| format!("writing {}", temporary.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        let _ = std::fs::set_permissions(&temporary, meta.permissions());
    }
    std::fs::rename(&temporary, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(true)
}

#[cfg(test)]
mod tests;
