//! The HTML page of a run or a capacity search: one self-contained file, charts drawn as
//! inline SVG (no scripts, no fetches), readable offline and in CI artifacts.

use serde_json::Value;

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 220.0;
const MARGIN_LEFT: f64 = 70.0;
const MARGIN_BOTTOM: f64 = 30.0;
const MARGIN_TOP: f64 = 28.0;
const MARGIN_RIGHT: f64 = 150.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];

pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// A line chart with a legend; `y_unit` labels the axis.
pub fn chart(title: &str, x_unit: &str, y_unit: &str, series: &[Series]) -> String {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x_max, mut y_max) = (1.0f64, 0.0f64);
    for &(x, y) in all {
        if x.is_finite() && y.is_finite() {
            x_max = x_max.max(x);
            y_max = y_max.max(y);
        }
    }
    let x_max = nice_ceiling(x_max);
    let y_max = nice_ceiling(y_max);
    let plot_w = WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let plot_h = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let sx = |x: f64| MARGIN_LEFT + x / x_max * plot_w;
    let sy = |y: f64| MARGIN_TOP + plot_h - y / y_max * plot_h;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">"#
    );
    svg.push_str(&format!(
        r#"<text x="{MARGIN_LEFT}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        escape(title)
    ));
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        let py = sy(y);
        svg.push_str(&format!(
            r##"<line x1="{MARGIN_LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            MARGIN_LEFT + plot_w,
            MARGIN_LEFT - 6.0,
            py + 4.0,
            short(y)
        ));
    }
    for i in 0..=5 {
        let x = x_max * f64::from(i) / 5.0;
        svg.push_str(&format!(
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#,
            sx(x),
            HEIGHT - 10.0,
            short(x)
        ));
    }
    svg.push_str(&format!(
        r#"<text x="{}" y="{}" text-anchor="end">{}</text><text x="12" y="{}" transform="rotate(-90 12 {})" text-anchor="middle">{}</text>"#,
        MARGIN_LEFT + plot_w,
        HEIGHT - 22.0,
        escape(x_unit),
        MARGIN_TOP + plot_h / 2.0,
        MARGIN_TOP + plot_h / 2.0,
        escape(y_unit)
    ));
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        if !path.is_empty() {
            svg.push_str(&format!(
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.6" points="{}"/>"#,
                path.join(" ")
            ));
        }
        let ly = MARGIN_TOP + 14.0 * i as f64 + 6.0;
        let lx = MARGIN_LEFT + plot_w + 12.0;
        svg.push_str(&format!(
            r#"<rect x="{lx}" y="{:.1}" width="12" height="3" fill="{color}"/><text x="{}" y="{:.1}">{}</text>"#,
            ly - 3.0,
            lx + 16.0,
            ly + 1.0,
            escape(s.name)
        ));
    }
    svg.push_str("</svg>");
    svg
}

fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn column(report: &Value, key: &str, scale: f64) -> Vec<(f64, f64)> {
    report["timeseries"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            (
                s["t"].as_f64().unwrap_or(0.0),
                s[key].as_f64().unwrap_or(0.0) * scale,
            )
        })
        .collect()
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:900px}\
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}\
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}.pass{color:#2a7d2a}.fail{color:#c0392b}\
p.note{color:#555;font-size:13px}";

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>\n",
        escape(title)
    )
}

fn f(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x == x.trunc() && x.abs() < 1e15 => format!("{x:.0}"),
        Some(x) => format!("{x:.2}"),
        None => "-".into(),
    }
}

