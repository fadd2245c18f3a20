//! Values from the environment: `${VAR}` and `${VAR:-default}` inside
//! double-quoted TOML strings, so one file serves every pod of a
//! Deployment (the pod's name and IP come from the downward API as
//! variables). Single-quoted (literal) strings are never interpolated, and
//! `$${` writes a literal `${`.
//!
//! The substitution is made in the text, escaped for the string it lands
//! in, so line and column numbers of every later error stay those of the
//! file. A variable that is not set and has no default is an error naming
//! the key that uses it and the variable.
//!
//! Secrets can come from files instead (`secret_file`, see
//! [`resolve_files`]), so they need not sit in the environment.

use super::validate::ConfigError;
use super::Config;

/// What an unset variable is replaced with until its key is found: a
/// string no one writes in a config file.
const UNSET: &str = "\u{1}herdgate-unset:";

/// Interpolate `text` with `lookup` (the process environment in
/// production). `Err` lists every unset variable by key.
pub fn interpolate(
    text: &str,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<ConfigError>> {
    if !text.contains("${") {
        return Ok(text.to_string());
    }
    let mut out = String::with_capacity(text.len());
    let mut unset = false;
    let bytes = text.as_bytes();
    let mut state = State::Code;
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        match state {
            State::Code => {
                if rest.starts_with("\"\"\"") {
                    state = State::Basic { multi: true };
                    out.push_str("\"\"\"");
                    i += 3;
                    continue;
                } else if rest.starts_with("'''") {
                    state = State::Literal { multi: true };
                    out.push_str("'''");
                    i += 3;
                    continue;
                } else if rest.starts_with('"') {
                    state = State::Basic { multi: false };
                } else if rest.starts_with('\'') {
                    state = State::Literal { multi: false };
                } else if rest.starts_with('#') {
                    state = State::Comment;
                }
            }
            State::Comment => {
                if rest.starts_with('\n') {
                    state = State::Code;
                }
            }
            State::Literal { multi } => {
                if multi && rest.starts_with("'''") {
                    state = State::Code;
                    out.push_str("'''");
                    i += 3;
                    continue;
                }
                if !multi && (rest.starts_with('\'') || rest.starts_with('\n')) {
                    state = State::Code;
                }
            }
            State::Basic { multi } => {
                if let Some(escaped) = rest.strip_prefix('\\') {
                    // An escape: copy it and the escaped character whole.
                    let n = 1 + escaped.chars().next().map_or(0, char::len_utf8);
                    out.push_str(&rest[..n]);
                    i += n;
                    continue;
                }
                if multi && rest.starts_with("\"\"\"") {
                    state = State::Code;
                    out.push_str("\"\"\"");
                    i += 3;
                    continue;
                }
                if !multi && (rest.starts_with('"') || rest.starts_with('\n')) {
                    state = State::Code;
                } else if rest.starts_with("$${") {
                    out.push_str("${");
                    i += 3;
                    continue;
                } else if rest.starts_with("${") {
                    // The closing brace, within this string's line: never
                    // past a quote, an escape or a newline.
                    let end = rest
                        .find(['}', '"', '\\', '\n'])
                        .filter(|&i| rest.as_bytes()[i] == b'}');
                    if let Some(end) = end {
                        let inner = &rest[2..end];
                        let (name, default) = match inner.split_once(":-") {
                            Some((n, d)) => (n, Some(d)),
                            None => (inner, None),
                        };
                        if valid_name(name) {
                            // `:-` as in the shell: the default also
                            // stands for a variable set but empty.
                            let value = match (lookup(name), default) {
                                (Some(v), Some(d)) if v.is_empty() => Some(d.to_string()),
                                (Some(v), _) => Some(v),
                                (None, d) => d.map(String::from),
                            };
                            match value {
                                Some(v) => escape_into(&mut out, &v),
                                None => {
                                    unset = true;
                                    escape_into(&mut out, UNSET);
                                    out.push_str(name);
                                    escape_into(&mut out, "\u{1}");
                                }
                            }
                            i += end + 1;
                            continue;
                        }
                    }
                }
            }
        }
        let c = rest.chars().next().expect("not at the end");
        out.push(c);
        i += c.len_utf8();
    }
    if !unset {
        return Ok(out);
    }
    // Name the keys: parse what was made and find the markers.
    let mut errors = Vec::new();
    match out.parse::<toml::Table>() {
        Ok(table) => find_unset(&toml::Value::Table(table), "", &mut errors),
        Err(_) => errors.push(ConfigError::new(
            "",
            "an environment variable used in the file is not set",
        )),
    }
    Err(errors)
}

