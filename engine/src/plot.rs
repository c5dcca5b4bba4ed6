//! Metric curves as PNG files, laid out as ms-swift's `plot_images` writes them into a run's
//! `images/` folder: one 800x500 image per TensorBoard scalar tag, named after the tag with `/`
//! and `.` replaced by `_`; `train/loss` shows the raw values in a pale line plus a 0.9
//! TensorBoard-smoothed line, other tags one line, a single point a dot.
//!
//! Everything is drawn here into an RGB buffer (axes, grid, tick labels in a built-in 5x7
//! font, anti-aliased polylines) and encoded with the `png` crate, so no system fonts or
//! plotting libraries are involved. Files are written to a temporary name and renamed.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// ms-swift's colours: the raw series of a smoothed plot, and the main line.
const RAW_COLOR: Rgb = [0xFF, 0xE2, 0xD9];
const LINE_COLOR: Rgb = [0xFF, 0x70, 0x43];
const BACKGROUND: Rgb = [0xFF, 0xFF, 0xFF];
const AXIS_COLOR: Rgb = [0x33, 0x33, 0x33];
const GRID_COLOR: Rgb = [0xE6, 0xE6, 0xE6];
const TEXT_COLOR: Rgb = [0x22, 0x22, 0x22];

/// matplotlib's figsize (8, 5) at 100 dpi.
pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 500;

/// The smoothing ms-swift applies to the tags it smooths.
pub const DEFAULT_SMOOTHING: f64 = 0.9;

/// Tags that get a smoothed line (ms-swift passes `['train/loss']`).
pub const SMOOTHED_TAGS: &[&str] = &["train/loss"];

type Rgb = [u8; 3];

/// The image file name ms-swift gives a tag: `train/loss` -> `train_loss.png`.
pub fn image_file_name(tag: &str) -> String {
    format!("{}.png", tag.replace(['/', '.'], "_"))
}

/// TensorBoard's (and ms-swift's) debiased exponential moving average: point `i` is the
/// `smooth`-weighted mean of points `0..=i`, so the curve starts at the first value.
pub fn tensorboard_smoothing(values: &[f64], smooth: f64) -> Vec<f64> {
    let mut weighted = 0.0;
    let mut norm = 0.0;
    values
        .iter()
        .map(|&v| {
            if !v.is_finite() {
                return v;
            }
            weighted = weighted * smooth + v;
            norm = norm * smooth + 1.0;
            weighted / norm
        })
        .collect()
}

/// Writes every non-empty series of `history` (tag -> (step, value) points) to
/// `images_dir/<tag with / and . as _>.png`, smoothing the [`SMOOTHED_TAGS`]. Returns the files
/// written.
pub fn write_images(
    images_dir: impl AsRef<Path>,
    history: &BTreeMap<String, Vec<(u64, f64)>>,
) -> io::Result<Vec<PathBuf>> {
    let dir = images_dir.as_ref();
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (tag, points) in history {
        if points.is_empty() {
            continue;
        }
        let smooth = SMOOTHED_TAGS
            .contains(&tag.as_str())
            .then_some(DEFAULT_SMOOTHING);
        let path = dir.join(image_file_name(tag));
        write_curve(&path, tag, points, smooth)?;
        written.push(path);
    }
    Ok(written)
}

/// Draws `points` (step, value) under `title` and writes the PNG to `path` atomically. With
/// `smooth`, the raw line is drawn pale and the smoothed one on top.
pub fn write_curve(
    path: impl AsRef<Path>,
    title: &str,
    points: &[(u64, f64)],
    smooth: Option<f64>,
) -> io::Result<()> {
    let canvas = render_curve(title, points, smooth).canvas;
    write_png_atomically(path.as_ref(), &canvas)
}