pub fn run_page(report: &Value) -> String {
    let passed = report["passed"].as_bool() == Some(true);
    let mut body = format!(
        "<h1>tern-loadgen run: <span class=\"{}\">{}</span></h1>",
        if passed { "pass" } else { "fail" },
        if passed { "passed" } else { "FAILED" }
    );
    let args = &report["config"]["args"];
    body.push_str(&format!(
        "<p>{} clients (devices per user: {}) on {}, {} s, rate {} msg/s{}, pattern {}, heartbeat {} s, {} process(es) × {} thread(s).</p>",
        f(&report["config"]["clients"]),
        f(&args["devices"]),
        escape(report["config"]["server"].as_str().unwrap_or("?")),
        f(&args["duration"]),
        f(&args["rate"]),
        args["window"].as_u64().map_or(String::new(), |w| format!(" (closed loop, window {w})")),
        escape(args["pattern"].as_str().unwrap_or("?")),
        f(&args["heartbeat"]),
        f(&report["config"]["processes"]),
        f(&report["config"]["threads_per_process"]),
    ));
    for failure in report["failures"].as_array().into_iter().flatten() {
        body.push_str(&format!(
            "<p class=\"fail\">{}</p>",
            escape(failure.as_str().unwrap_or("?"))
        ));
    }
    let m = &report["messages"];
    body.push_str("<table><tr><th>messages</th><th>count</th></tr>");
    for (label, key) in [
        ("sent", "sent"),
        ("acknowledged (durable)", "acked"),
        ("device deliveries", "delivered"),
        ("lost", "lost"),
        ("duplicated", "duplicated"),
        ("out of order", "out_of_order"),
        ("unacknowledged at end", "unacked_at_end"),
        ("acked per second", "acked_per_second"),
        ("answered busy (retried)", "busy_rejections"),
    ] {
        body.push_str(&format!("<tr><td>{label}</td><td>{}</td></tr>", f(&m[key])));
    }
    body.push_str("</table><table><tr><th>latency (ms)</th><th>p50</th><th>p99</th><th>p99.9</th><th>max</th><th>samples</th></tr>");
    for name in ["ack", "e2e", "heartbeat", "connect", "login", "sync"] {
        let l = &report["latency_ms"][name];
        body.push_str(&format!(
            "<tr><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f(&l["p50"]),
            f(&l["p99"]),
            f(&l["p999"]),
            f(&l["max"]),
            f(&l["count"])
        ));
    }
    let s = &report["server"];
    body.push_str(&format!(
        "</table><p>Node RSS start {} MiB, peak {} MiB, end {} MiB; node CPU {} s; loadgen CPU {} s; node restarts {}.</p>",
        mib(&s["rss_bytes"]["start"]),
        mib(&s["rss_bytes"]["peak"]),
        mib(&s["rss_bytes"]["end"]),
        f(&s["cpu_seconds"]),
        f(&report["loadgen"]["cpu_seconds"]),
        f(&s["restarts"]),
    ));
    body.push_str(&storage_table(s));
    body.push_str(&threads_table(s));
    body.push_str(&intervals_table(&report["throughput"]));
    body.push_str(&chart(
        "Throughput",
        "seconds",
        "messages / s",
        &[
            Series {
                name: "sent",
                points: column(report, "sent", 1.0),
            },
            Series {
                name: "acked",
                points: column(report, "acked", 1.0),
            },
            Series {
                name: "delivered",
                points: column(report, "delivered", 1.0),
            },
        ],
    ));
    body.push_str(&chart(
        "Latency per second (from intended send time)",
        "seconds",
        "ms",
        &[
            Series {
                name: "ack p50",
                points: column(report, "ack_p50_ms", 1.0),
            },
            Series {
                name: "ack p99",
                points: column(report, "ack_p99_ms", 1.0),
            },
            Series {
                name: "e2e p50",
                points: column(report, "e2e_p50_ms", 1.0),
            },
            Series {
                name: "e2e p99",
                points: column(report, "e2e_p99_ms", 1.0),
            },
            Series {
                name: "heartbeat p99",
                points: column(report, "heartbeat_p99_ms", 1.0),
            },
        ],
    ));
    body.push_str(&chart(
        "Acked messages per interval (does throughput hold as the store grows?)",
        "seconds",
        "messages / s",
        &[Series {
            name: "acked/s",
            points: report["throughput"]["intervals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|i| {
                    (
                        i["to_s"].as_f64().unwrap_or(0.0),
                        i["acked_per_second"].as_f64().unwrap_or(0.0),
                    )
                })
                .collect(),
        }],
    ));
    if s["disk_write_bytes"].is_number() || s["store_bytes"].is_number() {
        body.push_str(&chart(
            "Node storage",
            "seconds",
            "MiB",
            &[
                Series {
                    name: "written / s",
                    points: column(report, "node_disk_write_bytes", 1.0 / 1048576.0),
                },
                Series {
                    name: "store size",
                    points: column(report, "store_bytes", 1.0 / 1048576.0),
                },
            ],
        ));
    }
    body.push_str(&outage_table(&report["outage"]));
    body.push_str(&chart(
        "Connected clients",
        "seconds",
        "sessions",
        &[Series {
            name: "connected",
            points: column(report, "connected", 1.0),
        }],
    ));
    body.push_str(&chart(
        "Connection attempts and logins per second (reconnect backoff)",
        "seconds",
        "per second",
        &[
            Series {
                name: "attempts",
                points: column(report, "connects", 1.0),
            },
            Series {
                name: "logins",
                points: column(report, "logins", 1.0),
            },
        ],
    ));
    body.push_str(&chart(
        "Node memory",
        "seconds",
        "MiB",
        &[Series {
            name: "node RSS",
            points: column(report, "node_rss_bytes", 1.0 / 1048576.0),
        }],
    ));
    body.push_str(&chart(
        "CPU (100 % = one core)",
        "seconds",
        "%",
        &[
            Series {
                name: "node",
                points: column(report, "node_cpu_pct", 1.0),
            },
            Series {
                name: "loadgen",
                points: column(report, "loadgen_cpu_pct", 1.0),
            },
        ],
    ));
    body.push_str("<p class=\"note\">Latencies are counted from each message's intended send time (open loop), so a stall of the node or of the load generator shows as latency, not as a lower rate. e2e is the time until a recipient device received the message. A run passes when every acknowledged message reached every device of its recipient and sender exactly once and in timeline order after a final sync.</p>");
    page("tern-loadgen run", &body)
}

