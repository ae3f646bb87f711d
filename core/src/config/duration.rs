//! Duration attributes as SafeKit 8.2.5+ reads them.
//!
//! A bare number keeps the attribute's historical unit (`pulse="700"` is 700 ms,
//! `loop_interval="24"` is 24 h); a number with a unit suffix (`d h m s ms us`)
//! means what it says. A value shorter than one historical unit would round to 0
//! in SafeKit and is rejected (e.g. `500ms` where seconds are expected), and so
//! is 0 where 0 makes no sense.

use std::time::Duration;

/// The units a duration attribute may be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    Microseconds,
    Milliseconds,
    Seconds,
    Minutes,
    Hours,
    Days,
}

impl TimeUnit {
    /// Every unit, largest first (the order [`format_duration`] tries them in).
    pub const ALL: [TimeUnit; 6] = [
        TimeUnit::Days,
        TimeUnit::Hours,
        TimeUnit::Minutes,
        TimeUnit::Seconds,
        TimeUnit::Milliseconds,
        TimeUnit::Microseconds,
    ];

    /// The suffix written after a number (`ms`).
    pub fn suffix(self) -> &'static str {
        match self {
            TimeUnit::Microseconds => "us",
            TimeUnit::Milliseconds => "ms",
            TimeUnit::Seconds => "s",
            TimeUnit::Minutes => "m",
            TimeUnit::Hours => "h",
            TimeUnit::Days => "d",
        }
    }

    /// The length of one unit.
    pub fn one(self) -> Duration {
        match self {
            TimeUnit::Microseconds => Duration::from_micros(1),
            TimeUnit::Milliseconds => Duration::from_millis(1),
            TimeUnit::Seconds => Duration::from_secs(1),
            TimeUnit::Minutes => Duration::from_secs(60),
            TimeUnit::Hours => Duration::from_secs(3600),
            TimeUnit::Days => Duration::from_secs(86_400),
        }
    }

    /// The unit's name in messages.
    pub fn name(self) -> &'static str {
        match self {
            TimeUnit::Microseconds => "microsecond",
            TimeUnit::Milliseconds => "millisecond",
            TimeUnit::Seconds => "second",
            TimeUnit::Minutes => "minute",
            TimeUnit::Hours => "hour",
            TimeUnit::Days => "day",
        }
    }

    fn from_suffix(suffix: &str) -> Option<TimeUnit> {
        TimeUnit::ALL
            .into_iter()
            .find(|unit| unit.suffix() == suffix)
    }
}