fn write_png_atomically(path: &Path, canvas: &Canvas) -> io::Result<()> {
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "image path has no file name"))?
        .to_string_lossy();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let file = std::fs::File::create(&tmp)?;
        let mut encoder = png::Encoder::new(io::BufWriter::new(file), canvas.width, canvas.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().map_err(io::Error::other)?;
        writer
            .write_image_data(&canvas.pixels)
            .map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

// ---- rendering -----------------------------------------------------------------------------

/// An RGB8 image, row-major.
pub(crate) struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        let mut pixels = Vec::with_capacity((width * height * 3) as usize);
        for _ in 0..width * height {
            pixels.extend_from_slice(&BACKGROUND);
        }
        Self {
            width,
            height,
            pixels,
        }
    }

    #[cfg(test)]
    pub(crate) fn pixel(&self, x: u32, y: u32) -> Rgb {
        let i = ((y * self.width + x) * 3) as usize;
        [self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]]
    }

    /// Mixes `color` into pixel (x, y) with opacity `alpha`; off-canvas is ignored.
    fn blend(&mut self, x: i64, y: i64, color: Rgb, alpha: f64) {
        if x < 0 || y < 0 || x >= self.width as i64 || y >= self.height as i64 || alpha <= 0.0 {
            return;
        }
        let alpha = alpha.min(1.0);
        let i = ((y as u32 * self.width + x as u32) * 3) as usize;
        for (c, &target) in self.pixels[i..i + 3].iter_mut().zip(&color) {
            *c = (*c as f64 * (1.0 - alpha) + target as f64 * alpha).round() as u8;
        }
    }

    fn fill_rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: Rgb) {
        for y in y0..=y1 {
            for x in x0..=x1 {
                self.blend(x, y, color, 1.0);
            }
        }
    }

    /// An anti-aliased line about `width` pixels wide: samples along the segment, each
    /// splatted bilinearly onto the pixels around it.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: Rgb, width: f64) {
        let length = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
        let samples = (length * 3.0).ceil().max(1.0) as usize;
        // Perpendicular offsets make the line `width` wide.
        let (nx, ny) = if length > 0.0 {
            (-(y1 - y0) / length, (x1 - x0) / length)
        } else {
            (0.0, 1.0)
        };
        let offsets: Vec<f64> = {
            let n = (width * 2.0).ceil().max(1.0) as usize;
            (0..n)
                .map(|i| (i as f64 + 0.5) / n as f64 * width - width / 2.0)
                .collect()
        };
        let mut coverage = std::collections::HashMap::<(i64, i64), f64>::new();
        for s in 0..=samples {
            let t = s as f64 / samples as f64;
            for off in &offsets {
                let x = x0 + (x1 - x0) * t + nx * off;
                let y = y0 + (y1 - y0) * t + ny * off;
                let (fx, fy) = (x.floor(), y.floor());
                let (dx, dy) = (x - fx, y - fy);
                for (px, py, w) in [
                    (fx, fy, (1.0 - dx) * (1.0 - dy)),
                    (fx + 1.0, fy, dx * (1.0 - dy)),
                    (fx, fy + 1.0, (1.0 - dx) * dy),
                    (fx + 1.0, fy + 1.0, dx * dy),
                ] {
                    let cell = coverage.entry((px as i64, py as i64)).or_insert(0.0);
                    *cell = cell.max(w * 2.0);
                }
            }
        }
        for ((x, y), alpha) in coverage {
            self.blend(x, y, color, alpha);
        }
    }

    fn disc(&mut self, (cx, cy): (f64, f64), radius: f64, color: Rgb) {
        let r = radius.ceil() as i64 + 1;
        for y in cy as i64 - r..=cy as i64 + r {
            for x in cx as i64 - r..=cx as i64 + r {
                let d = ((x as f64 + 0.5 - cx).powi(2) + (y as f64 + 0.5 - cy).powi(2)).sqrt();
                self.blend(x, y, color, (radius + 0.5 - d).clamp(0.0, 1.0));
            }
        }
    }

    /// Text in the 5x7 font scaled by `scale`, top-left at (x, y).
    fn text(&mut self, x: i64, y: i64, text: &str, scale: i64, color: Rgb) {
        for (i, ch) in text.chars().enumerate() {
            let glyph = glyph(ch);
            let left = x + i as i64 * 6 * scale;
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..5 {
                    if bits & (0b10000 >> col) != 0 {
                        let (px, py) = (left + col * scale, y + row as i64 * scale);
                        self.fill_rect(px, py, px + scale - 1, py + scale - 1, color);
                    }
                }
            }
        }
    }
}

/// Width in pixels of `text` at `scale`.
fn text_width(text: &str, scale: i64) -> i64 {
    (text.chars().count() as i64 * 6 - 1).max(0) * scale
}

/// The data window and where it lands on the canvas.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Frame {
    x_range: (f64, f64),
    y_range: (f64, f64),
    /// Plot area in pixels: left, top, right, bottom.
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
}

impl Frame {
    pub(crate) fn to_pixel(self, x: f64, y: f64) -> (f64, f64) {
        let fx = (x - self.x_range.0) / (self.x_range.1 - self.x_range.0);
        let fy = (y - self.y_range.0) / (self.y_range.1 - self.y_range.0);
        (
            self.left + fx * (self.right - self.left),
            self.bottom - fy * (self.bottom - self.top),
        )
    }
}

