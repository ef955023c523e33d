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

use crate::config::{MAX_CONFIG_BYTES, MAX_DOCUMENT_DEPTH, MAX_DOCUMENT_VALUES, quote};
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

/// Walks a JSON document (already checked to be valid) keeping only the path to the
/// current value: it records the byte spans of the values at the `wanted` paths and the
/// first duplicate key in an object the rewrite reads, and refuses a document beyond the
/// config file's bounds. Nothing is kept per value, so its memory is the depth of the
/// document, whatever its size (a copy of the path per value cost 1.8 GB for 1.2 MB of
/// nested arrays).
struct Scanner<'a> {
    text: &'a [u8],
    at: usize,
    path: Vec<PathStep>,
    values: usize,
    wanted: &'a [Vec<PathStep>],
    /// Index into `wanted`, and the span found there.
    found: Vec<(usize, Range<usize>)>,
    duplicate: Option<DuplicateKey>,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a str, wanted: &'a [Vec<PathStep>]) -> Scanner<'a> {
        Scanner {
            text: text.as_bytes(),
            at: 0,
            path: Vec::new(),
            values: 0,
            wanted,
            found: Vec::new(),
            duplicate: None,
        }
    }

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

    fn value(&mut self) -> anyhow::Result<()> {
        self.values += 1;
        if self.values > MAX_DOCUMENT_VALUES {
            bail!(
                "the CNI config holds more than {MAX_DOCUMENT_VALUES} values; refusing it to bound memory"
            );
        }
        if self.path.len() > MAX_DOCUMENT_DEPTH {
            bail!(
                "the CNI config nests lists and objects more than {MAX_DOCUMENT_DEPTH} deep; refusing it to bound memory"
            );
        }
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
                        match seen.get(&go_fold(&key)) {
                            Some((first_key, first_at)) => {
                                if self.duplicate.is_none() && is_read_by_the_rewrite(&self.path) {
                                    self.duplicate = Some(DuplicateKey {
                                        object: self.path.clone(),
                                        key: key.clone(),
                                        first_key: first_key.clone(),
                                        first_at: *first_at,
                                        again_at: key_at,
                                    });
                                }
                            }
                            None => {
                                seen.insert(go_fold(&key), (key.clone(), key_at));
                            }
                        }
                        self.expect(b':')?;
                        self.path.push(PathStep::Key(key));
                        self.value()?;
                        self.path.pop();
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
                        self.path.push(PathStep::Index(index));
                        self.value()?;
                        self.path.pop();
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
        if let Some(index) = self.wanted.iter().position(|w| *w == self.path) {
            self.found.push((index, start..self.at));
        }
        Ok(())
    }
}

/// A string folded as Go's encoding/json folds field names (`bytes.EqualFold`): case
/// folding of every character, not only ASCII (`ſ` is `s`, the Kelvin sign `K` is `k`).
fn go_fold(text: &str) -> String {
    text.chars()
        .map(|c| {
            let mut upper = c.to_uppercase();
            match (upper.next(), upper.next()) {
                (Some(u), None) => {
                    let mut lower = u.to_lowercase();
                    match (lower.next(), lower.next()) {
                        (Some(l), None) => l,
                        _ => c,
                    }
                }
                _ => c,
            }
        })
        .collect()
}

/// Whether two keys are one for Go's encoding/json.
fn same_key(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b) || go_fold(a) == go_fold(b)
}

/// A key of a JSON object as the CNI plugin (Go's encoding/json) finds it: the exact
/// spelling first, otherwise one that folds to the same (see [`go_fold`]). Returns the key
/// as written and its value.
fn get_key<'v>(
    object: &'v serde_json::Value,
    name: &str,
) -> Option<(&'v str, &'v serde_json::Value)> {
    let map = object.as_object()?;
    map.get_key_value(name)
        .or_else(|| map.iter().find(|(key, _)| same_key(key, name)))
        .map(|(key, value)| (key.as_str(), value))
}

