//! Human durations on the command line: `500ms`, `5s`, `1m`, `1.5s`, `250us`.

use std::time::Duration;

/// A duration string that could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 5s, 1m)")]
pub struct ParseDurationError {
    input: String,
    reason: &'static str,
}

/// Parses a duration such as `500ms`, `5s`, `1.5s`, `2m`, `1h`, `100us` or
/// `0`. A bare number means seconds.
///
/// ```
/// use std::time::Duration;
/// use weft_bench::duration::parse;
/// assert_eq!(parse("500ms").unwrap(), Duration::from_millis(500));
/// assert_eq!(parse("1m").unwrap(), Duration::from_secs(60));
/// assert_eq!(parse("2").unwrap(), Duration::from_secs(2));
/// ```
pub fn parse(input: &str) -> Result<Duration, ParseDurationError> {
    let err = |reason| ParseDurationError {
        input: input.to_owned(),
        reason,
    };
    let s = input.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(err("missing number"));
    }
    let value: f64 = number.parse().map_err(|_| err("bad number"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "ns" => 1e-9,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(err("unknown unit")),
    };
    let secs = value * seconds_per_unit;
    Duration::try_from_secs_f64(secs).map_err(|_| err("out of range"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("").is_err());
        assert!(parse("ms").is_err());
        assert!(parse("5 parsecs").is_err());
        assert!(parse("1.2.3s").is_err());
        assert!(parse("-1s").is_err());
    }
}