pub(crate) struct Rendered {
    pub(crate) canvas: Canvas,
    /// Where data points land; read by tests.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) frame: Frame,
}

/// A "nice" tick spacing (1, 2 or 5 times a power of ten) giving about `target` ticks.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = span / target;
    let magnitude = 10f64.powf(raw.log10().floor());
    let fraction = raw / magnitude;
    let nice = if fraction < 1.5 {
        1.0
    } else if fraction < 3.0 {
        2.0
    } else if fraction < 7.0 {
        5.0
    } else {
        10.0
    };
    nice * magnitude
}

/// The multiples of `step` inside `range` (at most a few dozen, whatever rounding does).
fn ticks(range: (f64, f64), step: f64) -> impl Iterator<Item = f64> {
    let first = (range.0 / step).ceil();
    let count = ((range.1 / step).floor() - first).clamp(-1.0, 40.0);
    (0..(count + 1.0) as usize).map(move |k| (first + k as f64) * step)
}

/// Labels for `ticks` spaced `step` apart, all in one notation: plain decimals with as many
/// places as the step needs, or scientific notation (with a shared mantissa precision) when the
/// axis is tiny or huge (learning rates).
fn tick_labels(ticks: &[f64], step: f64) -> Vec<String> {
    let ticks: Vec<f64> = ticks
        .iter()
        .map(|&v| if v.abs() < step * 1e-6 { 0.0 } else { v })
        .collect();
    let max_abs = ticks.iter().fold(0f64, |m, v| m.max(v.abs()));
    if max_abs > 0.0 && !(1e-3..1e6).contains(&max_abs) {
        let digits = ticks
            .iter()
            .filter(|v| **v != 0.0)
            .map(|v| ((v.abs() / step).log10() - 1e-9).ceil().clamp(0.0, 4.0) as usize)
            .max()
            .unwrap_or(0);
        return ticks
            .iter()
            .map(|&v| {
                if v == 0.0 {
                    "0".to_string()
                } else {
                    format!("{v:.digits$e}").to_uppercase()
                }
            })
            .collect();
    }
    let decimals = (-step.log10() - 1e-9).ceil().max(0.0) as usize;
    ticks.iter().map(|v| format!("{v:.decimals$}")).collect()
}

/// Padded value range of the finite values, never empty.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * lo.abs().max(1.0) {
        let pad = (lo.abs() * 0.1).max(1e-3);
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

pub(crate) fn render_curve(title: &str, points: &[(u64, f64)], smooth: Option<f64>) -> Rendered {
    let mut canvas = Canvas::new(WIDTH, HEIGHT);
    let values: Vec<f64> = points.iter().map(|&(_, v)| v).collect();
    let smoothed = match smooth {
        Some(s) if points.len() > 1 => Some(tensorboard_smoothing(&values, s)),
        _ => None,
    };
    let y_range = padded_range(values.iter().copied());
    let x_range = match (points.first(), points.last()) {
        (Some(&(first, _)), Some(&(last, _))) if last > first => {
            let pad = (last - first) as f64 * 0.03;
            (first as f64 - pad, last as f64 + pad)
        }
        (Some(&(only, _)), _) => (only as f64 - 1.0, only as f64 + 1.0),
        _ => (0.0, 1.0),
    };
    let frame = Frame {
        x_range,
        y_range,
        left: 100.0,
        top: 50.0,
        right: WIDTH as f64 - 30.0,
        bottom: HEIGHT as f64 - 50.0,
    };

    // Grid and tick labels.
    let y_step = nice_step(y_range.1 - y_range.0, 6.0);
    let y_ticks: Vec<f64> = ticks(y_range, y_step).collect();
    for (&tick, label) in y_ticks.iter().zip(tick_labels(&y_ticks, y_step)) {
        let (_, py) = frame.to_pixel(x_range.0, tick);
        let py = py.round() as i64;
        canvas.fill_rect(frame.left as i64, py, frame.right as i64, py, GRID_COLOR);
        canvas.fill_rect(
            frame.left as i64 - 5,
            py,
            frame.left as i64 - 1,
            py,
            AXIS_COLOR,
        );
        canvas.text(
            frame.left as i64 - 10 - text_width(&label, 2),
            py - 7,
            &label,
            2,
            TEXT_COLOR,
        );
    }
    let x_step = nice_step(x_range.1 - x_range.0, 7.0).max(1.0);
    let x_ticks: Vec<f64> = ticks(x_range, x_step).collect();
    for (&tick, label) in x_ticks.iter().zip(tick_labels(&x_ticks, x_step)) {
        let (px, _) = frame.to_pixel(tick, y_range.0);
        let px = px.round() as i64;
        canvas.fill_rect(px, frame.top as i64, px, frame.bottom as i64, GRID_COLOR);
        canvas.fill_rect(
            px,
            frame.bottom as i64 + 1,
            px,
            frame.bottom as i64 + 5,
            AXIS_COLOR,
        );
        canvas.text(
            px - text_width(&label, 2) / 2,
            frame.bottom as i64 + 10,
            &label,
            2,
            TEXT_COLOR,
        );
    }

    // Frame and title.
    let (l, t, r, b) = (
        frame.left as i64,
        frame.top as i64,
        frame.right as i64,
        frame.bottom as i64,
    );
    canvas.fill_rect(l, t, r, t, AXIS_COLOR);
    canvas.fill_rect(l, b, r, b, AXIS_COLOR);
    canvas.fill_rect(l, t, l, b, AXIS_COLOR);
    canvas.fill_rect(r, t, r, b, AXIS_COLOR);
    let title = title.to_uppercase();
    canvas.text(
        (WIDTH as i64 - text_width(&title, 3)) / 2,
        12,
        &title,
        3,
        TEXT_COLOR,
    );

    // Curves: a single point is a dot; non-finite values break the line.
    let draw_series = |canvas: &mut Canvas, series: &[f64], color: Rgb| {
        let mut previous: Option<(f64, f64)> = None;
        for (&(step, _), &v) in points.iter().zip(series) {
            if !v.is_finite() {
                previous = None;
                continue;
            }
            let p = frame.to_pixel(step as f64, v);
            if let Some(prev) = previous {
                canvas.line(prev, p, color, 2.0);
            }
            previous = Some(p);
        }
    };
    if points.len() == 1 {
        if values[0].is_finite() {
            canvas.disc(
                frame.to_pixel(points[0].0 as f64, values[0]),
                4.0,
                LINE_COLOR,
            );
        }
    } else if let Some(smoothed) = &smoothed {
        draw_series(&mut canvas, &values, RAW_COLOR);
        draw_series(&mut canvas, smoothed, LINE_COLOR);
    } else {
        draw_series(&mut canvas, &values, LINE_COLOR);
    }
    Rendered { canvas, frame }
}