#[derive(Clone, Copy)]
enum State {
    Code,
    Comment,
    Basic { multi: bool },
    Literal { multi: bool },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// `v` as the content of a TOML basic string.
fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
}

fn find_unset(v: &toml::Value, path: &str, errors: &mut Vec<ConfigError>) {
    match v {
        toml::Value::String(s) => {
            let mut rest = s.as_str();
            while let Some(at) = rest.find(UNSET) {
                let after = &rest[at + UNSET.len()..];
                let name = after.split('\u{1}').next().unwrap_or_default();
                errors.push(ConfigError::new(
                    path,
                    format!(
                        "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                    ),
                ));
                rest = &after[name.len()..];
            }
        }
        toml::Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                find_unset(v, &format!("{path}[{i}]"), errors);
            }
        }
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                find_unset(v, &p, errors);
            }
        }
        _ => {}
    }
}

/// Read every `secret_file` into its `secret` (one trailing newline
/// dropped). Setting both, or an unreadable file, is an error at the key.
pub fn resolve_files(c: &mut Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let mut read = |key: String, secret: &mut String, file: &Option<String>| {
        let Some(path) = file else { return };
        if !secret.is_empty() {
            errors.push(ConfigError::new(
                key,
                "set either secret or secret_file, not both",
            ));
            return;
        }
        match std::fs::read_to_string(path) {
            Ok(s) => {
                *secret = s
                    .strip_suffix('\n')
                    .map(|s| s.strip_suffix('\r').unwrap_or(s))
                    .unwrap_or(&s)
                    .to_string();
            }
            Err(e) => errors.push(ConfigError::new(key, format!("cannot read {path}: {e}"))),
        }
    };
    for (i, app) in c.apps.iter_mut().enumerate() {
        read(
            format!("apps[{i}].secret_file"),
            &mut app.secret,
            &app.secret_file,
        );
    }
    read(
        "cluster.secret_file".into(),
        &mut c.cluster.secret,
        &c.cluster.secret_file,
    );
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "POD_IP" => Some("10.1.2.3".into()),
            "QUOTED" => Some("a\"b\\c\nd".into()),
            _ => None,
        }
    }

    #[test]
    fn basic_strings_are_interpolated_literal_ones_and_comments_are_not() {
        let text = "# ${NOPE} in a comment\n[cluster]\nadvertise = \"${POD_IP}:7000\"\nnode_id = '${POD_IP}'\nsecret = \"${MISSING:-fallback} $${POD_IP}\"\n";
        let out = interpolate(text, env).unwrap();
        assert_eq!(
            out,
            "# ${NOPE} in a comment\n[cluster]\nadvertise = \"10.1.2.3:7000\"\nnode_id = '${POD_IP}'\nsecret = \"fallback ${POD_IP}\"\n"
        );
    }

    #[test]
    fn an_unclosed_placeholder_swallows_nothing() {
        let text = "a = \"${POD_IP:-x\"\n[b]\nc = \"${POD_IP}\"\n";
        let out = interpolate(text, env).unwrap();
        assert_eq!(out, "a = \"${POD_IP:-x\"\n[b]\nc = \"10.1.2.3\"\n");
    }

    #[test]
    fn values_are_escaped_and_lines_stay_where_they_were() {
        let out = interpolate("a = \"${QUOTED}\"\nb = 1\n", env).unwrap();
        let t: toml::Table = out.parse().unwrap();
        assert_eq!(t["a"].as_str(), Some("a\"b\\c\nd"));
        assert_eq!(out.lines().count(), 2);
    }

    #[test]
    fn an_unset_variable_names_its_key_and_itself() {
        let text = "[[apps]]\nid = \"1\"\nkey = \"${APP_KEY}\"\nsecret = \"x\"\n[cluster]\nadvertise = \"${POD_IP}:1\"\n";
        let errors = interpolate(text, env).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].key, "apps[0].key");
        assert!(errors[0].message.contains("APP_KEY"), "{}", errors[0]);
    }
}
