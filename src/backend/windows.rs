//! Windows nodes: win-bridge networks get the agent's effect from the OutBoundNAT
//! policy's exception list in the CNI config. This renders that list and rewrites it in
//! place, replacing only the list's bytes so every other field, the key order and the
//! formatting stay exactly as they were.

use std::collections::HashMap;
use std::io::Write;
use std::ops::Range;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::policy::{Family, Policy};

/// The exception list for a policy: the IPv4 prefixes that keep the pod's address.
pub fn exception_list(policy: &Policy) -> Vec<String> {
    let Some(v4) = policy.family(Family::V4) else {
        return Vec::new();
    };
    // With forceMasqueradeCIDRs the list is the policy's flat answer (longest-prefix match
    // already applied, flattened to CIDRs); a source scope has no place in it.
    if let Some(resolved) = &v4.resolved {
        return resolved.keep.iter().map(ToString::to_string).collect();
    }
    let mut list: Vec<String> = Vec::new();
    for prefix in v4.link_local.iter().chain(&v4.non_masq.0) {
        let text = prefix.to_string();
        if !list.contains(&text) {
            list.push(text);
        }
    }
    list
}

/// The text `render --backend windows` prints: the exception list as JSON.
pub fn render(policy: &Policy) -> String {
    let list = exception_list(policy);
    let mut text = serde_json::to_string_pretty(&list).unwrap_or_else(|_| "[]".to_string());
    text.push('\n');
    text
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

/// A key that appears twice in one object (compared ignoring ASCII case, as Go's
/// encoding/json in the CNI plugin matches keys).
#[derive(Debug)]
struct DuplicateKey {
    /// The path of the object holding both keys.
    object: Vec<PathStep>,
    key: String,
    first_key: String,
    first_at: usize,
    again_at: usize,
}

/// Records the span of every value in a JSON document, and every duplicate key.
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
    found: Vec<Located>,
    duplicates: Vec<DuplicateKey>,
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
                    // Lower-cased key -> (key as written, byte offset).
                    let mut seen: HashMap<String, (String, usize)> = HashMap::new();
                    loop {
                        self.skip_space();
                        let key_at = self.at;
                        let key = self.string()?;
                        match seen.get(&key.to_ascii_lowercase()) {
                            Some((first_key, first_at)) => self.duplicates.push(DuplicateKey {
                                object: path.clone(),
                                key: key.clone(),
                                first_key: first_key.clone(),
                                first_at: *first_at,
                                again_at: key_at,
                            }),
                            None => {
                                seen.insert(key.to_ascii_lowercase(), (key.clone(), key_at));
                            }
                        }
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

/// Whether the rewrite reads keys of the object at `path`: the top level, each plugin of
/// a conflist, each policy, its `value` and the value's `Settings`. A duplicate key in one
/// of them could make the plugin and this rewrite see different lists.
fn is_read_by_the_rewrite(path: &[PathStep]) -> bool {
    let is = |step: &PathStep, name: &str| matches!(step, PathStep::Key(key) if key.eq_ignore_ascii_case(name));
    let in_conf = match path {
        [plugins, PathStep::Index(_), rest @ ..] if is(plugins, "plugins") => rest,
        _ => path,
    };
    match in_conf {
        [] => true,
        [policies, PathStep::Index(_), rest @ ..] if is(policies, "policies") => match rest {
            [] => true,
            [value] => is(value, "value"),
            [value, settings] => is(value, "value") && is(settings, "Settings"),
            _ => false,
        },
        _ => false,
    }
}

/// A path as the user would write it, e.g. `plugins[0].policies[1].value`.
fn describe_path(path: &[PathStep]) -> String {
    if path.is_empty() {
        return "the top-level object".into();
    }
    let mut text = String::new();
    for step in path {
        match step {
            PathStep::Key(key) if text.is_empty() => text.push_str(key),
            PathStep::Key(key) => {
                text.push('.');
                text.push_str(key);
            }
            PathStep::Index(index) => text.push_str(&format!("[{index}]")),
        }
    }
    text
}

/// "line L, column C (byte B)" for a byte offset, lines and columns from 1.
fn describe_offset(text: &str, offset: usize) -> String {
    let before = &text.as_bytes()[..offset.min(text.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let column = offset
        - before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1)
        + 1;
    format!("line {line}, column {column} (byte {offset})")
}

/// Returns the CNI config text with every OutBoundNAT exception list replaced by `list`.
pub fn rewrite_exception_lists(text: &str, list: &[String]) -> anyhow::Result<String> {
    let document: serde_json::Value =
        serde_json::from_str(text).context("the CNI config is not valid JSON")?;
    let mut scanner = Scanner {
        text: text.as_bytes(),
        at: 0,
        found: Vec::new(),
        duplicates: Vec::new(),
    };
    scanner.value(&mut Vec::new())?;
    // serde_json keeps the last of two equal keys, Go's encoding/json in the plugin
    // matches keys ignoring case, and the byte spans below would find the first: the
    // list edited could be one the plugin never reads, so such a file is refused.
    if let Some(duplicate) = scanner
        .duplicates
        .iter()
        .find(|d| is_read_by_the_rewrite(&d.object))
    {
        let first = if duplicate.first_key == duplicate.key {
            String::new()
        } else {
            format!(" (as {:?})", duplicate.first_key)
        };
        bail!(
            "duplicate key {:?} in {} at {}, first at {}{first}; \
             JSON readers disagree on which one counts, so the file is left unchanged: \
             remove one of them",
            duplicate.key,
            describe_path(&duplicate.object),
            describe_offset(text, duplicate.again_at),
            describe_offset(text, duplicate.first_at),
        );
    }
    let wanted = exception_list_paths(&document);
    if wanted.is_empty() {
        bail!("no OutBoundNAT policy found (looked in policies[] and plugins[].policies[])");
    }
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

/// Rewrites the file's exception lists; returns whether anything changed. A symlink
/// (or a chain of them, as kubelet's `..data` layout makes) is followed and the file it
/// ends at is replaced, so the links stay as they are.
pub fn rewrite_file(path: &Path, list: &[String]) -> anyhow::Result<bool> {
    rewrite_file_checked(path, list, &|_| Ok(()))
}

/// `rewrite_file`, with `before_rename` run on the complete temporary file just before it
/// replaces the target: the tests fail it there to check the clean-up.
fn rewrite_file_checked(
    path: &Path,
    list: &[String],
    before_rename: &dyn Fn(&Path) -> std::io::Result<()>,
) -> anyhow::Result<bool> {
    let target =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let metadata =
        std::fs::metadata(&target).with_context(|| format!("reading {}", target.display()))?;
    if !metadata.is_file() {
        bail!("{} is not a regular file", target.display());
    }
    let text = std::fs::read_to_string(&target)
        .with_context(|| format!("reading {}", target.display()))?;
    let updated = rewrite_exception_lists(&text, list)
        .with_context(|| format!("rewriting {}", path.display()))?;
    if updated == text {
        return Ok(false);
    }
    replace_file(&target, updated.as_bytes(), &metadata, before_rename)?;
    Ok(true)
}

/// Replaces `target` (a resolved path) with `contents`, keeping its mode and owner: a
/// temporary file beside it, fsynced, renamed over it, then the directory fsynced so the
/// rename itself survives a crash. The temporary file is removed if anything fails.
fn replace_file(
    target: &Path,
    contents: &[u8],
    metadata: &std::fs::Metadata,
    before_rename: &dyn Fn(&Path) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .with_context(|| format!("{} has no file name", target.display()))?;
    let temporary: PathBuf = dir.join(format!(".{}.ip-masq-agent.tmp", name.to_string_lossy()));
    // A temporary file left by a crashed run is stale; create_new then refuses to follow
    // anything planted at the name.
    match std::fs::remove_file(&temporary) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing stale {}", temporary.display()));
        }
        _ => {}
    }
    let written = write_temporary(&temporary, contents, metadata)
        .and_then(|()| {
            before_rename(&temporary).with_context(|| format!("checking {}", temporary.display()))
        })
        .and_then(|()| {
            std::fs::rename(&temporary, target)
                .with_context(|| format!("replacing {}", target.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| {
            format!(
                "{} was replaced, but syncing {} failed: the change may not survive a crash",
                target.display(),
                dir.display()
            )
        })
}

/// Creates the temporary file with the target's contents, owner and mode, on disk.
fn write_temporary(
    temporary: &Path,
    contents: &[u8],
    metadata: &std::fs::Metadata,
) -> anyhow::Result<()> {
    let context = || format!("writing {}", temporary.display());
    // Owner-only until the target's owner and mode are copied over.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temporary)
        .with_context(context)?;
    file.write_all(contents).with_context(context)?;
    // chown before chmod: chown clears the setuid and setgid bits.
    std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid())).with_context(
        || {
            format!(
                "giving {} the owner {}:{} of the file it replaces",
                temporary.display(),
                metadata.uid(),
                metadata.gid()
            )
        },
    )?;
    file.set_permissions(metadata.permissions())
        .with_context(context)?;
    file.sync_all().with_context(context)?;
    Ok(())
}

#[cfg(test)]
mod tests;
