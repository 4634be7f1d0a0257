//! Plain-text tables for `weftctl`: left-aligned columns three spaces apart, and ages.

use std::time::SystemTime;

/// Renders `header` and `rows` as lines of left-aligned columns, each line ending in `\n`.
pub fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let parts: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(parts.join("   ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

/// How long before `now` the RFC 3339 time `rfc3339` was, shortly (`42s`, `5m`, `3h`, `2d`);
/// empty if it is not a time.
pub fn age(rfc3339: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return String::new();
    };
    short(now.duration_since(t).map(|d| d.as_secs()).unwrap_or(0))
}

/// How long until an RFC 3339 time, as [`age`] writes it; `expired` once it has passed.
pub fn until(rfc3339: &str, now: SystemTime) -> String {
    let Ok(t) = humantime::parse_rfc3339_weak(rfc3339) else {
        return String::new();
    };
    match t.duration_since(now) {
        Ok(d) => format!("in {}", short(d.as_secs())),
        Err(_) => "expired".into(),
    }
}

fn short(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn columns_align_and_lines_are_trimmed() {
        let out = render(
            &["NAME", "AGE"],
            &[
                vec!["a-long-name".into(), "3s".into()],
                vec!["b".into(), String::new()],
            ],
        );
        assert_eq!(out, "NAME          AGE\na-long-name   3s\nb\n");
    }

    #[test]
    fn ages_pick_a_unit() {
        let t0 = humantime::parse_rfc3339("2026-01-01T00:00:00Z").expect("time");
        let at = |s: u64| age("2026-01-01T00:00:00Z", t0 + Duration::from_secs(s));
        assert_eq!(at(5), "5s");
        assert_eq!(at(600), "10m");
        assert_eq!(at(3 * 3600), "3h");
        assert_eq!(at(3 * 86_400), "3d");
        assert_eq!(age("yesterday", t0), "");
    }
}