// ---- font ----------------------------------------------------------------------------------

/// 5x7 glyphs, one row per byte, bit 4 the leftmost column. Lowercase letters draw as
/// uppercase; anything unknown as '?'.
fn glyph(ch: char) -> [u8; 7] {
    match ch.to_ascii_uppercase() {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '/' => [0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00],
        '_' => [0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F],
        ':' => [0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00],
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        ' ' => [0x00; 7],
        'A' => [0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'B' => [0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E],
        'C' => [0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E],
        'D' => [0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C],
        'E' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F],
        'F' => [0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10],
        'G' => [0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F],
        'H' => [0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11],
        'I' => [0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'J' => [0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C],
        'K' => [0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11],
        'L' => [0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F],
        'M' => [0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11],
        'N' => [0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11],
        'O' => [0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'P' => [0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10],
        'Q' => [0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D],
        'R' => [0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11],
        'S' => [0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E],
        'T' => [0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04],
        'U' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E],
        'V' => [0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04],
        'W' => [0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A],
        'X' => [0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11],
        'Y' => [0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04],
        'Z' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F],
        _ => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("whet-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn decode(path: &Path) -> (png::OutputInfo, Vec<u8>) {
        let decoder = png::Decoder::new(io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info, buf)
    }

    #[test]
    fn smoothing_matches_ms_swift() {
        // ms-swift's tensorboard_smoothing([1, 2, 3], 0.9):
        // 1, (0.9 + 2) / 1.9, (2.61 + 3) / 2.71.
        let s = tensorboard_smoothing(&[1.0, 2.0, 3.0], 0.9);
        let expected = [1.0, 2.9 / 1.9, 5.61 / 2.71];
        for (a, b) in s.iter().zip(expected) {
            assert!((a - b).abs() < 1e-12, "{s:?}");
        }
        assert!(tensorboard_smoothing(&[], 0.9).is_empty());
    }

    #[test]
    fn tick_labels_share_a_notation() {
        assert_eq!(tick_labels(&[0.0, 0.5, 1.0], 0.5), ["0.0", "0.5", "1.0"]);
        assert_eq!(
            tick_labels(&[0.0, 200.0, 400.0], 200.0),
            ["0", "200", "400"]
        );
        assert_eq!(
            tick_labels(&[0.0, 2e-5, 4e-5, 1e-4], 2e-5),
            ["0", "2.0E-5", "4.0E-5", "1.0E-4"]
        );
        assert_eq!(tick_labels(&[0.1, 0.2, 0.3], 0.1), ["0.1", "0.2", "0.3"]);
    }

    #[test]
    fn file_names_follow_ms_swift() {
        assert_eq!(image_file_name("train/loss"), "train_loss.png");
        assert_eq!(image_file_name("eval/token_acc"), "eval_token_acc.png");
        assert_eq!(
            image_file_name("train/rewards/acc.v2"),
            "train_rewards_acc_v2.png"
        );
    }

    #[test]
    fn png_decodes_and_curve_is_drawn() {
        let dir = temp_dir("curve");
        let points: Vec<(u64, f64)> = (1..=50).map(|s| (s, 3.0 / (s as f64).sqrt())).collect();
        let path = dir.join("train_loss.png");
        write_curve(&path, "train/loss", &points, Some(0.9)).unwrap();
        let (info, pixels) = decode(&path);
        assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "temporary file left: {leftovers:?}");

        // Near every smoothed point there is a pixel close to the line colour; the raw line too.
        let rendered = render_curve("train/loss", &points, Some(0.9));
        assert_eq!(
            rendered.canvas.pixels, pixels,
            "file holds the rendered image"
        );
        let values: Vec<f64> = points.iter().map(|p| p.1).collect();
        let smoothed = tensorboard_smoothing(&values, 0.9);
        let near = |x: f64, y: f64, color: Rgb| {
            let (px, py) = rendered.frame.to_pixel(x, y);
            (-1..=1).any(|dy| {
                (-1..=1).any(|dx| {
                    let p = rendered
                        .canvas
                        .pixel((px as i64 + dx) as u32, (py as i64 + dy) as u32);
                    p.iter()
                        .zip(&color)
                        .all(|(&a, &b)| (a as i32 - b as i32).abs() <= 24)
                })
            })
        };
        for (&(step, _), &s) in points.iter().zip(&smoothed) {
            assert!(
                near(step as f64, s, LINE_COLOR),
                "smoothed line missing at step {step}"
            );
        }
        // Far from the smoothed curve (early steps), the pale raw line is visible.
        assert!(
            near(points[3].0 as f64, values[3], RAW_COLOR)
                || near(points[3].0 as f64, values[3], LINE_COLOR)
        );
        // Some pixels are not background, most are.
        let non_background = pixels.chunks(3).filter(|p| *p != BACKGROUND).count();
        assert!(non_background > 2000 && non_background < (WIDTH * HEIGHT / 2) as usize);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn degenerate_series_do_not_panic() {
        let dir = temp_dir("degenerate");
        for (name, points) in [
            ("empty", vec![]),
            ("one", vec![(7u64, 0.5)]),
            ("flat", vec![(1, 2.0), (2, 2.0), (3, 2.0)]),
            ("same_step", vec![(4, 1.0), (4, 2.0)]),
            (
                "nan",
                vec![(1, 1.0), (2, f64::NAN), (3, f64::INFINITY), (4, 0.5)],
            ),
            ("tiny_lr", vec![(1, 1e-7), (2, 3e-5), (3, 1e-4)]),
            ("huge", vec![(0, -1e12), (1_000_000, 1e12)]),
        ] {
            let path = dir.join(format!("{name}.png"));
            write_curve(&path, name, &points, Some(0.9)).unwrap();
            let (info, _) = decode(&path);
            assert_eq!((info.width, info.height), (WIDTH, HEIGHT), "{name}");
        }
        // A single point is a dot in the line colour.
        let rendered = render_curve("x", &[(7, 0.5)], None);
        let (px, py) = rendered.frame.to_pixel(7.0, 0.5);
        assert_eq!(rendered.canvas.pixel(px as u32, py as u32), LINE_COLOR);
        std::fs::remove_dir_all(dir).ok();
    }

    #[test]
    fn write_images_names_files_by_tag() {
        let dir = temp_dir("images");
        let mut history = BTreeMap::new();
        history.insert("train/loss".to_string(), vec![(1, 2.0), (2, 1.5)]);
        history.insert(
            "train/learning_rate".to_string(),
            vec![(1, 1e-4), (2, 9e-5)],
        );
        history.insert("eval/token_acc".to_string(), vec![(2, 0.3)]);
        history.insert("eval/loss".to_string(), vec![]);
        let images = dir.join("images");
        let written = write_images(&images, &history).unwrap();
        let mut names: Vec<String> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "eval_token_acc.png",
                "train_learning_rate.png",
                "train_loss.png"
            ]
        );
        std::fs::remove_dir_all(dir).ok();
    }
}
