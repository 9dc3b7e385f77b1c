//! A small SVG line chart for training curves (no plotting dependency): stacked panels, each
//! with its own y range and one or more series over the step axis.

use std::fmt::Write;

pub struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
}

pub struct Panel<'a> {
    pub title: &'a str,
    pub series: Vec<Series<'a>>,
}

const W: f64 = 720.0;
const H: f64 = 220.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 30.0;

fn fmt_tick(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// Render `panels` over a shared x axis labelled `x_label`.
pub fn svg(panels: &[Panel], x_label: &str) -> String {
    let mut s = String::new();
    let total_h = H * panels.len() as f64;
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{total_h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let all = || panels.iter().flat_map(|p| p.series.iter()).flat_map(|s| s.points.iter());
    let (x0, x1) = all().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (x0, x1) = if x0.is_finite() && x1 > x0 { (x0, x1) } else { (0.0, 1.0) };
    for (k, panel) in panels.iter().enumerate() {
        let oy = H * k as f64;
        let pts = || panel.series.iter().flat_map(|s| s.points.iter()).filter(|p| p.1.is_finite());
        let (mut y0, mut y1) = pts().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        if !y0.is_finite() {
            (y0, y1) = (0.0, 1.0);
        }
        if y1 - y0 < 1e-12 {
            (y0, y1) = (y0 - 0.5, y1 + 0.5);
        }
        let pw = W - LEFT - RIGHT;
        let ph = H - TOP - BOTTOM;
        let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
        let sy = |y: f64| oy + TOP + (1.0 - (y - y0) / (y1 - y0)) * ph;
        let _ = writeln!(s, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, oy + 16.0, panel.title);
        let _ = writeln!(
            s,
            r##"<rect x="{LEFT}" y="{}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>"##,
            oy + TOP
        );
        for i in 0..=4 {
            let y = y0 + (y1 - y0) * i as f64 / 4.0;
            let (x2, yy, tx, ty, label) = (LEFT + pw, sy(y), LEFT - 4.0, sy(y) + 4.0, fmt_tick(y));
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" x2="{x2}" y1="{yy}" y2="{yy}" stroke="#eee"/><text x="{tx}" y="{ty}" text-anchor="end">{label}</text>"##
            );
        }
        for i in 0..=4 {
            let x = x0 + (x1 - x0) * i as f64 / 4.0;
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
                sx(x),
                oy + H - BOTTOM + 14.0,
                fmt_tick(x)
            );
        }
        for (j, ser) in panel.series.iter().enumerate() {
            let path: Vec<String> = ser
                .points
                .iter()
                .filter(|p| p.1.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.6" points="{}"/>"#,
                ser.color,
                path.join(" ")
            );
            let ly = oy + TOP + 12.0 + 16.0 * j as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{0}" x2="{1}" y1="{ly}" y2="{ly}" stroke="{2}" stroke-width="2"/><text x="{3}" y="{4}">{5}</text>"#,
                W - RIGHT + 10.0,
                W - RIGHT + 30.0,
                ser.color,
                W - RIGHT + 35.0,
                ly + 4.0,
                ser.name
            );
        }
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{x_label}</text>"#,
        LEFT + (W - LEFT - RIGHT) / 2.0,
        total_h - 4.0
    );
    s.push_str("</svg>\n");
    s
}

/// Moving average over a trailing window (noisy per-step rewards).
pub fn smooth(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(window.saturating_sub(1));
            let w = &points[lo..=i];
            (points[i].0, w.iter().map(|p| p.1).sum::<f64>() / w.len() as f64)
        })
        .collect()
}
