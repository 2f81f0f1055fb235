//! Durations in specs: strings such as `"90s"`, `"5m"` or `"1h30m"`.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern every duration field is checked against by the API server:
/// one or more `<number><unit>` groups with units `ms`, `s`, `m` or `h`.
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";

/// A duration written as a string, e.g. `"90s"`, `"5m"`, `"1h30m"`.
///
/// The schema restricts it to [`DURATION_PATTERN`]; any string still
/// deserializes, so one odd object never breaks a watch, and
/// [`DurationString::parse`] reports what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DurationString(pub String);

/// Why a duration string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    /// The text does not have the `<number><unit>` form.
    #[error("{value:?} is not a duration such as \"90s\", \"5m\" or \"1h30m\"")]
    Malformed {
        /// The rejected text.
        value: String,
    },
    /// The text is well formed but adds up to zero.
    #[error("{value:?} must be longer than zero")]
    Zero {
        /// The rejected text.
        value: String,
    },
}

impl DurationString {
    /// Wraps a duration string without checking it.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The text as written in the spec.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Reads the duration; zero and malformed text are errors.
    pub fn parse(&self) -> Result<std::time::Duration, DurationError> {
        let malformed = || DurationError::Malformed { value: self.0.clone() };
        let mut total = std::time::Duration::ZERO;
        let mut rest = self.0.as_str();
        if rest.is_empty() {
            return Err(malformed());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(malformed());
            }
            let number: u64 = rest[..digits].parse().map_err(|_| malformed())?;
            rest = &rest[digits..];
            let (unit_len, unit) = if rest.starts_with("ms") {
                (2, std::time::Duration::from_millis(1))
            } else if rest.starts_with('s') {
                (1, std::time::Duration::from_secs(1))
            } else if rest.starts_with('m') {
                (1, std::time::Duration::from_secs(60))
            } else if rest.starts_with('h') {
                (1, std::time::Duration::from_secs(3600))
            } else {
                return Err(malformed());
            };
            rest = &rest[unit_len..];
            let part = u32::try_from(number).ok().and_then(|n| unit.checked_mul(n)).ok_or_else(malformed)?;
            total = total.checked_add(part).ok_or_else(malformed)?;
        }
        if total.is_zero() {
            return Err(DurationError::Zero { value: self.0.clone() });
        }
        Ok(total)
    }
}

/// The longest duration a flag takes: a year (a longer one would overflow
/// the clock arithmetic it feeds, and means "never" in practice).
pub const MAX_FLAG: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// Reads a duration given on the command line: the same syntax as in specs,
/// zero (`0` or `0s`) is allowed, and at most [`MAX_FLAG`].
pub fn parse_flag(text: &str) -> Result<std::time::Duration, String> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    match DurationString::from(text).parse() {
        Ok(d) if d > MAX_FLAG => Err(format!("{text:?} is longer than a year (8760h)")),
        Ok(d) => Ok(d),
        Err(DurationError::Zero { .. }) => Ok(std::time::Duration::ZERO),
        Err(e) => Err(e.to_string()),
    }
}

impl fmt::Display for DurationString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for DurationString {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

impl JsonSchema for DurationString {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }

    fn inline_schema() -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    #[test]
    fn reads_single_and_compound_units() {
        assert_eq!(DurationString::from("90s").parse(), Ok(Duration::from_secs(90)));
        assert_eq!(DurationString::from("1h").parse(), Ok(Duration::from_secs(3600)));
        assert_eq!(DurationString::from("1h30m").parse(), Ok(Duration::from_secs(5400)));
        assert_eq!(DurationString::from("250ms").parse(), Ok(Duration::from_millis(250)));
        assert_eq!(DurationString::from("1m1s1ms").parse(), Ok(Duration::from_millis(61_001)));
    }

    #[test]
    fn flags_are_at_most_a_year() {
        assert_eq!(parse_flag("8760h"), Ok(MAX_FLAG));
        let err = parse_flag("8760h1s").expect_err("too long");
        assert!(err.contains("longer than a year"), "{err}");
        assert!(parse_flag("4294967295h4294967295h").is_err());
    }

    #[test]
    fn flags_allow_zero() {
        assert_eq!(parse_flag("0"), Ok(Duration::ZERO));
        assert_eq!(parse_flag("0ms"), Ok(Duration::ZERO));
        assert_eq!(parse_flag("150ms"), Ok(Duration::from_millis(150)));
        assert!(parse_flag("fast").is_err());
    }

    #[test]
    fn rejects_malformed_and_zero() {
        for bad in ["", "90", "s", "1d", "1.5h", "-1s", "1h ", " 1h", "1H", "99999999999999999999s"] {
            assert!(
                matches!(DurationString::from(bad).parse(), Err(DurationError::Malformed { .. })),
                "{bad:?} should be malformed"
            );
        }
        assert_eq!(DurationString::from("0s").parse(), Err(DurationError::Zero { value: "0s".into() }));
    }

    proptest! {
        /// Whatever the text, parsing never panics, and it succeeds exactly
        /// when the schema's pattern accepts the text and the value is not zero.
        #[test]
        fn parse_agrees_with_the_schema_pattern(text in "[0-9a-z]{0,8}") {
            let pattern = regex_lite(&text);
            match DurationString::from(text.as_str()).parse() {
                Ok(d) => { prop_assert!(pattern); prop_assert!(!d.is_zero()); }
                Err(DurationError::Zero { .. }) => prop_assert!(pattern),
                Err(DurationError::Malformed { .. }) => prop_assert!(!pattern),
            }
        }

        #[test]
        fn formatted_seconds_round_trip(secs in 1u32..1_000_000) {
            let text = format!("{}h{}m{}s", secs / 3600, secs % 3600 / 60, secs % 60);
            prop_assert_eq!(DurationString::from(text.as_str()).parse(), Ok(Duration::from_secs(u64::from(secs))));
        }
    }

    /// A hand-written matcher for [`DURATION_PATTERN`], so the property test
    /// compares the parser with the pattern's meaning, not with itself.
    fn regex_lite(text: &str) -> bool {
        let mut rest = text;
        if rest.is_empty() {
            return false;
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return false;
            }
            rest = &rest[digits..];
            if let Some(r) = rest.strip_prefix("ms") {
                rest = r;
            } else if let Some(r) = rest.strip_prefix(['s', 'm', 'h']) {
                rest = r;
            } else {
                return false;
            }
        }
        true
    }
}
