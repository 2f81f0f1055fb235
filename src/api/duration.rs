//! Durations in specs: strings such as `"90s"`, `"1.5h"`, `"500ms"` or
//! `"1h30m"`, read as Kubernetes reads a `metav1.Duration` (Go's
//! `time.ParseDuration`), limited to the schema's pattern.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// The pattern every duration field is checked against by the API server:
/// one or more `<number><unit>` groups, the number with an optional
/// fraction, the unit one of Go's (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`).
/// No sign: no duration here may be negative.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|μs|ms|s|m|h))+$";

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
    #[error("{value:?} is not a duration such as \"90s\", \"1.5h\" or \"1h30m\"")]
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

    /// Reads the duration as Kubernetes reads a `metav1.Duration` (Go's
    /// `time.ParseDuration`: fractions, units from `ns` to `h`), limited to
    /// what the schema's pattern takes (no sign, no `.5s`); zero and
    /// malformed text are errors. Written here rather than with
    /// `kube::core::Duration`, whose parser panics on a number that
    /// overflows: nothing a user writes may panic the controller.
    pub fn parse(&self) -> Result<std::time::Duration, DurationError> {
        let malformed = || DurationError::Malformed { value: self.0.clone() };
        let nanos = parse_nanos(&self.0).ok_or_else(malformed)?;
        let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| malformed())?;
        let total = std::time::Duration::new(secs, (nanos % 1_000_000_000) as u32);
        if total.is_zero() {
            return Err(DurationError::Zero { value: self.0.clone() });
        }
        Ok(total)
    }
}

/// Nanoseconds in one of each unit [`DURATION_PATTERN`] allows.
const UNITS: [(&str, u128); 8] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
];

/// The nanoseconds `text` stands for, when it matches [`DURATION_PATTERN`]
/// and does not overflow; fraction digits below a nanosecond are dropped,
/// as Go drops them.
fn parse_nanos(text: &str) -> Option<u128> {
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let whole_len = digits(rest);
        if whole_len == 0 {
            return None;
        }
        let whole: u128 = rest[..whole_len].parse().ok()?;
        rest = &rest[whole_len..];
        let mut fraction = "";
        if let Some(after) = rest.strip_prefix('.') {
            let n = digits(after);
            if n == 0 {
                return None;
            }
            fraction = &after[..n];
            rest = &after[n..];
        }
        let (unit, scale) =
            UNITS.iter().filter(|(unit, _)| rest.starts_with(unit)).max_by_key(|(unit, _)| unit.len())?;
        rest = &rest[unit.len()..];
        let mut part = whole.checked_mul(*scale)?;
        // At most 19 fraction digits count: below a nanosecond of an hour.
        let kept = &fraction[..fraction.len().min(19)];
        if !kept.is_empty() {
            let numerator: u128 = kept.parse().ok()?;
            part = part.checked_add(numerator.checked_mul(*scale)? / 10u128.pow(kept.len() as u32))?;
        }
        total = total.checked_add(part)?;
    }
    Some(total)
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
    fn reads_what_kubernetes_reads() {
        assert_eq!(DurationString::from("1.5h").parse(), Ok(Duration::from_secs(5400)));
        assert_eq!(DurationString::from("500ms").parse(), Ok(Duration::from_millis(500)));
        assert_eq!(DurationString::from("2.5s").parse(), Ok(Duration::from_millis(2500)));
        assert_eq!(DurationString::from("1h0.5m").parse(), Ok(Duration::from_secs(3630)));
        assert_eq!(DurationString::from("1500us").parse(), Ok(Duration::from_micros(1500)));
        assert_eq!(DurationString::from("3µs").parse(), Ok(Duration::from_micros(3)));
        assert_eq!(DurationString::from("10ns").parse(), Ok(Duration::from_nanos(10)));
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
        for bad in ["", "90", "s", "1d", "-1s", "+1s", ".5s", "1.s", "1h ", " 1h", "1H", "99999999999999999999s"] {
            assert!(
                matches!(DurationString::from(bad).parse(), Err(DurationError::Malformed { .. })),
                "{bad:?} should be malformed"
            );
        }
        assert_eq!(DurationString::from("0s").parse(), Err(DurationError::Zero { value: "0s".into() }));
        assert_eq!(DurationString::from("0.0h").parse(), Err(DurationError::Zero { value: "0.0h".into() }));
    }

    proptest! {
        /// Whatever the text, parsing never panics, and it succeeds exactly
        /// when the schema's pattern accepts the text and the value is not zero.
        #[test]
        fn parse_agrees_with_the_schema_pattern(text in "[0-9a-z.µ]{0,8}") {
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

    /// [`DURATION_PATTERN`] as the API server applies it (a real regex
    /// engine), so the property test compares the parser with the pattern
    /// itself, not with a second hand-written matcher.
    fn regex_lite(text: &str) -> bool {
        regex::Regex::new(DURATION_PATTERN).expect("the pattern compiles").is_match(text)
    }
}
