//! `--svg-out`: the run's charts as plain SVG, written by hand (a few
//! polylines, axes and labels need no plotting library, no fonts and no
//! browser): delivery latency percentiles over time, and the distribution
//! of every delivery's latency (CDF, log-scaled latency axis). Both come
//! from the report alone, so any saved run can be drawn the same way.

use crate::hist::bucket_range;
use crate::report::Report;
use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 360.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 48.0;

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(f64, f64)>,
}

struct Axis {
    label: String,
    min: f64,
    max: f64,
    log: bool,
}

impl Axis {
    fn map(&self, v: f64, from: f64, to: f64) -> f64 {
        let (v, lo, hi) = if self.log {
            (v.max(self.min).log10(), self.min.log10(), self.max.log10())
        } else {
            (v, self.min, self.max)
        };
        let f = if hi > lo { (v - lo) / (hi - lo) } else { 0.0 };
        from + f.clamp(0.0, 1.0) * (to - from)
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (
                self.min.log10().floor() as i32,
                self.max.log10().ceil() as i32,
            );
            (a..=b).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=5)
                .map(|i| self.min + (self.max - self.min) * i as f64 / 5.0)
                .collect()
        }
    }
}

/// The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k) at or
/// above `v`: an axis end whose fifths are readable.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    [1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&c| c >= v)
        .unwrap_or(10.0 * p)
}

fn fmt_tick(v: f64) -> String {
    if v >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn plot(title: &str, x: &Axis, y: &Axis, series: &[Series]) -> String {
    let (x0, x1, y0, y1) = (LEFT, W - RIGHT, H - BOTTOM, TOP);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(
        s,
        r#"<text x="{LEFT}" y="20" font-size="14" font-weight="bold">{}</text>"#,
        escape(title)
    );
    for t in x.ticks() {
        let px = x.map(t, x0, x1);
        let _ = write!(
            s,
            r##"<line x1="{px:.1}" y1="{y1}" x2="{px:.1}" y2="{y0}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            y0 + 16.0,
            fmt_tick(t)
        );
    }
    for t in y.ticks() {
        let py = y.map(t, y0, y1);
        let _ = write!(
            s,
            r##"<line x1="{x0}" y1="{py:.1}" x2="{x1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            x0 - 6.0,
            py + 4.0,
            fmt_tick(t)
        );
    }
    let _ = write!(
        s,
        r##"<rect x="{x0}" y="{y1}" width="{:.1}" height="{:.1}" fill="none" stroke="#999"/>"##,
        x1 - x0,
        y0 - y1
    );
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        (x0 + x1) / 2.0,
        H - 10.0,
        escape(&x.label)
    );
    let _ = write!(
        s,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        (y0 + y1) / 2.0,
        escape(&y.label)
    );
    for se in series {
        let pts: Vec<String> = se
            .points
            .iter()
            .map(|&(a, b)| format!("{:.1},{:.1}", x.map(a, x0, x1), y.map(b, y0, y1)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            se.color,
            pts.join(" ")
        );
    }
    // The legend, over the lines.
    let _ = write!(
        s,
        r##"<rect x="{:.1}" y="{:.1}" width="104" height="{:.1}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##,
        x1 - 116.0,
        y1 + 4.0,
        16.0 * series.len() as f64 + 6.0
    );
    for (i, se) in series.iter().enumerate() {
        let lx = x1 - 110.0;
        let ly = y1 + 16.0 + 16.0 * i as f64;
        let _ = write!(
            s,
            r#"<line x1="{lx:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2"/><text x="{:.1}" y="{ly:.1}">{}</text>"#,
            ly - 4.0,
            lx + 18.0,
            ly - 4.0,
            se.color,
            lx + 24.0,
            escape(se.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The charts of a run: (file suffix, SVG text).
pub fn charts(r: &Report) -> Vec<(&'static str, String)> {
    let what = format!("{:?}, {} sockets", r.scenario, r.config.connections).to_lowercase();
    // Latency percentiles over time (seconds with deliveries only).
    let pick = |f: fn(&crate::report::TimePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        r.timeline
            .iter()
            .filter(|p| p.delivered > 0)
            .filter_map(|p| Some((p.t_secs, f(p)?)))
            .collect()
    };
    let lines = [
        ("p50", "#1f77b4", pick(|p| p.p50_ms)),
        ("p90", "#2ca02c", pick(|p| p.p90_ms)),
        ("p99", "#d62728", pick(|p| p.p99_ms)),
        ("max", "#999999", pick(|p| p.max_ms)),
    ];
    let t_max = r.timeline.last().map_or(1.0, |p| p.t_secs).max(1.0);
    let y_max = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold(1.0f64, f64::max);
    let latency = plot(
        &format!("Delivery latency over time ({what})"),
        &Axis {
            label: "seconds since start".into(),
            min: 0.0,
            max: nice(t_max),
            log: false,
        },
        &Axis {
            label: "publish → deliver, ms".into(),
            min: 0.0,
            max: nice(y_max),
            log: false,
        },
        &lines
            .into_iter()
            .map(|(name, color, points)| Series {
                name,
                color,
                points,
            })
            .collect::<Vec<_>>(),
    );
    // CDF of every delivery, from the merged histogram (µs buckets).
    let mut points = Vec::new();
    if let Some(h) = r.histograms.get("delivery_us") {
        let total: u64 = h.counts.iter().sum();
        let mut seen = 0u64;
        for (i, &c) in h.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            seen += c;
            let ms = bucket_range(i).1 as f64 / 1000.0;
            points.push((ms.max(0.001), seen as f64 / total as f64));
        }
    }
    let (lo, hi) = (
        points.first().map_or(0.01, |p| p.0).max(0.001),
        points.last().map_or(10.0, |p| p.0),
    );
    let cdf = plot(
        &format!("Delivery latency distribution ({what})"),
        &Axis {
            label: "publish → deliver, ms (log)".into(),
            min: lo,
            max: hi.max(lo * 10.0),
            log: true,
        },
        &Axis {
            label: "fraction of deliveries".into(),
            min: 0.0,
            max: 1.0,
            log: false,
        },
        &[Series {
            name: "CDF",
            color: "#1f77b4",
            points,
        }],
    );
    vec![("latency", latency), ("cdf", cdf)]
}