/// Why a duration attribute was rejected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error(
        "`{0}` is not a duration: expected a whole number in {1}s, or a whole number followed by one of the units d h m s ms us (e.g. `700ms`, `30s`, `24h`)"
    )]
    Invalid(String, &'static str),
    #[error("`{0}` is shorter than one {1}, the unit of this attribute, and would round to 0")]
    RoundsToZero(String, &'static str),
    #[error("0 is not allowed here: expected a positive duration")]
    Zero,
    #[error("`{0}` is too large")]
    Overflow(String),
}

/// Parses `text` as a duration whose bare numbers are in `unit`.
///
/// # Errors
/// When `text` is not a whole number with an optional unit suffix, when it is
/// not 0 but shorter than one `unit`, or when it is 0 and `zero_allowed` is false.
pub fn parse_duration(
    text: &str,
    unit: TimeUnit,
    zero_allowed: bool,
) -> Result<Duration, DurationError> {
    let text = text.trim();
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(digits_end);
    if digits.is_empty() {
        return Err(DurationError::Invalid(text.to_owned(), unit.name()));
    }
    let written_unit = if suffix.is_empty() {
        unit
    } else {
        TimeUnit::from_suffix(suffix)
            .ok_or_else(|| DurationError::Invalid(text.to_owned(), unit.name()))?
    };
    let count: u32 = digits
        .parse()
        .map_err(|_| DurationError::Overflow(text.to_owned()))?;
    let duration = written_unit
        .one()
        .checked_mul(count)
        .ok_or_else(|| DurationError::Overflow(text.to_owned()))?;
    if duration.is_zero() {
        return if zero_allowed {
            Ok(duration)
        } else {
            Err(DurationError::Zero)
        };
    }
    if duration < unit.one() {
        return Err(DurationError::RoundsToZero(text.to_owned(), unit.name()));
    }
    Ok(duration)
}

/// Writes `duration` with the largest unit that represents it exactly
/// (`24h`, `30s`, `700ms`); 0 is written `0`.
///
/// Sub-microsecond parts (which [`parse_duration`] never produces) are dropped.
pub fn format_duration(duration: Duration) -> String {
    let micros = duration.as_micros();
    if micros == 0 {
        return "0".to_owned();
    }
    for unit in TimeUnit::ALL {
        let unit_micros = unit.one().as_micros();
        if micros.is_multiple_of(unit_micros) {
            return format!("{}{}", micros / unit_micros, unit.suffix());
        }
    }
    format!("{micros}us")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_numbers_use_the_historical_unit() {
        assert_eq!(
            parse_duration("700", TimeUnit::Milliseconds, false),
            Ok(Duration::from_millis(700))
        );
        assert_eq!(
            parse_duration("24", TimeUnit::Hours, true),
            Ok(Duration::from_secs(24 * 3600))
        );
        assert_eq!(
            parse_duration("10", TimeUnit::Seconds, false),
            Ok(Duration::from_secs(10))
        );
    }

    #[test]
    fn suffixes_override_the_historical_unit() {
        let cases = [
            ("2d", Duration::from_secs(2 * 86_400)),
            ("24h", Duration::from_secs(86_400)),
            ("5m", Duration::from_secs(300)),
            ("30s", Duration::from_secs(30)),
            ("700ms", Duration::from_millis(700)),
            ("1500us", Duration::from_micros(1500)),
        ];
        for (text, expected) in cases {
            assert_eq!(
                parse_duration(text, TimeUnit::Milliseconds, false),
                Ok(expected),
                "{text}"
            );
        }
        assert_eq!(
            parse_duration("30000ms", TimeUnit::Seconds, false),
            Ok(Duration::from_secs(30))
        );
    }

    #[test]
    fn values_below_one_unit_and_forbidden_zero_are_rejected() {
        assert_eq!(
            parse_duration("500ms", TimeUnit::Seconds, false),
            Err(DurationError::RoundsToZero("500ms".into(), "second"))
        );
        assert_eq!(
            parse_duration("30m", TimeUnit::Hours, true),
            Err(DurationError::RoundsToZero("30m".into(), "hour"))
        );
        assert_eq!(
            parse_duration("0", TimeUnit::Milliseconds, false),
            Err(DurationError::Zero)
        );
        assert_eq!(
            parse_duration("0s", TimeUnit::Hours, true),
            Ok(Duration::ZERO)
        );
    }

    #[test]
    fn malformed_values_are_rejected() {
        for text in ["", "ms", "-5", "1.5s", "10 s", "10sec", "3w", "abc"] {
            assert!(
                matches!(
                    parse_duration(text, TimeUnit::Seconds, true),
                    Err(DurationError::Invalid(..))
                ),
                "{text:?}"
            );
        }
        assert!(matches!(
            parse_duration("99999999999", TimeUnit::Seconds, true),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn formatting_uses_the_largest_exact_unit_and_parses_back() {
        let cases = [
            (Duration::ZERO, "0"),
            (Duration::from_millis(700), "700ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(86_400), "1d"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_micros(1500), "1500us"),
        ];
        for (duration, text) in cases {
            assert_eq!(format_duration(duration), text);
            assert_eq!(
                parse_duration(text, TimeUnit::Microseconds, true),
                Ok(duration)
            );
        }
    }
}
