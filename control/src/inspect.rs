//! `weftctl inspect dataplanes`: each proxy's status and traffic, read from
//! `GET /meshes/{mesh}/dataplanes+insights`.
//!
//! Proxies report their totals through discovery every few seconds (`ProxyStats`); the
//! control plane keeps the latest report per proxy ([`crate::discovery::StatsReport`]).

use crate::table;
use serde_json::Value;
use std::time::SystemTime;

/// The columns of the dataplanes table.
pub const DATAPLANE_COLUMNS: [&str; 9] = [
    "MESH",
    "NAME",
    "STATUS",
    "LAST-SEEN",
    "CONFIG",
    "CERT-EXPIRY",
    "REQUESTS",
    "ERROR-RATE",
    "CONNECTIONS",
];

/// The table of the `items` of `dataplanes+insights` answers, as of `now`.
///
/// STATUS is `Online` while the proxy's stream is open; LAST-SEEN is the last message from
/// it (`never` if it never connected). CONFIG is whether the proxy took the last snapshot
/// sent (`synced`), refused it (`NACKED`: the control plane's `lastNack` says why), or has
/// not answered yet (`pending`); CERT-EXPIRY is when its certificate expires. A proxy that
/// refuses every new configuration is `Online` all the same, so CONFIG is where it shows.
/// REQUESTS and CONNECTIONS are the totals since the
/// proxy started, ERROR-RATE the share of requests that failed (5xx or no response); they
/// are `-` until the proxy has reported.
pub fn dataplanes_table(items: &[Value], now: SystemTime) -> String {
    let rows: Vec<Vec<String>> = items.iter().map(|item| row(item, now)).collect();
    table::render(&DATAPLANE_COLUMNS, &rows)
}

fn row(item: &Value, now: SystemTime) -> Vec<String> {
    let text = |p: &str| item.pointer(p).and_then(Value::as_str).unwrap_or_default();
    let insight = item.get("dataplaneInsight");
    let online = insight
        .and_then(|i| i.get("online"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let last_seen = match insight
        .and_then(|i| i.get("lastSeen"))
        .and_then(Value::as_str)
    {
        Some(t) => format!("{} ago", table::age(t, now)),
        None => "never".into(),
    };
    let stats = insight
        .and_then(|i| i.get("stats"))
        .filter(|s| s.is_object());
    let count = |field: &str| stats.and_then(|s| s.get(field)).and_then(Value::as_u64);
    let or_dash = |n: Option<u64>| n.map_or_else(|| "-".to_string(), |n| n.to_string());
    let field = |name: &str| {
        insight
            .and_then(|i| i.get(name))
            .and_then(Value::as_str)
            .filter(|v| !v.is_empty())
    };
    // `lastNack` is `version <v>: <reason>` and stays after later pushes: it is this push's
    // refusal only when it names the version sent last.
    let config = match (
        field("sentVersion"),
        field("ackedVersion"),
        field("lastNack"),
    ) {
        (None, ..) => "-",
        (Some(sent), Some(acked), _) if sent == acked => "synced",
        (Some(sent), _, Some(nack)) if nack.starts_with(&format!("version {sent}:")) => "NACKED",
        (Some(_), ..) => "pending",
    };
    let cert_expiry = field("certExpiry").map_or_else(|| "-".to_string(), |t| table::until(t, now));
    vec![
        text("/mesh").to_string(),
        text("/name").to_string(),
        if online { "Online" } else { "Offline" }.to_string(),
        last_seen,
        config.to_string(),
        cert_expiry,
        or_dash(count("requestsTotal")),
        error_rate(count("requestsTotal"), count("requestErrorsTotal")),
        or_dash(count("connectionsTotal")),
    ]
}

/// `errors` as a percentage of `requests` with two decimals; `-` without requests.
pub fn error_rate(requests: Option<u64>, errors: Option<u64>) -> String {
    match (requests, errors) {
        (Some(r), Some(e)) if r > 0 => format!("{:.2}%", e as f64 * 100.0 / r as f64),
        _ => "-".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rows_show_status_traffic_and_dashes_before_a_report() {
        let now = humantime::parse_rfc3339("2026-01-01T00:01:00Z").expect("time");
        let items = [
            json!({"mesh": "m", "name": "web-1", "dataplaneInsight": {
                "online": true, "lastSeen": "2026-01-01T00:00:55Z",
                "sentVersion": "7", "ackedVersion": "7", "certExpiry": "2026-01-02T00:01:00Z",
                "stats": {"requestsTotal": 400, "requestErrorsTotal": 3, "connectionsTotal": 12}}}),
            json!({"mesh": "m", "name": "backend-1", "dataplaneInsight": {"online": false}}),
            json!({"mesh": "m", "name": "api-1", "dataplaneInsight": {
                "online": true, "lastSeen": "2026-01-01T00:00:59Z",
                "sentVersion": "9", "ackedVersion": "8", "lastNack": "version 9: bad route",
                "certExpiry": "2025-12-31T00:00:00Z"}}),
            json!({"mesh": "m", "name": "new-1", "dataplaneInsight": {
                "online": true, "lastSeen": "2026-01-01T00:00:59Z", "sentVersion": "10",
                "ackedVersion": "8", "lastNack": "version 9: bad route"}}),
        ];
        let out = dataplanes_table(&items, now);
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0], DATAPLANE_COLUMNS);
        assert_eq!(
            lines[1],
            [
                "m", "web-1", "Online", "5s", "ago", "synced", "in", "24h", "400", "0.75%", "12"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "m",
                "backend-1",
                "Offline",
                "never",
                "-",
                "-",
                "-",
                "-",
                "-"
            ]
        );
        assert_eq!(
            lines[3],
            [
                "m", "api-1", "Online", "1s", "ago", "NACKED", "expired", "-", "-", "-"
            ]
        );
        assert_eq!(
            lines[4],
            [
                "m", "new-1", "Online", "1s", "ago", "pending", "-", "-", "-", "-"
            ]
        );
    }

    #[test]
    fn the_error_rate_needs_requests() {
        assert_eq!(error_rate(Some(0), Some(0)), "-");
        assert_eq!(error_rate(None, None), "-");
        assert_eq!(error_rate(Some(3), Some(1)), "33.33%");
        assert_eq!(error_rate(Some(10), Some(0)), "0.00%");
    }
}
