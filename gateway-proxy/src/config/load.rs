//! Reading a config file: `${ENV}` interpolation, YAML, and errors that say where.

use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer};

use gateway_core::registry::Registry;

use super::schema::{Config, REGISTRY};

/// A config that cannot be used: the file, line and column, the key path
/// (`routes[2].match.path`), and what is wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    file: String,
    at: Option<(usize, usize)>,
    path: String,
    message: String,
}

/// A value and where the file has it, for the checks that come after parsing (a route's
/// upstream that is not defined is an error at the route's `upstream` key).
#[derive(Debug, Clone)]
pub struct Located<T> {
    /// The value.
    pub value: T,
    line: usize,
    column: usize,
}

// === impl ConfigError ===

impl ConfigError {
    /// An error at `path`, found at `at` (line and column, from 1).
    pub(crate) fn new(
        file: &str,
        at: Option<(usize, usize)>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            file: file.to_owned(),
            at,
            path: path.into(),
            message: message.into(),
        }
    }

    /// An error at a located value.
    pub(crate) fn at<T>(
        file: &str,
        value: &Located<T>,
        path: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::new(file, Some((value.line, value.column)), path, message)
    }

    /// The line and column (from 1), where known.
    pub const fn location(&self) -> Option<(usize, usize)> {
        self.at
    }

    /// The key path, like `routes[2].plugins[0].cors.origins` (empty for the whole file).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some((line, column)) = self.at {
            write!(f, ":{line}:{column}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

// === impl Located ===

impl<T> Located<T> {
    /// Where the value is in its file (line and column, from 1), if it came from one.
    pub const fn location(&self) -> Option<(usize, usize)> {
        if self.line == 0 {
            None
        } else {
            Some((self.line, self.column))
        }
    }

    /// A value with no place in a file (built in code, or from flags).
    pub const fn new(value: T) -> Self {
        Self {
            value,
            line: 0,
            column: 0,
        }
    }
}

impl<T: PartialEq> PartialEq for Located<T> {
    fn eq(&self, other: &Self) -> bool {
        self.value == other.value
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Located<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let spanned = serde_saphyr::Spanned::<T>::deserialize(deserializer)?;
        Ok(Self {
            value: spanned.value,
            line: spanned.referenced.line() as usize,
            column: spanned.referenced.column() as usize,
        })
    }
}

// === loading ===

/// Reads and parses the config file at `path`, with `${VAR}` from the environment and
/// route plugins from `registry`.
///
/// # Errors
///
/// When the file cannot be read, a `${VAR}` it names is not set, or it is not a valid
/// config (YAML syntax, unknown keys, wrong types, bad durations or sizes, a plugin that is
/// not registered or whose section its factory refuses).
pub fn read(path: &Path, registry: &Registry) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&file, None, "", format!("cannot read it: {e}")))?;
    parse(&file, &text, |name| std::env::var(name).ok(), registry)
}

/// Parses `text` (from `file`, named in errors), with `${VAR}` looked up by `env` and
/// route plugins from `registry`.
///
/// # Errors
///
/// As [`read`].
pub fn parse(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
    registry: &Registry,
) -> Result<Config, ConfigError> {
    let text = interpolate(file, text, env)?;
    // Plugin sections are read by the factory their name selects, which serde's derive
    // cannot be handed: it is lent for the parse (and the previous one put back, should
    // a factory parse a config of its own).
    let previous = REGISTRY.replace(registry.clone());
    let _restore = Restore(Some(previous));
    let mut path = String::new();
    let parsed = serde_saphyr::with_deserializer_from_str(&text, |de| {
        serde_path_to_error::deserialize::<_, Config>(de).map_err(|err| {
            path = err.path().to_string();
            err.into_inner()
        })
    });
    parsed.map_err(|err| {
        let (message, at) = split_location(&err.without_snippet().to_string());
        let at = at.or_else(|| {
            err.location()
                .map(|l| (l.line() as usize, l.column() as usize))
        });
        // serde_path_to_error says `.` for the root, and `?` for a key it did not get to
        // read (a syntax error inside a map).
        let path = without_located(path.trim_end_matches('?').trim_end_matches('.'));
        ConfigError::new(file, at, path, message)
    })
}

/// A key path without the `value` step a [`Located`] adds (it reads as a struct): after a
/// route (`routes[0].value.match` is `routes[0].match`), a plugin entry
/// (`plugins[0].value.cors` is `plugins[0].cors`) and a route's `upstream`.
fn without_located(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut steps = path.split('.').peekable();
    while let Some(step) = steps.next() {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(step);
        let located = step == "upstream"
            || ((step.starts_with("plugins[") || step.starts_with("routes["))
                && step.ends_with(']'));
        if located && steps.peek() == Some(&"value") {
            steps.next();
        }
    }
    out
}

