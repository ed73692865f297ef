//! Secret job variables: the names in [`JobSpec::secret_env`], whose values the broker never
//! shows (it answers with [`MASK`]) and the agent masks in every log line it ships.
//!
//! Masking is a guard against accidents (a script that echoes its token, a tool that prints its
//! configuration), not a barrier against the job's own script: a script that has the value can
//! always print it in a form no masker recognises (split, reversed, encoded). What can be
//! promised is that the value as given, and each line of a value of several lines, never
//! reaches a stored log, an API answer or the Kubernetes pod spec.

use std::borrow::Cow;

use crate::jobs::JobSpec;

/// What a secret value is replaced with.
pub const MASK: &str = "***";

/// The fewest characters a secret value (each line of it, for a value of several lines) may
/// have. A shorter value would mask ordinary output (every `1`, every `yes`) and would hide
/// little anyway, so it is refused when the job is submitted rather than left unmasked.
pub const MIN_SECRET_CHARS: usize = 4;

/// Checks `secret_env`: each name is a key of `env`, named once, with a value long enough to
/// be masked.
pub fn validate_secret_env(spec: &JobSpec) -> Result<(), String> {
    for (i, name) in spec.secret_env.iter().enumerate() {
        if spec.secret_env[..i].contains(name) {
            return Err(format!("secret_env names {name} twice"));
        }
        let Some(value) = spec.env.get(name) else {
            return Err(format!(
                "secret_env names {name}, which is not in env: set env.{name} to the secret value"
            ));
        };
        let short = value
            .lines()
            .map(|line| line.trim_end_matches('\r'))
            .any(|line| !line.is_empty() && line.chars().count() < MIN_SECRET_CHARS);
        if value.is_empty() || short {
            return Err(format!(
                "env.{name} is secret but shorter than {MIN_SECRET_CHARS} characters (or has a \
                 line that is): so short a value cannot be masked in the log without hiding \
                 ordinary output; use a longer secret, or pass it as a plain variable"
            ));
        }
    }
    Ok(())
}

impl JobSpec {
    /// The spec as the broker shows it: each secret variable's value replaced by [`MASK`].
    pub fn masked(&self) -> JobSpec {
        let mut spec = self.clone();
        for name in &self.secret_env {
            if let Some(value) = spec.env.get_mut(name) {
                *value = MASK.to_string();
            }
        }
        spec
    }

    /// The secret variables' values (name, value).
    pub fn secret_values(&self) -> impl Iterator<Item = (&str, &str)> {
        self.secret_env.iter().filter_map(|name| {
            self.env
                .get(name)
                .map(|value| (name.as_str(), value.as_str()))
        })
    }

    /// A masker for this job's secret values.
    pub fn masker(&self) -> Masker {
        Masker::new(self.secret_values().map(|(_, value)| value))
    }
}

/// Replaces secret values in text, one line at a time.
#[derive(Clone, Default)]
pub struct Masker {
    /// What to look for, longest first, so a secret that contains another is masked whole.
    needles: Vec<String>,
}

impl std::fmt::Debug for Masker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Masker")
            .field("secrets", &self.needles.len())
            .finish()
    }
}

impl Masker {
    /// A masker for `values`. A value of several lines is looked for line by line (each log line
    /// holds one line of output); lines shorter than [`MIN_SECRET_CHARS`] are not looked for.
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Masker {
        let mut needles: Vec<String> = values
            .into_iter()
            .flat_map(|value| value.split('\n'))
            .map(|line| line.trim_end_matches('\r'))
            .filter(|line| line.chars().count() >= MIN_SECRET_CHARS)
            .map(str::to_string)
            .collect();
        needles.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        needles.dedup();
        Masker { needles }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.needles.is_empty()
    }

