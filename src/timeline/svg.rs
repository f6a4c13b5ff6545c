//! The timeline as a hand-written SVG chart (no plotting crate): write and read latency
//! lines on a log scale, failed writes as bars on a linear right axis, seconds without
//! an acknowledged write shaded, stale reads ticked under the axis, the journal's phase
//! boundaries as labelled vertical lines, axis labels and a legend. Pure and
//! deterministic: the same rows give the same bytes.

use std::fmt::Write as _;

use super::{Mark, Row};

const W: f64 = 1000.0;
const H: f64 = 500.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 930.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 400.0;

const C_P50: &str = "#1f77b4";
const C_P99: &str = "#ff7f0e";
const C_MAX: &str = "#9467bd";
const C_READ: &str = "#2ca02c";
const C_FAIL: &str = "#d62728";
const C_STALE: &str = "#8c564b";
const C_NOACK: &str = "#f4cccc";

/// One latency of a row.
type Metric = fn(&Row) -> Option<f64>;

/// A linear map from a domain to a range (pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Linear {
    pub d0: f64,
    pub d1: f64,
    pub r0: f64,
    pub r1: f64,
}

impl Linear {
    pub fn map(&self, v: f64) -> f64 {
        if self.d1 == self.d0 {
            return self.r0;
        }
        self.r0 + (v - self.d0) / (self.d1 - self.d0) * (self.r1 - self.r0)
    }
}

/// A log10 map for latencies: whole decades from `lo` to `hi` (ms); values below `lo`
/// are drawn at `lo`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Log {
    pub lo: f64,
    pub hi: f64,
    pub r0: f64,
    pub r1: f64,
}

impl Log {
    /// Decades that hold every value (at least 0.1–10 ms).
    pub fn fit(values: impl Iterator<Item = f64>, r0: f64, r1: f64) -> Log {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for v in values.filter(|v| v.is_finite() && *v > 0.0) {
            lo = lo.min(v);
            hi = hi.max(v);
        }
        let lo = if lo.is_finite() {
            10f64.powf(lo.log10().floor()).clamp(0.01, 0.1)
        } else {
            0.1
        };
        let hi = 10f64.powf(hi.max(10.0).log10().ceil());
        Log { lo, hi, r0, r1 }
    }

    pub fn map(&self, v: f64) -> f64 {
        let l = |x: f64| x.max(self.lo).log10();
        self.r0 + (l(v) - l(self.lo)) / (l(self.hi) - l(self.lo)) * (self.r1 - self.r0)
    }

    /// The decade ticks, `lo` to `hi`.
    pub fn ticks(&self) -> Vec<f64> {
        let (a, b) = (
            self.lo.log10().round() as i32,
            self.hi.log10().round() as i32,
        );
        (a..=b.min(a + 12)).map(|e| 10f64.powi(e)).collect()
    }
}

/// A tick step for `n` seconds: at most about 12 ticks, on round numbers.
pub fn time_step(n: u64) -> u64 {
    [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|s| n / s <= 12)
        .unwrap_or(7200)
}

/// Escape text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

fn num(v: f64) -> String {
    let s = format!("{v:.1}");
    s.strip_suffix(".0").map(String::from).unwrap_or(s)
}

fn ms_label(v: f64) -> String {
    if v >= 1000.0 {
        format!("{} s", num(v / 1000.0))
    } else if v >= 1.0 {
        format!("{} ms", num(v))
    } else {
        format!("{v} ms")
    }
}

