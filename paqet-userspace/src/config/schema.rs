//! The tree walk over the key table ([`super::keys`]): unknown keys (with "did you mean" hints), value
//! types and, in imported YAML, Go zero values as "unset"; and the collected [`Issues`].

use super::keys::{key_info, schema, KeyInfo, KeyType};
use super::Issue;

/// Whether the TOML/YAML source is our own (strict) or an imported upstream YAML (lenient).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// TOML: unknown keys and misplaced role keys are errors.
    Strict,
    /// Upstream YAML: unknown keys are warnings, Go zero values mean "unset", scalars coerce to strings.
    Lenient,
}

/// Collected problems.
#[derive(Debug, Default)]
pub(crate) struct Issues {
    pub errors: Vec<Issue>,
    pub warnings: Vec<Issue>,
}

/// Whether a key path holds a secret (`transport.kcp.key`, any `password`): its value is never echoed.
pub(crate) fn is_secret_key(path: &str) -> bool {
    path == "transport.kcp.key"
        || path == "transport.noise.private_key"
        || path == "transport.noise.psk"
        || path.ends_with(".password")
}

/// The value to show in a message: secrets become `<redacted>`.
fn redact_value(key: &str, value: Option<String>) -> Option<String> {
    match value {
        Some(_) if is_secret_key(key) => Some("<redacted>".to_string()),
        v => v,
    }
}