/// The outage section of a run with `--outage-at`; nothing otherwise.
fn outage_table(outage: &Value) -> String {
    if !outage.is_object() {
        return String::new();
    }
    let mut out = String::from("<table><tr><th>network outage</th><th>value</th></tr>");
    for (label, key) in [
        ("link down at (s)", "down_at_s"),
        ("link up at (s)", "up_at_s"),
        ("converged after link-up (s)", "converged_seconds"),
        ("deliveries pending at link-up", "deliveries_pending_at_up"),
        ("devices that reconnected", "devices_reconnected"),
        ("last device back after link-up (s)", "reconnected_seconds"),
        ("devices not back", "devices_not_back"),
        ("connection attempts", "connect_attempts"),
        (
            "most attempts of one device",
            "connect_attempts_per_device_max",
        ),
        ("most attempts in one second", "connect_attempts_peak"),
    ] {
        out.push_str(&format!(
            "<tr><td>{label}</td><td>{}</td></tr>",
            f(&outage[key])
        ));
    }
    out.push_str("</table>");
    out
}

/// Bytes the node wrote and the size of its store; "-" where unknown (a remote node).
fn storage_table(server: &Value) -> String {
    let mut out = String::from("<table><tr><th>node storage</th><th>value</th></tr>");
    for (label, key) in [
        (
            "bytes written to storage (/proc/PID/io write_bytes)",
            "disk_write_bytes",
        ),
        (
            "written per acked message (B)",
            "disk_write_bytes_per_acked_message",
        ),
        ("data folder at the end (B)", "store_bytes"),
        ("data folder at the start (B)", "store_bytes_start"),
        (
            "store growth per acked message (B)",
            "store_growth_bytes_per_acked_message",
        ),
    ] {
        out.push_str(&format!(
            "<tr><td>{label}</td><td>{}</td></tr>",
            f(&server[key])
        ));
    }
    out.push_str("</table>");
    out
}

/// CPU seconds per node thread, busiest first.
fn threads_table(server: &Value) -> String {
    let Some(threads) = server["threads"].as_object() else {
        return "<p class=\"note\">Node CPU per thread: unknown (no local pid).</p>".into();
    };
    let mut rows: Vec<(&String, f64)> = threads
        .iter()
        .map(|(name, s)| (name, s.as_f64().unwrap_or(0.0)))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut out = String::from("<table><tr><th>node thread</th><th>CPU s</th></tr>");
    for (name, seconds) in rows {
        out.push_str(&format!(
            "<tr><td>{}</td><td>{seconds:.2}</td></tr>",
            escape(name)
        ));
    }
    out.push_str("</table>");
    out
}

