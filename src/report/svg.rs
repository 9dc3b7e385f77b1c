//! Inline SVG charts for the report: line charts and bars with interval whiskers. No scripts, no
//! external resources: the page renders offline and prints as it shows.

const W: f64 = 560.0;
const H: f64 = 260.0;
const PAD_L: f64 = 56.0;
const PAD_R: f64 = 150.0;
const PAD_T: f64 = 28.0;
const PAD_B: f64 = 36.0;
const COLOURS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in values.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-12 {
        return (lo - 0.5, hi + 0.5);
    }
    let m = (hi - lo) * 0.05;
    (lo - m, hi + m)
}

fn axes(title: &str, xlabel: &str, (y0, y1): (f64, f64)) -> String {
    let mut s = format!(
        "<svg width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" role=\"img\">\
         <text x=\"{PAD_L}\" y=\"16\" font-size=\"13\" font-weight=\"bold\">{}</text>\
         <line x1=\"{PAD_L}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#444\"/>\
         <line x1=\"{PAD_L}\" y1=\"{PAD_T}\" x2=\"{PAD_L}\" y2=\"{}\" stroke=\"#444\"/>\
         <text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"middle\">{}</text>",
        escape(title),
        H - PAD_B,
        W - PAD_R,
        H - PAD_B,
        H - PAD_B,
        (PAD_L + W - PAD_R) / 2.0,
        H - 6.0,
        escape(xlabel)
    );
    for k in 0..=4 {
        let v = y0 + (y1 - y0) * k as f64 / 4.0;
        let y = H - PAD_B - (H - PAD_B - PAD_T) * k as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"10\" text-anchor=\"end\">{}</text>\
             <line x1=\"{PAD_L}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>",
            PAD_L - 4.0,
            y + 3.0,
            short(v),
            W - PAD_R
        ));
    }
    s
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    }
}

/// Lines, one per named series of (x, y) points, with a legend on the right.
pub fn lines(title: &str, xlabel: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let (x0, x1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.0)));
    let (y0, y1) = range(series.iter().flat_map(|s| s.1.iter().map(|p| p.1)));
    let px = |x: f64| PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - PAD_R);
    let py = |y: f64| H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_B - PAD_T);
    let mut s = axes(title, xlabel, (y0, y1));
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let path: Vec<String> =
            pts.iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.6\" points=\"{}\"/>",
            path.join(" ")
        ));
        if path.len() <= 20 {
            for p in &path {
                let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                s.push_str(&format!("<circle cx=\"{x}\" cy=\"{y}\" r=\"2.5\" fill=\"{c}\"/>"));
            }
        }
        let ly = PAD_T + 14.0 * i as f64;
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"3\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{}</text>",
            W - PAD_R + 8.0,
            ly,
            W - PAD_R + 22.0,
            ly + 4.0,
            escape(name)
        ));
    }
    s.push_str("</svg>");
    s
}

/// One bar: label, value and an optional (low, high) whisker.
pub type Bar = (String, f64, Option<(f64, f64)>);

/// Bars with whiskers.
pub fn bars(title: &str, ylabel: &str, items: &[Bar]) -> String {
    let (_, y1) = range(items.iter().flat_map(|b| [b.1, b.2.map_or(b.1, |w| w.1)]));
    let y0 = 0.0;
    let py = |y: f64| H - PAD_B - (y - y0) / (y1 - y0) * (H - PAD_B - PAD_T);
    let mut s = axes(title, ylabel, (y0, y1));
    let n = items.len().max(1) as f64;
    let slot = (W - PAD_L - PAD_R) / n;
    for (i, (label, v, w)) in items.iter().enumerate() {
        let x = PAD_L + slot * i as f64 + slot * 0.15;
        let c = COLOURS[i % COLOURS.len()];
        s.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{c}\" opacity=\"0.8\"><title>{}: {v:.4}</title></rect>",
            py(*v),
            slot * 0.7,
            (py(0.0) - py(*v)).max(0.0),
            escape(label)
        ));
        if let Some((lo, hi)) = w {
            let cx = x + slot * 0.35;
            s.push_str(&format!(
                "<line x1=\"{cx:.1}\" y1=\"{:.1}\" x2=\"{cx:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>\
                 <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>\
                 <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#000\"/>",
                py(*lo),
                py(*hi),
                cx - 5.0,
                py(*lo),
                cx + 5.0,
                py(*lo),
                cx - 5.0,
                py(*hi),
                cx + 5.0,
                py(*hi)
            ));
        }
        let ly = PAD_T + 14.0 * i as f64;
        s.push_str(&format!(
            "<rect x=\"{}\" y=\"{}\" width=\"10\" height=\"8\" fill=\"{c}\"/><text x=\"{}\" y=\"{}\" font-size=\"10\">{}</text>",
            W - PAD_R + 8.0,
            ly - 4.0,
            W - PAD_R + 22.0,
            ly + 4.0,
            escape(label)
        ));
    }
    s.push_str("</svg>");
    s
}
