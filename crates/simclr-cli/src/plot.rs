//! PNG charts drawn with the `image` crate and a built-in 5x7 pixel font: line charts of a run's
//! curves, bar charts and heatmaps of ablations. Plain on purpose: no font files, no system
//! libraries.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::error::{io_err, Result};

/// Glyphs of the 5x7 font: each row is 5 bits, most significant bit on the left.
fn glyph(c: char) -> [u8; 7] {
    match c.to_ascii_lowercase() {
        '0' => [0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e],
        '1' => [0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e],
        '2' => [0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f],
        '3' => [0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e],
        '4' => [0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02],
        '5' => [0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e],
        '6' => [0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e],
        '7' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e],
        '9' => [0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c],
        'a' => [0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'b' => [0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e],
        'c' => [0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e],
        'd' => [0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c],
        'e' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f],
        'f' => [0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10],
        'g' => [0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f],
        'h' => [0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11],
        'i' => [0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e],
        'j' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c],
        'k' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'l' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f],
        'm' => [0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11],
        'n' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'o' => [0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'p' => [0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10],
        'q' => [0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d],
        'r' => [0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11],
        's' => [0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e],
        't' => [0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'u' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e],
        'v' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04],
        'w' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a],
        'x' => [0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11],
        'y' => [0x11, 0x11, 0x11, 0x0a, 0x04, 0x04, 0x04],
        'z' => [0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f],
        '.' => [0, 0, 0, 0, 0, 0x0c, 0x0c],
        ',' => [0, 0, 0, 0, 0x0c, 0x04, 0x08],
        '-' => [0, 0, 0, 0x1f, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1f, 0x04, 0x04, 0],
        '%' => [0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03],
        '=' => [0, 0, 0x1f, 0, 0x1f, 0, 0],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        '/' => [0, 0x01, 0x02, 0x04, 0x08, 0x10, 0],
        ':' => [0, 0x0c, 0x0c, 0, 0x0c, 0x0c, 0],
        '_' => [0, 0, 0, 0, 0, 0, 0x1f],
        '*' => [0, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0],
        _ => [0; 7],
    }
}

/// Colours of the series, in order.
pub const PALETTE: [Rgb<u8>; 6] = [
    Rgb([31, 119, 180]),
    Rgb([214, 39, 40]),
    Rgb([44, 160, 44]),
    Rgb([255, 127, 14]),
    Rgb([148, 103, 189]),
    Rgb([140, 86, 75]),
];

const INK: Rgb<u8> = Rgb([40, 40, 40]);
const GRID: Rgb<u8> = Rgb([225, 225, 225]);

/// A canvas with text.
pub struct Canvas {
    img: RgbImage,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: u32, height: u32) -> Canvas {
        Canvas {
            img: RgbImage::from_pixel(width, height, Rgb([255, 255, 255])),
        }
    }

    fn put(&mut self, x: i64, y: i64, c: Rgb<u8>) {
        if x >= 0 && y >= 0 && (x as u32) < self.img.width() && (y as u32) < self.img.height() {
            self.img.put_pixel(x as u32, y as u32, c);
        }
    }

    /// Text with its top-left corner at (x, y), `scale` pixels per font pixel.
    pub fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb<u8>) {
        for (k, ch) in s.chars().enumerate() {
            let g = glyph(ch);
            for (row, bits) in g.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        for dy in 0..scale {
                            for dx in 0..scale {
                                self.put(
                                    x + (k as i64 * 6 + col) * scale + dx,
                                    y + row as i64 * scale + dy,
                                    c,
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Width of `s` in pixels at `scale`.
    pub fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 6 * scale
    }

    /// A line, two pixels thick.
    pub fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: Rgb<u8>) {
        let n = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
            );
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                self.put(x + dx, y + dy, c);
            }
        }
    }

    /// A filled rectangle.
    pub fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb<u8>) {
        for y in y0.min(y1)..y0.max(y1) {
            for x in x0.min(x1)..x0.max(x1) {
                self.put(x, y, c);
            }
        }
    }

    /// Writes the PNG.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.img.save(path).map_err(|e| io_err(path, e))
    }
}

/// A short label for a tick value.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else if a >= 0.01 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    }
}

/// One curve of a line chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend.
    pub name: String,
    /// Points (x, y).
    pub points: Vec<(f64, f64)>,
}