/// Where the exception lists are: `[..., policies, i, value, ExceptionList]` (v1) or
/// `[..., policies, i, value, Settings, Exceptions]` (apiVersion 2), for OutBoundNAT
/// policies in a conf or in each plugin of a conflist. Keys are found as the plugin finds
/// them (ignoring case), and each path step is the key as written in the file.
fn exception_list_paths(document: &serde_json::Value) -> Vec<(Vec<PathStep>, bool)> {
    let mut paths = Vec::new();
    let mut visit = |base: Vec<PathStep>, conf: &serde_json::Value| {
        let Some((policies_key, policies)) = get_key(conf, "policies") else {
            return;
        };
        let Some(policies) = policies.as_array() else {
            return;
        };
        for (i, policy) in policies.iter().enumerate() {
            let Some((value_key, value)) = get_key(policy, "value") else {
                continue;
            };
            let is_outbound_nat = get_key(value, "Type")
                .and_then(|(_, t)| t.as_str())
                .is_some_and(|t| t.eq_ignore_ascii_case("OutBoundNAT"));
            if !is_outbound_nat {
                continue;
            }
            let mut path = base.clone();
            path.extend([
                PathStep::Key(policies_key.into()),
                PathStep::Index(i),
                PathStep::Key(value_key.into()),
            ]);
            if let Some((settings_key, settings)) = get_key(value, "Settings") {
                let exceptions_key =
                    get_key(settings, "Exceptions").map_or("Exceptions", |(k, _)| k);
                path.extend([
                    PathStep::Key(settings_key.into()),
                    PathStep::Key(exceptions_key.into()),
                ]);
                paths.push((path, true));
            } else {
                let list_key = get_key(value, "ExceptionList").map_or("ExceptionList", |(k, _)| k);
                path.push(PathStep::Key(list_key.into()));
                paths.push((path, false));
            }
        }
    };
    visit(Vec::new(), document);
    if let Some((plugins_key, plugins)) = get_key(document, "plugins")
        && let Some(plugins) = plugins.as_array()
    {
        for (i, plugin) in plugins.iter().enumerate() {
            visit(
                vec![PathStep::Key(plugins_key.into()), PathStep::Index(i)],
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
    let is =
        |step: &PathStep, name: &str| matches!(step, PathStep::Key(key) if same_key(key, name));
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
    // Strictly valid JSON first, without building anything (bounded memory), then the
    // walk that bounds the values and depth, and only then a tree of it.
    serde_json::from_str::<serde::de::IgnoredAny>(text)
        .context("the CNI config is not valid JSON")?;
    let mut scanner = Scanner::new(text, &[]);
    scanner.value()?;
    // serde_json keeps the last of two equal keys, Go's encoding/json in the plugin
    // matches keys ignoring case, and the byte spans below would find the first: the
    // list edited could be one the plugin never reads, so such a file is refused.
    if let Some(duplicate) = &scanner.duplicate {
        let first = if duplicate.first_key == duplicate.key {
            String::new()
        } else {
            format!(" (as {})", quote::quoted(&duplicate.first_key))
        };
        bail!(
            "duplicate key {} in {} at {}, first at {}{first}; \
             JSON readers disagree on which one counts, so the file is left unchanged: \
             remove one of them",
            quote::quoted(&duplicate.key),
            describe_path(&duplicate.object),
            describe_offset(text, duplicate.again_at),
            describe_offset(text, duplicate.first_at),
        );
    }
    let document: serde_json::Value =
        serde_json::from_str(text).context("the CNI config is not valid JSON")?;
    let wanted = exception_list_paths(&document);
    drop(document);
    if wanted.is_empty() {
        bail!("no OutBoundNAT policy found (looked in policies[] and plugins[].policies[])");
    }
    let paths: Vec<Vec<PathStep>> = wanted.iter().map(|(path, _)| path.clone()).collect();
    let mut scanner = Scanner::new(text, &paths);
    scanner.value()?;
    let mut edits: Vec<(Range<usize>, String)> = Vec::new();
    for (index, path) in paths.iter().enumerate() {
        match scanner.found.iter().find(|(i, _)| *i == index) {
            Some((_, span)) => {
                let old = &text[span.clone()];
                edits.push((span.clone(), format_list(list, old, text, span.start)));
            }
            None => bail!(
                "the OutBoundNAT policy has no {} list to rewrite",
                match path.last() {
                    Some(PathStep::Key(k)) => quote::raw_or_quoted(k),
                    _ => "exception".to_string(),
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

/// How many times a rewrite starts again when the file changed while it was rewritten.
const REWRITE_ATTEMPTS: usize = 3;

/// `rewrite_file`, with `before_rename` run on the complete temporary file just before it
/// replaces the target: the tests fail it there to check the clean-up, or change the
/// target there as a concurrent writer would.
fn rewrite_file_checked(
    path: &Path,
    list: &[String],
    before_rename: &dyn Fn(&Path) -> std::io::Result<()>,
) -> anyhow::Result<bool> {
    let target =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", quote::path(path)))?;
    for _ in 0..REWRITE_ATTEMPTS {
        let (text, read) = read_conf(&target)?;
        let updated = rewrite_exception_lists(&text, list)
            .with_context(|| format!("rewriting {}", quote::path(path)))?;
        if updated == text {
            return Ok(false);
        }
        // Another writer (a CNI installer, an operator's editor) may have replaced or
        // edited the file since it was read: renaming over it would undo that change.
        let unchanged = || still_as_read(&target, &text, &read);
        if replace_file(
            &target,
            updated.as_bytes(),
            &read,
            before_rename,
            &unchanged,
        )? {
            return Ok(true);
        }
    }
    bail!(
        "{} changed while it was being rewritten, {REWRITE_ATTEMPTS} times in a row (another writer is at work?); it is left as the other writer made it: run windows-cni again once that writer is done",
        quote::path(path)
    )
}

/// Reads the CNI config: a regular file of at most [`MAX_CONFIG_BYTES`] (the config
/// file's bound), UTF-8. Returns its text and the metadata of the file read.
fn read_conf(target: &Path) -> anyhow::Result<(String, std::fs::Metadata)> {
    let shown = quote::path(target);
    let stat = std::fs::metadata(target).with_context(|| format!("reading {shown}"))?;
    if !stat.is_file() {
        bail!("{shown} is not a regular file");
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(target)
        .with_context(|| format!("reading {shown}"))?;
    let metadata = file
        .metadata()
        .with_context(|| format!("reading {shown}"))?;
    if !metadata.is_file() {
        bail!("{shown} is not a regular file");
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(file, MAX_CONFIG_BYTES + 1),
        &mut bytes,
    )
    .with_context(|| format!("reading {shown}"))?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        bail!(
            "{shown} is larger than the {MAX_CONFIG_BYTES} bytes the agent reads; refusing to parse it"
        );
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{shown} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok((text, metadata))
}

/// Whether `target` is still the file that was read, with the same bytes.
fn still_as_read(target: &Path, text: &str, read: &std::fs::Metadata) -> bool {
    let Ok(now) = std::fs::metadata(target) else {
        return false;
    };
    let same_file = (
        now.dev(),
        now.ino(),
        now.len(),
        now.mtime(),
        now.mtime_nsec(),
    ) == (
        read.dev(),
        read.ino(),
        read.len(),
        read.mtime(),
        read.mtime_nsec(),
    ) && (now.ctime(), now.ctime_nsec()) == (read.ctime(), read.ctime_nsec());
    // The times can be coarse on some filesystems: the bytes decide too.
    same_file && read_conf(target).is_ok_and(|(again, _)| again == text)
}

/// Replaces `target` (a resolved path) with `contents`, keeping its mode and owner: a
/// temporary file beside it, fsynced, renamed over it, then the directory fsynced so the
/// rename itself survives a crash. The temporary file is removed if anything fails, or
/// if `unchanged` says the target changed since it was read (then `Ok(false)`).
fn replace_file(
    target: &Path,
    contents: &[u8],
    metadata: &std::fs::Metadata,
    before_rename: &dyn Fn(&Path) -> std::io::Result<()>,
    unchanged: &dyn Fn() -> bool,
) -> anyhow::Result<bool> {
    let dir = target.parent().unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .with_context(|| format!("{} has no file name", quote::path(target)))?;
    remove_stale_temporaries(dir, &name.to_string_lossy());
    // One name per run: two runs at once never take each other's temporary file.
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let temporary: PathBuf = dir.join(format!(
        ".{}.ip-masq-agent.{}.{nanos}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = write_temporary(&temporary, target, contents, metadata)
        .and_then(|()| {
            before_rename(&temporary)
                .with_context(|| format!("checking {}", quote::path(&temporary)))
        })
        .map(|()| unchanged())
        .and_then(|unchanged| {
            if unchanged {
                std::fs::rename(&temporary, target)
                    .with_context(|| format!("replacing {}", quote::path(target)))?;
            }
            Ok(unchanged)
        });
    match written {
        Err(e) => {
            let _ = std::fs::remove_file(&temporary);
            return Err(e);
        }
        Ok(false) => {
            let _ = std::fs::remove_file(&temporary);
            return Ok(false);
        }
        Ok(true) => {}
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| {
            format!(
                "{} was replaced, but syncing {} failed: the change may not survive a crash",
                quote::path(target),
                quote::path(dir)
            )
        })?;
    Ok(true)
}

/// Removes temporary files that crashed runs left beside `name`: the one name of older
/// releases, and this release's names untouched for a minute. A live run holds its file
/// for milliseconds; its PID says nothing here, as it may be of another PID namespace.
fn remove_stale_temporaries(dir: &Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let legacy = format!(".{name}.ip-masq-agent.tmp");
    let prefix = format!(".{name}.ip-masq-agent.");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        let ours = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".tmp"))
            .is_some_and(|rest| rest.bytes().all(|b| b.is_ascii_digit() || b == b'.'));
        let untouched_for_a_minute = || {
            entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_some_and(|age| age >= STALE_TEMPORARY)
        };
        if file == legacy || (ours && untouched_for_a_minute()) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A temporary file of this age belongs to no live run.
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(60);

/// Creates the temporary file with the target's contents, owner and mode, on disk.
fn write_temporary(
    temporary: &Path,
    target: &Path,
    contents: &[u8],
    metadata: &std::fs::Metadata,
) -> anyhow::Result<()> {
    let context = || format!("writing {}", quote::path(temporary));
    // Owner-only until the target's owner and mode are copied over; create_new never
    // follows anything planted at the name.
    let create = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(temporary)
    };
    let created = match create() {
        // Left by a run that crashed: stale.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::remove_file(temporary).with_context(|| {
                format!(
                    "removing the stale temporary file {}",
                    quote::path(temporary)
                )
            })?;
            create()
        }
        other => other,
    };
    let mut file = created.with_context(|| {
        format!(
            "creating the temporary file {} that replaces {}",
            quote::path(temporary),
            quote::path(target)
        )
    })?;
    file.write_all(contents).with_context(context)?;
    // chown before chmod: chown clears the setuid and setgid bits.
    std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid())).with_context(
        || {
            format!(
                "giving {} the owner {}:{} of the file it replaces",
                quote::path(temporary),
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
