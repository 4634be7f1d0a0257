//! Kuma-style durations: `500ms`, `30s`, `5m`, `24h`, `1d`, `10y`, and sums such as `1h30m`.
//!
//! Kuma takes Go durations plus the `d` and `y` units in a few places (CA expiry, dataplane
//! tokens); weft accepts the same spellings everywhere so a Kuma user's YAML parses unchanged.

use std::time::Duration;

/// Why a duration string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// The string was empty.
    #[error("empty duration")]
    Empty,
    /// A number was not followed by a unit, or the unit is unknown.
    #[error(
        "invalid duration {0:?}: expected a number followed by ns, us, ms, s, m, h, d or y (e.g. 500ms, 30s, 24h)"
    )]
    Invalid(String),
    /// The value does not fit in a `Duration`.
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

/// Parses a Kuma-style duration.
///
/// ```
/// use std::time::Duration;
/// use weft_api::duration::parse_duration;
/// assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
/// assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
/// assert!(parse_duration("5 parsecs").is_err());
/// ```
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let invalid = || DurationError::Invalid(input.to_string());
    let mut total_nanos: u128 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(invalid)?;
        if num_len == 0 {
            return Err(invalid());
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| invalid())?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit: f64 = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            "d" => 86_400e9,
            "y" => 365.0 * 86_400e9,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        let part = number * nanos_per_unit;
        if !part.is_finite() || part > u64::MAX as f64 * 1e9 {
            return Err(DurationError::Overflow(input.to_string()));
        }
        total_nanos = total_nanos.saturating_add(part as u128);
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000)
        .map_err(|_| DurationError::Overflow(input.to_string()))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// Formats a duration the way Kuma prints one (`24h`, `90s`, `1500ms`), choosing the largest
/// unit that divides it exactly.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".into();
    }
    for (unit, div) in [
        ("d", 86_400_000u128),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms.is_multiple_of(div) {
            return format!("{}{unit}", ms / div);
        }
    }
    format!("{ms}ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kuma_spellings() {
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86_400));
        assert_eq!(
            parse_duration("10y").unwrap(),
            Duration::from_secs(315_360_000)
        );
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["", "s", "10", "10x", "-1s", "1e400s", "h1"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn formats_round_trip() {
        for s in ["1d", "90s", "1500ms", "3h", "5m"] {
            assert_eq!(format_duration(parse_duration(s).unwrap()), s);
        }
    }
}