/// Puts the previous registry back when a parse ends, panicking or not.
struct Restore(Option<Registry>);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(previous) = self.0.take() {
            REGISTRY.set(previous);
        }
    }
}

/// Replaces `${NAME}` with the variable's value (`${NAME:-default}` when it is unset or
/// empty); `$$` is a literal `$`. Values go in as they are, so quote the YAML scalar they
/// stand in when they may hold `:` or `#`; a value with a line break is refused (it would
/// change the file's structure and every line number after it).
fn interpolate(
    file: &str,
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (index, whole) in text.split_inclusive('\n').enumerate() {
        // A comment is left as it is: it may well show a `${VAR}`.
        let (line, comment) = whole.split_at(comment_start(whole));
        let mut rest = line;
        while let Some(at) = rest.find('$') {
            out.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            if let Some(after) = after.strip_prefix('$') {
                out.push('$');
                rest = after;
                continue;
            }
            let Some(body) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let column = line.len() - rest.len() + at + 1;
            let err =
                |message: String| ConfigError::new(file, Some((index + 1, column)), "", message);
            let end = body
                .find('}')
                .ok_or_else(|| err("`${` without its closing `}`".to_owned()))?;
            let (name, default) = match body[..end].split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (&body[..end], None),
            };
            let valid =
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid {
                return Err(err(format!(
                    "`${{{}}}` is not a variable name",
                    &body[..end]
                )));
            }
            let value = match (env(name).filter(|v| !v.is_empty()), default) {
                (Some(value), _) => value,
                (None, Some(default)) => default.to_owned(),
                (None, None) => {
                    return Err(err(format!("the environment variable `{name}` is not set")));
                }
            };
            if value.contains(['\n', '\r']) {
                return Err(err(format!(
                    "the environment variable `{name}` holds a line break"
                )));
            }
            out.push_str(&value);
            rest = &body[end + 1..];
        }
        out.push_str(rest);
        out.push_str(comment);
    }
    Ok(out)
}

/// Where the comment of a YAML line starts (its length when it has none): a `#` at the
/// start or after a space, outside quotes. (A quoted scalar that spans lines is not
/// followed; such a line is taken as it is.)
fn comment_start(line: &str) -> usize {
    let mut quote = None;
    let mut previous = b' ';
    let mut escaped = false;
    for (i, b) in line.bytes().enumerate() {
        match quote {
            Some(b'"') if escaped => escaped = false,
            Some(b'"') if b == b'\\' => escaped = true,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'#' && previous.is_ascii_whitespace() => return i,
            None if (b == b'"' || b == b'\'')
                && (previous.is_ascii_whitespace() || b"[{:,".contains(&previous)) =>
            {
                quote = Some(b);
            }
            None => {}
        }
        previous = b;
    }
    line.len()
}

/// Splits serde-saphyr's ` at line N, column M` suffixes off a message: the first one is the
/// innermost place (a nested error's text carries its own place before the outer one's).
fn split_location(text: &str) -> (String, Option<(usize, usize)>) {
    const MARK: &str = " at line ";
    let Some(start) = text.find(MARK) else {
        return (text.to_owned(), None);
    };
    let at = text[start + MARK.len()..]
        .split_once(", column ")
        .and_then(|(line, rest)| {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            Some((line.parse().ok()?, rest[..digits].parse().ok()?))
        });
    (text[..start].to_owned(), at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("example.com".into()),
            "EMPTY" => Some(String::new()),
            "TWO_LINES" => Some("a\nb".into()),
            _ => None,
        }
    }

    #[test]
    fn variables_are_replaced_outside_comments() {
        let text = "a: ${HOST} # see ${NOT_SET}\nb: '#${HOST}' # ${X}\nc: ${EMPTY:-d}$$${HOST:-x}\n# ${Y}\n";
        assert_eq!(
            interpolate("f", text, env).unwrap(),
            "a: example.com # see ${NOT_SET}\nb: '#example.com' # ${X}\nc: d$example.com\n# ${Y}\n"
        );
    }

    #[test]
    fn a_bad_reference_is_an_error_where_it_is() {
        for (text, at, says) in [
            ("a: x\nb: ${NOT_SET}\n", (2, 4), "is not set"),
            ("a: ${HOST\n", (1, 4), "closing"),
            ("a: ${HO ST}\n", (1, 4), "not a variable name"),
            ("a: ${TWO_LINES}\n", (1, 4), "line break"),
        ] {
            let err = interpolate("f", text, env).unwrap_err();
            assert_eq!(err.location(), Some(at), "{text}: {err}");
            assert!(err.message().contains(says), "{text}: {err}");
        }
    }
}