impl Issues {
    pub fn error(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        let key = key.into();
        let value = redact_value(&key, value);
        self.errors.push(Issue {
            key,
            value,
            message: message.into(),
        });
    }
    pub fn warn(
        &mut self,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        let key = key.into();
        let value = redact_value(&key, value);
        self.warnings.push(Issue {
            key,
            value,
            message: message.into(),
        });
    }
    /// An error in strict mode, a warning in lenient mode.
    pub fn strict(
        &mut self,
        mode: Mode,
        key: impl Into<String>,
        value: Option<String>,
        message: impl Into<String>,
    ) {
        match mode {
            Mode::Strict => self.error(key, value, message),
            Mode::Lenient => self.warn(key, value, message),
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// Whether some leaf lives under `prefix` followed by `sep` (`.` for a table, `[].` for an array of tables).
fn has_children(prefix: &str, sep: &str) -> bool {
    schema().iter().any(|k| {
        k.path.len() > prefix.len() + sep.len()
            && k.path.starts_with(prefix)
            && k.path[prefix.len()..].starts_with(sep)
    })
}

/// Direct child names known under a schema prefix (for "unknown key" hints).
fn children(prefix: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for k in schema() {
        let rest = if prefix.is_empty() {
            Some(k.path)
        } else {
            k.path
                .strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('.'))
        };
        if let Some(rest) = rest {
            let name = rest.split(['.', '[']).next().unwrap_or(rest).to_string();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// Levenshtein distance, for "did you mean" hints on short key names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn unknown_message(schema_prefix: &str, key: &str, full: &str) -> String {
    let known = children(schema_prefix);
    let mut msg = String::from("unknown key");
    match full {
        "transport.tcpbuf" | "transport.udpbuf" => {
            msg.push_str(" (removed upstream in alpha.21: the TCP copy buffer is fixed at 8 KiB and UDP datagrams at 4 KiB)");
        }
        "pprof" | "debug.diag" => msg.push_str(" (use debug.pprof / metrics.listen)"),
        _ => {}
    }
    if let Some(best) = known
        .iter()
        .filter(|c| distance(c, key) <= 2)
        .min_by_key(|c| distance(c, key))
    {
        msg.push_str(&format!(
            "; did you mean `{}`?",
            join(schema_prefix, best).replace("[]", "[…]")
        ));
    } else if !known.is_empty() {
        let place = if schema_prefix.is_empty() {
            "at top level".to_string()
        } else {
            format!("in {schema_prefix}")
        };
        msg.push_str(&format!("; known keys {place}: {}", known.join(", ")));
    }
    msg
}

/// Short rendering of a value for messages (strings quoted, tables/arrays abbreviated).
pub(crate) fn show(v: &toml::Value) -> String {
    match v {
        toml::Value::Table(_) => "{…}".to_string(),
        other => {
            let s = other.to_string();
            if s.chars().count() > 80 {
                let cut: String = s.chars().take(77).collect();
                format!("{cut}…")
            } else {
                s
            }
        }
    }
}

/// Checks one leaf value's type; returns the value to keep (after lenient coercion) or `None` when the
/// key is to be treated as absent.
fn check_leaf(
    info: &KeyInfo,
    v: &toml::Value,
    disp: &str,
    mode: Mode,
    issues: &mut Issues,
) -> Option<toml::Value> {
    use toml::Value as V;
    let coerced = match (info.kind, v) {
        (KeyType::Str, V::String(_))
        | (KeyType::Int, V::Integer(_))
        | (KeyType::Bool, V::Boolean(_)) => Some(v.clone()),
        (KeyType::StrList, V::Array(items)) if items.iter().all(|i| i.is_str()) => Some(v.clone()),
        (KeyType::StrOrList, V::String(_)) => Some(v.clone()),
        (KeyType::StrOrList, V::Array(items)) if items.iter().all(|i| i.is_str()) => {
            Some(v.clone())
        }
        (KeyType::IntOrStr, V::Integer(_) | V::String(_)) => Some(v.clone()),
        (KeyType::IntOrStr, V::Float(f)) if mode == Mode::Lenient => Some(V::String(f.to_string())),
        // Upstream YAML: Go unmarshals plain scalars into string fields.
        (KeyType::Str, V::Integer(i)) if mode == Mode::Lenient => Some(V::String(i.to_string())),
        (KeyType::Str, V::Float(f)) if mode == Mode::Lenient => Some(V::String(f.to_string())),
        (KeyType::Str, V::Boolean(b)) if mode == Mode::Lenient => Some(V::String(b.to_string())),
        _ => None,
    };
    let Some(value) = coerced else {
        issues.error(
            disp,
            Some(show(v)),
            format!("must be {} ({})", info.kind.name(), info.allowed),
        );
        return None;
    };
    if mode == Mode::Lenient && info.zero_is_unset {
        match &value {
            V::Integer(0) => return None,
            V::String(s) if s.is_empty() => return None,
            _ => {}
        }
    }
    Some(value)
}

/// Walks a parsed document against the schema. Unknown keys and wrongly typed values are reported (with
/// full key paths) and left out of the returned table, which then deserializes without error.
pub(crate) fn walk(root: &toml::Table, mode: Mode, issues: &mut Issues) -> toml::Table {
    walk_table(root, "", "", mode, issues)
}

fn walk_table(
    tbl: &toml::Table,
    sprefix: &str,
    dprefix: &str,
    mode: Mode,
    issues: &mut Issues,
) -> toml::Table {
    let mut out = toml::Table::new();
    for (key, v) in tbl {
        let spath = join(sprefix, key);
        let dpath = join(dprefix, key);
        if let Some(info) = key_info(&spath) {
            if let Some(kept) = check_leaf(info, v, &dpath, mode, issues) {
                out.insert(key.clone(), kept);
            }
        } else if has_children(&spath, "[].") {
            let array_spath = format!("{spath}[]");
            match v {
                toml::Value::Array(items) => {
                    let mut kept = Vec::with_capacity(items.len());
                    for (i, item) in items.iter().enumerate() {
                        let idisp = format!("{dpath}[{i}]");
                        match item {
                            toml::Value::Table(t) => kept.push(toml::Value::Table(walk_table(
                                t,
                                &array_spath,
                                &idisp,
                                mode,
                                issues,
                            ))),
                            other => issues.error(idisp, Some(show(other)), "must be a table"),
                        }
                    }
                    out.insert(key.clone(), toml::Value::Array(kept));
                }
                other => issues.error(dpath, Some(show(other)), "must be an array of tables"),
            }
        } else if has_children(&spath, ".") {
            match v {
                toml::Value::Table(t) => {
                    out.insert(
                        key.clone(),
                        toml::Value::Table(walk_table(t, &spath, &dpath, mode, issues)),
                    );
                }
                other => issues.error(dpath, Some(show(other)), "must be a table"),
            }
        } else {
            issues.strict(
                mode,
                dpath,
                Some(show(v)),
                unknown_message(sprefix, key, &spath),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_unique_and_tables_consistent() {
        let keys = schema();
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a.path, b.path, "duplicate schema key");
                // A leaf may not also be a table prefix.
                assert!(
                    !b.path.starts_with(&format!("{}.", a.path)),
                    "{} is both leaf and table",
                    a.path
                );
            }
        }
        assert!(has_children("transport", "."));
        assert!(has_children("socks5", "[]."));
        assert!(!has_children("socks5", "."));
    }

    #[test]
    fn unknown_key_hints() {
        assert!(
            unknown_message("transport.kcp", "mtuu", "transport.kcp.mtuu")
                .contains("did you mean `transport.kcp.mtu`")
        );
        assert!(unknown_message("", "zzzzzzzz", "zzzzzzzz")
            .contains("known keys at top level: role, log"));
        assert!(unknown_message("transport", "tcpbuf", "transport.tcpbuf").contains("alpha.21"));
    }
}