/// The chart. `start_ms` is the Unix time of second 0; marks are placed by their time.
pub fn render(rows: &[Row], start_ms: u64, marks: &[Mark], title: &str) -> String {
    let n = rows.len().max(1) as u64;
    let x = Linear {
        d0: 0.0,
        d1: n as f64,
        r0: LEFT,
        r1: RIGHT,
    };
    let y = Log::fit(
        rows.iter().flat_map(|r| {
            [
                r.write_p50_ms,
                r.write_p99_ms,
                r.write_max_ms,
                r.read_p99_ms,
            ]
            .into_iter()
            .flatten()
        }),
        BOTTOM,
        TOP,
    );
    let fail_max = rows
        .iter()
        .map(|r| r.writes.max(r.writes_failed))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let yf = Linear {
        d0: 0.0,
        d1: fail_max,
        r0: BOTTOM,
        r1: TOP,
    };
    let bar_w = (RIGHT - LEFT) / n as f64;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
        W / 2.0,
        esc(title)
    );

    // Seconds without an acknowledged write: shaded full height.
    let _ = writeln!(s, r#"<g id="no-ack">"#);
    for r in rows.iter().filter(|r| r.writes_ok() == 0) {
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{TOP}" width="{}" height="{}" fill="{C_NOACK}"/>"#,
            num(x.map(r.t_s as f64)),
            num(bar_w),
            num(BOTTOM - TOP)
        );
    }
    let _ = writeln!(s, "</g>");

    // Grid and the left (latency) axis.
    let _ = writeln!(s, r#"<g id="y-axis" text-anchor="end">"#);
    for t in y.ticks() {
        let py = num(y.map(t));
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{py}" x2="{RIGHT}" y2="{py}" stroke="#dddddd"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{py}" dy="4">{}</text>"#,
            LEFT - 6.0,
            esc(&ms_label(t))
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(18,{}) rotate(-90)" text-anchor="middle">latency (log scale)</text>"#,
        num((TOP + BOTTOM) / 2.0)
    );
    let _ = writeln!(s, "</g>");

    // The right (failed writes) axis.
    let _ = writeln!(s, r#"<g id="y2-axis" text-anchor="start">"#);
    let step = (fail_max / 4.0).ceil().max(1.0);
    let mut v = 0.0;
    while v <= fail_max {
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" dy="4">{}</text>"#,
            RIGHT + 6.0,
            num(yf.map(v)),
            num(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate({},{}) rotate(90)" text-anchor="middle">failed writes per second</text>"#,
        num(W - 22.0),
        num((TOP + BOTTOM) / 2.0)
    );
    let _ = writeln!(s, "</g>");

    // The time axis.
    let _ = writeln!(s, r#"<g id="x-axis" text-anchor="middle">"#);
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{BOTTOM}" x2="{RIGHT}" y2="{BOTTOM}" stroke="#000000"/>"##
    );
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{BOTTOM}" stroke="#000000"/>"##
    );
    let ts = time_step(n);
    let mut t = 0;
    while t <= n {
        let px = num(x.map(t as f64));
        let _ = writeln!(
            s,
            r##"<line x1="{px}" y1="{BOTTOM}" x2="{px}" y2="{}" stroke="#000000"/>"##,
            BOTTOM + 4.0
        );
        let _ = writeln!(s, r#"<text x="{px}" y="{}">{t}</text>"#, BOTTOM + 16.0);
        t += ts;
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}">seconds since the probe started (t = 0 at Unix time {}.{:03})</text>"#,
        num((LEFT + RIGHT) / 2.0),
        BOTTOM + 36.0,
        start_ms / 1000,
        start_ms % 1000
    );
    let _ = writeln!(s, "</g>");

    // Failed writes.
    let _ = writeln!(
        s,
        r#"<g id="failed-writes" fill="{C_FAIL}" fill-opacity="0.7">"#
    );
    for r in rows.iter().filter(|r| r.writes_failed > 0) {
        let top = yf.map(r.writes_failed as f64);
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="{}" height="{}"/>"#,
            num(x.map(r.t_s as f64)),
            num(top),
            num(bar_w),
            num(BOTTOM - top)
        );
    }
    let _ = writeln!(s, "</g>");

    // Stale reads: a tick under the axis.
    let _ = writeln!(s, r#"<g id="stale-reads" fill="{C_STALE}">"#);
    for r in rows.iter().filter(|r| r.read_sees_newest == Some(false)) {
        let _ = writeln!(
            s,
            r#"<rect x="{}" y="{}" width="{}" height="5"/>"#,
            num(x.map(r.t_s as f64)),
            BOTTOM + 20.0,
            num(bar_w.max(1.0))
        );
    }
    let _ = writeln!(s, "</g>");

    // Latency lines, broken where a second had no sample; points at mid-second.
    let series: [(&str, &str, &str, Metric); 3] = [
        ("write-p50", C_P50, "", |r| r.write_p50_ms),
        ("write-p99", C_P99, "", |r| r.write_p99_ms),
        ("read-p99", C_READ, r#" stroke-dasharray="5 3""#, |r| {
            r.read_p99_ms
        }),
    ];
    // The max as dots: with few samples a second, p99 is the max (nearest rank) and a
    // line would hide the other.
    let _ = writeln!(s, r#"<g id="write-max" fill="{C_MAX}">"#);
    for r in rows {
        if let Some(v) = r.write_max_ms {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="2.5"/>"#,
                num(x.map(r.t_s as f64 + 0.5)),
                num(y.map(v))
            );
        }
    }
    let _ = writeln!(s, "</g>");
    for (id, color, dash, get) in series {
        let _ = writeln!(
            s,
            r#"<g id="{id}" fill="none" stroke="{color}" stroke-width="1.5"{dash}>"#
        );
        let mut seg: Vec<String> = Vec::new();
        let flush = |seg: &mut Vec<String>, s: &mut String| {
            match seg.len() {
                0 => {}
                1 => {
                    let _ = writeln!(s, r#"<polyline points="{} {}"/>"#, seg[0], seg[0]);
                }
                _ => {
                    let _ = writeln!(s, r#"<polyline points="{}"/>"#, seg.join(" "));
                }
            }
            seg.clear();
        };
        for r in rows {
            match get(r) {
                Some(v) => seg.push(format!(
                    "{},{}",
                    num(x.map(r.t_s as f64 + 0.5)),
                    num(y.map(v))
                )),
                None => flush(&mut seg, &mut s),
            }
        }
        flush(&mut seg, &mut s);
        let _ = writeln!(s, "</g>");
    }

    // Phase boundaries: a dashed line at the instant, the label rotated along it, pushed
    // right when it would overlap the previous label.
    let _ = writeln!(s, r#"<g id="phases" font-size="10">"#);
    let mut last_label_x = f64::NEG_INFINITY;
    for m in marks {
        let t = m.at_ms.saturating_sub(start_ms) as f64 / 1000.0;
        let px = x.map(t.min(n as f64));
        let lx = px.max(last_label_x + 13.0);
        last_label_x = lx;
        let _ = writeln!(
            s,
            r##"<line x1="{p}" y1="{TOP}" x2="{p}" y2="{BOTTOM}" stroke="#444444" stroke-dasharray="2 2"/>"##,
            p = num(px)
        );
        let _ = writeln!(
            s,
            r##"<text class="phase" transform="translate({},{}) rotate(90)" fill="#222222">{}</text>"##,
            num(lx + 5.0),
            TOP + 4.0,
            esc(&m.label)
        );
    }
    let _ = writeln!(s, "</g>");

    // Legend.
    let _ = writeln!(s, r#"<g id="legend">"#);
    // Kind: 0 line, 1 dashed line, 2 dot, 3 box.
    let items: [(&str, &str, u8); 7] = [
        ("write p50", C_P50, 0),
        ("write p99", C_P99, 0),
        ("write max", C_MAX, 2),
        ("read p99", C_READ, 1),
        ("failed writes", C_FAIL, 3),
        ("no write acknowledged", C_NOACK, 3),
        ("stale read", C_STALE, 3),
    ];
    let mut lx = LEFT;
    let ly = H - 22.0;
    for (name, color, kind) in items {
        if kind == 2 {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="3" fill="{color}"/>"#,
                num(lx + 7.0),
                num(ly - 4.0)
            );
        } else if kind == 3 {
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{}" width="14" height="10" fill="{color}"/>"#,
                num(lx),
                num(ly - 9.0)
            );
        } else {
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{}" x2="{}" y2="{}" stroke="{color}" stroke-width="2"{}/>"#,
                num(lx),
                num(ly - 4.0),
                num(lx + 14.0),
                num(ly - 4.0),
                if kind == 1 {
                    r#" stroke-dasharray="5 3""#
                } else {
                    ""
                }
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}</text>"#,
            num(lx + 18.0),
            num(ly),
            esc(name)
        );
        lx += 24.0 + name.len() as f64 * 6.2;
    }
    let _ = writeln!(s, "</g>");
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::timeline::Buckets;

    #[test]
    fn linear_and_log_scales_map_their_ends_and_decades() {
        let x = Linear {
            d0: 0.0,
            d1: 10.0,
            r0: 70.0,
            r1: 930.0,
        };
        assert_eq!(x.map(0.0), 70.0);
        assert_eq!(x.map(10.0), 930.0);
        assert_eq!(x.map(5.0), 500.0);
        let y = Log::fit([0.8, 3.0, 250.0].into_iter(), 400.0, 50.0);
        assert_eq!((y.lo, y.hi), (0.1, 1000.0));
        assert_eq!(y.ticks(), [0.1, 1.0, 10.0, 100.0, 1000.0]);
        assert_eq!(y.map(0.1), 400.0);
        assert_eq!(y.map(1000.0), 50.0);
        assert!((y.map(10.0) - 225.0).abs() < 1e-9, "two of four decades up");
        assert_eq!(y.map(0.0), 400.0, "zero is drawn at the bottom, not -inf");
        // No data: a sane default, never NaN.
        let e = Log::fit(std::iter::empty(), 400.0, 50.0);
        assert_eq!((e.lo, e.hi), (0.1, 10.0));
        assert!(e.map(1.0).is_finite());
    }

    #[test]
    fn time_ticks_stay_few_and_round() {
        assert_eq!(time_step(10), 1);
        assert_eq!(time_step(40), 5);
        assert_eq!(time_step(100), 10);
        assert_eq!(time_step(3600), 300);
    }

    #[test]
    fn the_chart_is_deterministic_and_has_every_part() {
        let mut b = Buckets::new(1_000_000, 100);
        for i in 0..5u64 {
            let at = 1_000_000 + i * 1000;
            b.at(at).write_us.extend([1_000, 2_000 + i as u32 * 1000]);
            b.at(at).read_us.push(1_500);
        }
        b.at(1_002_000).writes_failed = 1;
        b.at(1_003_000).reads_stale = 1;
        let rows = b.rows();
        let marks = vec![
            Mark {
                at_ms: 1_001_200,
                label: "capture".into(),
            },
            Mark {
                at_ms: 1_001_250,
                label: "dump & <restore>".into(),
            },
        ];
        let a = render(&rows, 1_000_000, &marks, "svc");
        assert_eq!(a, render(&rows, 1_000_000, &marks, "svc"));
        assert!(a.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(a.ends_with("</svg>\n"));
        for part in [
            "id=\"write-p50\"",
            "id=\"write-p99\"",
            "id=\"write-max\"",
            "id=\"read-p99\"",
            "id=\"failed-writes\"",
            "id=\"stale-reads\"",
            "id=\"legend\"",
            ">capture</text>",
            ">dump &amp; &lt;restore&gt;</text>",
            "failed writes per second",
            "latency (log scale)",
            "seconds since the probe started",
        ] {
            assert!(a.contains(part), "missing {part}");
        }
        // The two close labels do not overlap: the second is pushed 13 px right.
        let xs: Vec<f64> = a
            .lines()
            .filter(|l| l.contains("class=\"phase\""))
            .map(|l| {
                let t = l.split("translate(").nth(1).unwrap();
                t.split(',').next().unwrap().parse().unwrap()
            })
            .collect();
        assert_eq!(xs.len(), 2);
        assert!(xs[1] - xs[0] >= 13.0 - 1e-9);
        // Opening and closing tags balance.
        let opens = a.matches("<g").count();
        assert_eq!(opens, a.matches("</g>").count());
    }
}
