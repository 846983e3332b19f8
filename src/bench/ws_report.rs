//! The WebSocket benchmark's HTML report: one self-contained page (inline SVG, no scripts, no
//! external assets) with the broadcast and reply latency distributions and throughput over time.

use std::fmt::Write;

use super::ws::WsReport;

const W: f64 = 720.0;
const H: f64 = 260.0;
const PAD: f64 = 48.0;

/// One line of a chart: its name, its colour, its points in data units.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// An axis from zero: a round step (1, 2 or 5 × 10ⁿ) giving about five intervals, the top tick
/// at or above `max`, and how many decimals its labels need.
fn axis(max: f64) -> (f64, f64, usize) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let rough = max / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude);
    let top = (max / step - 1e-9).ceil().max(1.0) * step;
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    (step, top, decimals)
}

/// A tick's label: zero as 0, the others with the axis's decimals.
fn tick_label(value: f64, decimals: usize) -> String {
    if value == 0.0 {
        "0".to_owned()
    } else {
        format!("{value:.decimals$}")
    }
}

/// A polyline chart, scaled to fit, with both axes from zero and labelled ticks.
fn chart(title: &str, x_label: &str, y_label: &str, series: &[Series<'_>]) -> String {
    let all = series.iter().flat_map(|s| s.2.iter());
    let (mut x_max, mut y_max) = (0.0f64, 0.0f64);
    for &(x, y) in all {
        x_max = x_max.max(x);
        y_max = y_max.max(y);
    }
    let (x_step, x_max, x_decimals) = axis(x_max);
    let (y_step, y_max, y_decimals) = axis(y_max);
    let sx = |x: f64| PAD + x / x_max * (W - 2.0 * PAD);
    let sy = |y: f64| H - PAD - y / y_max * (H - 2.0 * PAD);
    let mut svg = format!(
        r##"<h2>{title}</h2><svg viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{title}">
<line x1="{PAD}" y1="{b}" x2="{r}" y2="{b}" stroke="#444"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{b}" stroke="#444"/>
<text x="{cx}" y="{ty}" text-anchor="middle" font-size="12">{x_label}</text>
<text x="12" y="{cy}" font-size="12" transform="rotate(-90 12 {cy})" text-anchor="middle">{y_label}</text>"##,
        b = H - PAD,
        r = W - PAD,
        cx = W / 2.0,
        ty = H - 10.0,
        cy = H / 2.0,
    );
    let ticks = |step: f64, top: f64| {
        (0..)
            .map(move |i| i as f64 * step)
            .take_while(move |&v| v <= top + step / 2.0)
    };
    for x in ticks(x_step, x_max) {
        let at = sx(x);
        let _ = write!(
            svg,
            r##"<line class="tick" x1="{at:.1}" y1="{b}" x2="{at:.1}" y2="{t}" stroke="#444"/><text class="x-tick" x="{at:.1}" y="{l}" text-anchor="middle" font-size="11">{label}</text>"##,
            label = tick_label(x, x_decimals),
            b = H - PAD,
            t = H - PAD + 4.0,
            l = H - PAD + 15.0,
        );
    }
    for y in ticks(y_step, y_max) {
        let at = sy(y);
        let _ = write!(
            svg,
            r##"<line class="tick" x1="{l}" y1="{at:.1}" x2="{r}" y2="{at:.1}" stroke="#ddd"/><text class="y-tick" x="{t}" y="{ty:.1}" text-anchor="end" font-size="11">{label}</text>"##,
            label = tick_label(y, y_decimals),
            l = PAD - 4.0,
            r = W - PAD,
            t = PAD - 6.0,
            ty = at + 4.0,
        );
    }
    for (i, (name, color, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/><text x="{}" y="{}" font-size="12" fill="{color}">{name}</text>"#,
            path.join(" "),
            PAD + 10.0 + 160.0 * i as f64,
            PAD - 10.0,
        );
    }
    svg.push_str("</svg>");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn render(report: &WsReport) -> String {
    let quantiles = |h: &hdrhistogram::Histogram<u64>| -> Vec<(f64, f64)> {
        // x: "nines" (0 = p0, 1 = p90, 2 = p99, 3 = p99.9), y: latency in ms.
        (0..=60)
            .map(|i| {
                let nines = i as f64 / 20.0;
                let q = 1.0 - 10f64.powf(-nines);
                (nines, h.value_at_quantile(q) as f64 / 1000.0)
            })
            .collect()
    };
    let mut latency = Vec::new();
    if let Some(h) = &report.run.histogram {
        latency.push(("broadcasts", "#c0392b", quantiles(h)));
    }
    if let Some(h) = &report.run.reply_histogram {
        latency.push(("replies", "#8e44ad", quantiles(h)));
    }
    let rates = |t: &[(f64, u64, u64)], which: usize| -> Vec<(f64, f64)> {
        let mut prev = (0.0, 0u64, 0u64);
        t.iter()
            .map(|&p| {
                let dt = (p.0 - prev.0).max(1e-9);
                let v = if which == 1 {
                    p.1 - prev.1
                } else {
                    p.2 - prev.2
                };
                prev = p;
                (p.0, v as f64 / dt)
            })
            .collect()
    };
    let timeline = &report.run.timeline;
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>thunderline bench ws</h1><pre>{}</pre>",
        escape(&report.table())
    );
    body.push_str(&chart(
        "Latency distribution: push → broadcast, push → ok reply",
        "percentile (1 = p90, 2 = p99, 3 = p99.9)",
        "ms",
        &latency,
    ));
    body.push_str(&chart(
        "Throughput over time",
        "seconds",
        "per second",
        &[
            ("events in", "#2980b9", rates(timeline, 1)),
            ("broadcasts delivered", "#27ae60", rates(timeline, 2)),
        ],
    ));
    let json = serde_json::to_string_pretty(report).unwrap_or_default();
    let _ = write!(body, "<h2>Figures</h2><pre>{}</pre>", escape(&json));
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>thunderline bench ws</title>\
         <style>body{{font-family:sans-serif;max-width:760px;margin:2em auto}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>\
         </head><body>{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Ticks from zero in equal round steps, the last at or above the largest value, about
        /// five of them.
        #[test]
        fn an_axis_starts_at_zero_and_covers_its_largest_value(max in 1e-6f64..1e9) {
            let (step, top, _) = axis(max);
            let mantissa = step / 10f64.powf(step.log10().floor());
            prop_assert!([1.0, 2.0, 5.0].iter().any(|m| (mantissa - m).abs() < 1e-6), "{step}");
            prop_assert!(top >= max * (1.0 - 1e-9), "{top} < {max}");
            let intervals = (top / step).round();
            prop_assert!((2.0..=10.0).contains(&intervals.max(2.0)) && intervals <= 10.0, "{intervals}");
            prop_assert!(top - max < step * (1.0 + 1e-9));
        }
    }

    #[test]
    fn every_chart_labels_zero_and_its_ticks_on_both_axes() {
        let svg = chart(
            "t",
            "s",
            "ms",
            &[("a", "#000", vec![(0.5, 3.0), (9.5, 17.0)])],
        );
        let labels = |class: &str| -> Vec<String> {
            svg.split(&format!(r#"class="{class}""#))
                .skip(1)
                .map(|rest| rest[rest.find('>').unwrap() + 1..rest.find('<').unwrap()].to_owned())
                .collect()
        };
        assert_eq!(labels("x-tick"), ["0", "2", "4", "6", "8", "10"]);
        assert_eq!(labels("y-tick"), ["0", "5", "10", "15", "20"]);
        // Nothing to draw: still an axis from zero.
        let empty = chart("t", "s", "ms", &[]);
        assert!(empty.contains(r#"class="x-tick""#) && empty.contains(">0</text>"));
    }
}