    /// A piece of a line too long to ship whole, masked: besides whole values, the start of a
    /// value at its end (when the line goes on in the next piece) and the end of a value at its
    /// start (when it continues the previous piece), so a value cut in two shows in neither.
    /// This may mask a few characters that only look like the start or end of a value.
    pub fn mask_piece(&self, text: &str, continues: bool, goes_on: bool) -> String {
        let mut text = self.mask(text).into_owned();
        if continues
            && let Some(len) = self
                .needles
                .iter()
                .filter_map(|needle| {
                    needle
                        .char_indices()
                        .skip(1)
                        .map(|(i, _)| &needle[i..])
                        .find(|suffix| text.starts_with(suffix))
                        .map(str::len)
                })
                .max()
        {
            text.replace_range(..len, MASK);
        }
        if goes_on
            && let Some(len) = self
                .needles
                .iter()
                .filter_map(|needle| {
                    needle
                        .char_indices()
                        .skip(1)
                        .map(|(i, _)| &needle[..i])
                        .filter(|prefix| text.ends_with(prefix))
                        .map(str::len)
                        .max()
                })
                .max()
        {
            let start = text.len() - len;
            text.replace_range(start.., MASK);
        }
        text
    }

    /// `text` with every occurrence of a secret value replaced by [`MASK`].
    pub fn mask<'t>(&self, text: &'t str) -> Cow<'t, str> {
        let mut text = Cow::Borrowed(text);
        for needle in &self.needles {
            if text.contains(needle.as_str()) {
                text = Cow::Owned(text.replace(needle.as_str(), MASK));
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(env: &[(&str, &str)], secret: &[&str]) -> JobSpec {
        JobSpec {
            script: "true".into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secret_env: secret.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn secret_names_must_be_set_once_with_a_maskable_value() {
        assert_eq!(spec(&[("TOKEN", "s3cr3t")], &["TOKEN"]).validate(), Ok(()));
        let err = spec(&[], &["TOKEN"]).validate().unwrap_err();
        assert!(
            err.contains("secret_env names TOKEN, which is not in env"),
            "{err}"
        );
        let err = spec(&[("TOKEN", "s3cr3t")], &["TOKEN", "TOKEN"])
            .validate()
            .unwrap_err();
        assert!(err.contains("twice"), "{err}");
        for short in ["", "abc", "long enough\nab"] {
            let err = spec(&[("PIN", short)], &["PIN"]).validate().unwrap_err();
            assert!(
                err.contains("env.PIN is secret but shorter than 4"),
                "{err}"
            );
        }
        // A plain variable may be as short as it likes.
        assert_eq!(spec(&[("N", "1")], &[]).validate(), Ok(()));
    }

    #[test]
    fn the_masked_spec_keeps_plain_values_and_hides_secret_ones() {
        let spec = spec(&[("TOKEN", "s3cr3t"), ("WHO", "world")], &["TOKEN"]);
        let masked = spec.masked();
        assert_eq!(masked.env["TOKEN"], MASK);
        assert_eq!(masked.env["WHO"], "world");
        assert_eq!(masked.secret_env, ["TOKEN"]);
    }

    #[test]
    fn every_occurrence_of_every_line_of_a_secret_is_masked() {
        let masker = Masker::new([
            "hunter22",
            "-----BEGIN KEY-----\r\nAAAAbbbb\n-----END KEY-----\n",
            "hunter2222",
        ]);
        assert_eq!(
            masker.mask("pw=hunter22 again hunter22"),
            "pw=*** again ***"
        );
        // The longer secret is masked whole, not as the shorter one plus a tail.
        assert_eq!(masker.mask("hunter2222"), "***");
        assert_eq!(masker.mask("key: AAAAbbbb;"), "key: ***;");
        assert_eq!(masker.mask("-----END KEY-----"), "***");
        assert!(matches!(masker.mask("nothing here"), Cow::Borrowed(_)));
        assert!(Masker::new(["abc"]).is_empty());
    }

    #[test]
    fn a_value_cut_between_two_pieces_of_a_long_line_shows_in_neither() {
        let masker = Masker::new(["hunter22"]);
        assert_eq!(masker.mask_piece("xxxxhunt", false, true), "xxxx***");
        assert_eq!(
            masker.mask_piece("er22 and hunter22", true, false),
            "*** and ***"
        );
        // Only a piece's edges are looked at, and only on the sides where the line was cut.
        assert_eq!(masker.mask_piece("er22 hunt", false, false), "er22 hunt");
        assert_eq!(masker.mask_piece("nothing", true, true), "nothing");
    }
}