/// Acked rate, busy answers and store size per interval of the sending window.
fn intervals_table(throughput: &Value) -> String {
    let mut out = format!(
        "<table><tr><th>interval ({} s)</th><th>acked/s</th><th>busy</th><th>e2e p99 max ms</th><th>written MiB</th><th>store MiB at end</th></tr>",
        f(&throughput["interval_seconds"])
    );
    for i in throughput["intervals"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "<tr><td>{}–{} s{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            f(&i["from_s"]),
            f(&i["to_s"]),
            if i["full"].as_bool() == Some(true) {
                ""
            } else {
                " (partial)"
            },
            f(&i["acked_per_second"]),
            f(&i["busy"]),
            f(&i["e2e_p99_ms_max"]),
            mib(&i["disk_write_bytes"]),
            mib(&i["store_bytes_end"]),
        ));
    }
    out.push_str(&format!(
        "</table><p>Last full interval's acked rate over the first's: {}.</p>",
        f(&throughput["last_over_first"])
    ));
    out
}

fn mib(v: &Value) -> String {
    v.as_f64()
        .map_or("-".into(), |b| format!("{:.1}", b / 1048576.0))
}

pub fn capacity_page(report: &Value) -> String {
    let mut body = String::from("<h1>tern-loadgen capacity search</h1>");
    body.push_str(&format!(
        "<p>Objective: {} p99 ≤ {} ms, verification passing. Dimension: {}. Largest load that met it: <b>{}</b>.</p>",
        escape(report["slo_metric"].as_str().unwrap_or("?")),
        f(&report["slo_p99_ms"]),
        escape(report["dimension"].as_str().unwrap_or("?")),
        f(&report["best"]),
    ));
    body.push_str("<table><tr><th>step</th><th>offered</th><th>acked/s</th><th>connected</th><th>ack p99 ms</th><th>e2e p99 ms</th><th>node CPU s</th><th>node RSS peak MiB</th><th>result</th></tr>");
    let mut p99 = Vec::new();
    let mut acked = Vec::new();
    for (i, step) in report["steps"].as_array().into_iter().flatten().enumerate() {
        let r = &step["report"];
        let load = step["load"].as_f64().unwrap_or(0.0);
        p99.push((
            load,
            r["latency_ms"][report["slo_metric"].as_str().unwrap_or("e2e")]["p99"]
                .as_f64()
                .unwrap_or(0.0),
        ));
        acked.push((
            load,
            r["messages"]["acked_per_second"].as_f64().unwrap_or(0.0),
        ));
        let ok = step["met"].as_bool() == Some(true);
        body.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=\"{}\">{}</td></tr>",
            i + 1,
            f(&step["load"]),
            f(&r["messages"]["acked_per_second"]),
            f(&r["clients"]["peak_connected"]),
            f(&r["latency_ms"]["ack"]["p99"]),
            f(&r["latency_ms"]["e2e"]["p99"]),
            f(&r["server"]["cpu_seconds"]),
            mib(&r["server"]["rss_bytes"]["peak"]),
            if ok { "pass" } else { "fail" },
            if ok { "met".to_owned() } else { escape(step["why"].as_str().unwrap_or("missed")) },
        ));
    }
    body.push_str("</table>");
    body.push_str(&chart(
        "p99 latency by load",
        "offered load",
        "ms",
        &[Series {
            name: "p99",
            points: p99,
        }],
    ));
    body.push_str(&chart(
        "Acked rate by load",
        "offered load",
        "msg/s",
        &[Series {
            name: "acked/s",
            points: acked,
        }],
    ));
    page("tern-loadgen capacity", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_self_contained_svg() {
        let svg = chart(
            "t<1>",
            "s",
            "ms",
            &[Series {
                name: "a&b",
                points: vec![(0.0, 1.0), (1.0, 3.5), (2.0, f64::NAN)],
            }],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("t&lt;1&gt;"));
        assert!(svg.contains("a&amp;b"));
        assert!(!svg.contains("http://") || svg.contains("xmlns=\"http://www.w3.org/2000/svg\""));
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(0.0), 1.0);
    }
}