/// A line chart of `series` with a title and axis names, written as a PNG.
pub fn line_chart(
    title: &str,
    x_name: &str,
    y_name: &str,
    series: &[Series],
    path: &Path,
) -> Result<()> {
    let (w, h) = (720i64, 420i64);
    let (left, right, top, bottom) = (70i64, 20i64, 40i64, 50i64);
    let mut c = Canvas::new(w as u32, h as u32);
    c.text(left, 12, title, 2, INK);
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|p| p.0.is_finite() && p.1.is_finite())
        .collect();
    let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
        (
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if pts.is_empty() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| left as f64 + (x - x0) / (x1 - x0) * (w - left - right) as f64;
    let py = |y: f64| (h - bottom) as f64 - (y - y0) / (y1 - y0) * (h - top - bottom) as f64;
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * k as f64 / 4.0;
        let yy = py(y) as i64;
        c.rect(left, yy, w - right, yy + 1, GRID);
        let label = tick_label(y);
        c.text(
            left - 6 - Canvas::text_width(&label, 1),
            yy - 3,
            &label,
            1,
            INK,
        );
        let x = x0 + (x1 - x0) * k as f64 / 4.0;
        let xx = px(x) as i64;
        c.rect(xx, top, xx + 1, h - bottom, GRID);
        let label = tick_label(x);
        c.text(
            xx - Canvas::text_width(&label, 1) / 2,
            h - bottom + 6,
            &label,
            1,
            INK,
        );
    }
    c.rect(left, top, left + 1, h - bottom, INK);
    c.rect(left, h - bottom, w - right, h - bottom + 1, INK);
    c.text(
        (w - Canvas::text_width(x_name, 1)) / 2,
        h - 18,
        x_name,
        1,
        INK,
    );
    c.text(4, top - 14, y_name, 1, INK);
    for (i, s) in series.iter().enumerate() {
        let col = PALETTE[i % PALETTE.len()];
        for pair in s.points.windows(2) {
            c.line(
                (px(pair[0].0), py(pair[0].1)),
                (px(pair[1].0), py(pair[1].1)),
                col,
            );
        }
        if s.points.len() == 1 {
            let (x, y) = (px(s.points[0].0) as i64, py(s.points[0].1) as i64);
            c.rect(x - 2, y - 2, x + 3, y + 3, col);
        }
        let ly = top + 6 + 12 * i as i64;
        c.rect(w - right - 150, ly, w - right - 138, ly + 3, col);
        c.text(w - right - 132, ly - 2, &s.name, 1, INK);
    }
    c.save(path)
}

/// A bar chart of labelled values (percent), written as a PNG.
pub fn bar_chart(title: &str, y_name: &str, bars: &[(String, f64)], path: &Path) -> Result<()> {
    let n = bars.len().max(1) as i64;
    let (left, top, bottom) = (60i64, 40i64, 60i64);
    let slot = 90i64;
    let (w, h) = ((left + n * slot + 20).max(360), 380i64);
    let mut c = Canvas::new(w as u32, h as u32);
    c.text(left, 12, title, 2, INK);
    let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max).max(1e-9);
    let top_v = if max <= 100.0 { 100.0 } else { max };
    let py = |v: f64| (h - bottom) as f64 - v / top_v * (h - top - bottom) as f64;
    for k in 0..=4 {
        let v = top_v * k as f64 / 4.0;
        let yy = py(v) as i64;
        c.rect(left, yy, w - 20, yy + 1, GRID);
        let label = tick_label(v);
        c.text(
            left - 6 - Canvas::text_width(&label, 1),
            yy - 3,
            &label,
            1,
            INK,
        );
    }
    c.text(4, top - 14, y_name, 1, INK);
    for (i, (name, v)) in bars.iter().enumerate() {
        let x = left + i as i64 * slot + 15;
        c.rect(
            x,
            py(*v) as i64,
            x + slot - 30,
            h - bottom,
            PALETTE[i % PALETTE.len()],
        );
        let value = format!("{v:.1}");
        c.text(x, py(*v) as i64 - 10, &value, 1, INK);
        c.text(x, h - bottom + 8, name, 1, INK);
    }
    c.rect(left, h - bottom, w - 20, h - bottom + 1, INK);
    c.save(path)
}

