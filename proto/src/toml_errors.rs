//! Errors in a TOML file an admin or a maintainer writes (a site policy, a repository's
//! `.github/testbot.toml`), placed at their line and column, with a suggestion for a misspelt
//! key or value.

use std::fmt;
use std::ops::Range;

use toml::Spanned;

use toml::de::{DeTable, DeValue};

/// What is wrong with a TOML file, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileError {
    /// 1-based line and column of the offending key or value, when the error has a place.
    pub position: Option<(usize, usize)>,
    pub message: String,
}

impl fmt::Display for FileError {
    /// `LINE:COL: message`, or only the message when it has no place in the file.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{line}:{col}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for FileError {}

impl FileError {
    /// A TOML syntax or type error, with a suggestion added to unknown keys and values.
    pub fn from_toml(text: &str, err: &toml::de::Error) -> FileError {
        FileError {
            position: err.span().map(|span| line_col(text, span.start)),
            message: with_suggestion(err.message().trim_end()),
        }
    }

    /// A semantic error about the value at `path` (dotted keys, array indexes as numbers:
    /// `rules.1.refs.0`). The error is placed at the deepest part of the path the file has.
    pub fn at_path(text: &str, path: &str, message: String) -> FileError {
        FileError {
            position: span_of_path(text, path).map(|span| line_col(text, span.start)),
            message,
        }
    }
}

/// Where the value at `path` is written in `text`. Parts of the path the file leaves out (a key
/// that took its default) place the error at the nearest table that is written.
fn span_of_path(text: &str, path: &str) -> Option<Range<usize>> {
    let doc = DeTable::parse(text).ok()?;
    let span = doc.span();
    let root = Spanned::new(span.clone(), DeValue::Table(doc.into_inner()));
    let mut current = &root;
    let mut best = None;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let next = match part.parse::<usize>() {
            Ok(index) if current.get_ref().as_array().is_some() => current.get_ref().get(index),
            _ => current.get_ref().get(part),
        };
        match next {
            Some(value) => {
                current = value;
                best = Some(value.span());
            }
            None => break,
        }
    }
    best
}

/// Adds `; did you mean `X`?` to serde's "unknown field/variant `Y`, expected ..." messages
/// when one of the expected names is close to what was written.
fn with_suggestion(message: &str) -> String {
    let Some((got, expected)) = unknown_and_expected(message) else {
        return message.to_string();
    };
    match closest(got, expected.iter().map(String::as_str)) {
        Some(best) => format!("{message}; did you mean `{best}`?"),
        None => message.to_string(),
    }
}

/// From "unknown field `max_cpu`, expected one of `max_cpus`, `max_gpus`" (or "expected `a` or
/// `b`", or "unknown variant ..."), the name written and the names expected.
fn unknown_and_expected(message: &str) -> Option<(&str, Vec<String>)> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (got, rest) = rest.split_once('`')?;
    let (_, expected) = rest.split_once("expected")?;
    let names = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((got, names))
}

/// The candidate closest to `got` by edit distance, if close enough to be a likely typo.
pub fn closest<'a>(got: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (got.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(got, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edit distance counting an insertion, a deletion, a substitution or a swap of two neighbours
/// as one edit (optimal string alignment), case-insensitive: `slrum` is one edit from `slurm`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.to_lowercase().chars().collect();
    let b: Vec<char> = b.to_lowercase().chars().collect();
    // d[i][j]: distance between the first i characters of a and the first j of b.
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// The 1-based line and column of byte `offset` in `text` (columns count characters).
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map_or(before.chars().count(), |nl| {
        before[nl + 1..].chars().count()
    }) + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_closest_expected_name() {
        assert_eq!(
            with_suggestion("unknown field `max_cpu`, expected one of `max_cpus`, `max_gpus`"),
            "unknown field `max_cpu`, expected one of `max_cpus`, `max_gpus`; did you mean `max_cpus`?"
        );
        assert_eq!(
            with_suggestion("unknown variant `slrum`, expected `slurm` or `shell`"),
            "unknown variant `slrum`, expected `slurm` or `shell`; did you mean `slurm`?"
        );
        assert_eq!(
            with_suggestion("unknown field `zzz`, expected `max_cpus`"),
            "unknown field `zzz`, expected `max_cpus`"
        );
        assert_eq!(with_suggestion("invalid type"), "invalid type");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("slrum", "slurm"), 1);
        assert_eq!(
            closest("pus", ["push", "pull_request"].into_iter()),
            Some("push")
        );
    }

    #[test]
    fn positions_are_one_based() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 6), (2, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 11), (2, 6));
        assert_eq!(line_col("x", 0), (1, 1));
    }
}