/// A heatmap of `values[row][col]` (percent) with row and column names, written as a PNG.
pub fn heatmap(
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
    path: &Path,
) -> Result<()> {
    let cell = 64i64;
    let left = 10
        + rows
            .iter()
            .map(|r| Canvas::text_width(r, 1))
            .max()
            .unwrap_or(0);
    let top = 60i64;
    let (w, h) = (
        (left + cell * cols.len() as i64 + 20).max(300),
        top + cell * rows.len() as i64 + 20,
    );
    let mut c = Canvas::new(w as u32, h as u32);
    c.text(10, 12, title, 2, INK);
    let flat: Vec<f64> = values
        .iter()
        .flatten()
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    let (lo, hi) = flat
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    for (j, name) in cols.iter().enumerate() {
        c.text(left + j as i64 * cell + 4, top - 12, name, 1, INK);
    }
    for (i, name) in rows.iter().enumerate() {
        let y = top + i as i64 * cell;
        c.text(4, y + cell / 2 - 3, name, 1, INK);
        for (j, &v) in values[i].iter().enumerate() {
            let x = left + j as i64 * cell;
            if !v.is_finite() {
                continue;
            }
            let t = if hi > lo { (v - lo) / (hi - lo) } else { 1.0 };
            // White (worst) to dark green (best).
            let col = Rgb([
                (255.0 - 200.0 * t) as u8,
                (255.0 - 110.0 * t) as u8,
                (255.0 - 200.0 * t) as u8,
            ]);
            c.rect(x + 1, y + 1, x + cell - 1, y + cell - 1, col);
            let label = format!("{v:.1}");
            let ink = if t > 0.6 { Rgb([255, 255, 255]) } else { INK };
            c.text(
                x + (cell - Canvas::text_width(&label, 1)) / 2,
                y + cell / 2 - 3,
                &label,
                1,
                ink,
            );
        }
    }
    c.save(path)
}

/// Charts of a run's `metrics.jsonl`: `plots/loss.png`, `plots/lr.png` and
/// `plots/accuracy.png` (the online probe per step, k-NN per epoch). Returns the files.
pub fn plot_run(run_dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
    let (mut loss, mut lr, mut probe, mut knn) = (vec![], vec![], vec![], vec![]);
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| io_err(&path, format!("line {}: not JSON ({e})", i + 1)))?;
        let step = v["step"].as_f64().unwrap_or(f64::NAN);
        match v["kind"].as_str() {
            Some("step") => {
                if let Some(l) = v["loss"].as_f64() {
                    loss.push((step, l));
                }
                if let Some(l) = v["lr"].as_f64() {
                    lr.push((step, l));
                }
                if let Some(a) = v["probe_top1"].as_f64() {
                    probe.push((step, a));
                }
            }
            Some("epoch") => {
                if let Some(a) = v["knn_top1"].as_f64() {
                    knn.push((step, a));
                }
            }
            _ => {}
        }
    }
    // A resumed run may repeat steps it had logged before its last checkpoint: keep the last.
    for s in [&mut loss, &mut lr, &mut probe, &mut knn] {
        s.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                *earlier = *later;
            }
            same
        });
    }
    let dir = run_dir.join("plots");
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let files = [
        dir.join("loss.png"),
        dir.join("lr.png"),
        dir.join("accuracy.png"),
    ];
    line_chart(
        "nt-xent loss",
        "step",
        "loss",
        &[Series {
            name: "loss".into(),
            points: loss,
        }],
        &files[0],
    )?;
    line_chart(
        "learning rate",
        "step",
        "lr",
        &[Series {
            name: "lr".into(),
            points: lr,
        }],
        &files[1],
    )?;
    let mut acc = vec![Series {
        name: "online probe".into(),
        points: probe,
    }];
    if !knn.is_empty() {
        acc.push(Series {
            name: "k-nn (test)".into(),
            points: knn,
        });
    }
    line_chart("accuracy", "step", "top-1 %", &acc, &files[2])?;
    Ok(files.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = [Series {
            name: "loss".into(),
            points: vec![(0.0, 5.0), (10.0, 3.0), (20.0, 2.5)],
        }];
        line_chart("loss", "step", "nt-xent", &s, &dir.path().join("l.png")).unwrap();
        let img = image::open(dir.path().join("l.png")).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (720, 420));
        // The curve's colour appears.
        assert!(img.pixels().any(|p| *p == PALETTE[0]));
        bar_chart(
            "t",
            "top-1 %",
            &[("a".into(), 50.0), ("b".into(), 75.0)],
            &dir.path().join("b.png"),
        )
        .unwrap();
        heatmap(
            "h",
            &["crop".into()],
            &["crop".into(), "color".into()],
            &[vec![40.0, 60.0]],
            &dir.path().join("h.png"),
        )
        .unwrap();
        assert!(image::open(dir.path().join("h.png")).is_ok());
    }

    #[test]
    fn every_printable_label_character_has_a_glyph() {
        for ch in "0123456789abcdefghijklmnopqrstuvwxyz.-%=()/:+".chars() {
            assert_ne!(glyph(ch), [0; 7], "{ch}");
        }
    }
}
