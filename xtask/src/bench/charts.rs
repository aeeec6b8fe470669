//! PNG charts with plotters' bitmap backend. Text needs a TrueType font:
//! DejaVu Sans (Debian's fonts-dejavu-core) is registered at run time; on a
//! machine without it the charts are skipped and the report says so.
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::stats::Spread;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

const FONT: &str = "sans-serif";

/// Registers the font once; an error names the paths tried.
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps the font for the process's lifetime.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                return plotters::style::register_font(FONT, FontStyle::Normal, bytes)
                    .map_err(|_| format!("{p} is not a usable TrueType font"));
            }
        }
        Err(format!(
            "no TrueType font for the chart labels (tried {}; apt-get install fonts-dejavu-core)",
            FONT_PATHS.join(", ")
        ))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

/// Colours per series kind: ours, reference, ceiling, and spares.
pub const PALETTE: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(120, 120, 120),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

pub struct Line {
    pub label: String,
    pub color: usize,
    /// Thin and lighter (a p95/p99 companion of a median line).
    pub thin: bool,
    pub points: Vec<(f64, f64)>,
}

pub struct LinePanel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub lines: Vec<Line>,
}

/// Side-by-side line panels on linear y axes from zero: one axis for all
/// panels when `shared_y` (panels of one unit, compared), else one each.
pub fn lines(path: &Path, size: (u32, u32), panels: &[LinePanel], shared_y: bool) -> Result<()> {
    font()?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let areas = root.split_evenly((1, panels.len().max(1)));
    let all: Vec<f64> = panels
        .iter()
        .flat_map(|p| p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.1)))
        .filter(|y| y.is_finite() && *y > 0.0)
        .collect();
    if all.is_empty() {
        bail!("no data to plot");
    }
    let top = |ys: &mut dyn Iterator<Item = f64>| {
        ys.filter(|y| y.is_finite() && *y > 0.0)
            .fold(0.0f64, f64::max)
    };
    let ymax = top(&mut all.iter().copied());
    for (area, p) in areas.iter().zip(panels) {
        let own = top(&mut p.lines.iter().flat_map(|l| l.points.iter().map(|q| q.1)));
        // Linear from zero (growth and ratios read honestly), with room
        // above the lines for the legend (upper left).
        let hi = if shared_y || own <= 0.0 { ymax } else { own } * 1.35;
        let xmax = p
            .lines
            .iter()
            .flat_map(|l| l.points.iter().map(|q| q.0))
            .fold(1.0f64, f64::max);
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, (FONT, 22))
            .margin(14)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..xmax, 0f64..hi)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(p.x_desc.as_str())
            .y_desc(p.y_desc.as_str())
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 16))
            .y_labels(10)
            .y_label_formatter(&|y| short_num(*y))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.12))
            .draw()
            .map_err(err)?;
        for l in &p.lines {
            let c = PALETTE[l.color % PALETTE.len()];
            let style = if l.thin {
                c.mix(0.45).stroke_width(1)
            } else {
                c.stroke_width(3)
            };
            let pts: Vec<(f64, f64)> = l
                .points
                .iter()
                .copied()
                .filter(|q| q.1.is_finite() && q.1 > 0.0)
                .collect();
            if !l.thin && pts.len() <= 12 {
                chart
                    .draw_series(pts.iter().map(|q| Circle::new(*q, 5, c.filled())))
                    .map_err(err)?;
            }
            chart
                .draw_series(LineSeries::new(pts, style))
                .map_err(err)?
                .label(l.label.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

pub struct Bar {
    pub label: String,
    pub color: usize,
    pub value: Spread,
}

pub struct BarGroup {
    pub name: String,
    pub bars: Vec<Bar>,
}

pub struct BarPanel {
    pub title: String,
    pub y_desc: String,
    pub groups: Vec<BarGroup>,
    /// A dashed reference line (e.g. 100% of a limit).
    pub hline: Option<f64>,
}

/// Grouped bars (the median) with min–max whiskers, one panel per figure
/// cell, `cols` panels per row.
pub fn bars(path: &Path, size: (u32, u32), cols: usize, panels: &[BarPanel]) -> Result<()> {
    font()?;
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let rows = panels.len().div_ceil(cols.max(1)).max(1);
    let areas = root.split_evenly((rows, cols.max(1)));
    for (area, p) in areas.iter().zip(panels) {
        let ymax = p
            .groups
            .iter()
            .flat_map(|g| g.bars.iter())
            .filter(|b| b.value.is_valid())
            .map(|b| b.value.max)
            .fold(0.0f64, f64::max);
        let ymax = ymax.max(p.hline.unwrap_or(0.0));
        // Headroom so the legend (upper right) never covers a bar.
        let ymax = if ymax > 0.0 { ymax * 1.4 } else { 1.0 };
        let n = p.groups.len().max(1);
        let names: Vec<String> = p.groups.iter().map(|g| g.name.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, (FONT, 20))
            .margin(12)
            .x_label_area_size(35)
            .y_label_area_size(65)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), 0f64..ymax)
            .map_err(err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * 2 + 1)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    names.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| short_num(*y))
            .y_desc(p.y_desc.as_str())
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.12))
            .draw()
            .map_err(err)?;
        if let Some(h) = p.hline {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(-0.5, h), (n as f64 - 0.5, h)],
                    8,
                    5,
                    BLACK.mix(0.6).stroke_width(1),
                ))
                .map_err(err)?;
        }
        let mut legend_done = std::collections::BTreeSet::new();
        for (gi, g) in p.groups.iter().enumerate() {
            let k = g.bars.len().max(1) as f64;
            let width = 0.8 / k;
            for (bi, b) in g.bars.iter().enumerate() {
                let x0 = gi as f64 - 0.4 + bi as f64 * width;
                let x1 = x0 + width * 0.9;
                let c = PALETTE[b.color % PALETTE.len()];
                if !b.value.is_valid() {
                    chart
                        .draw_series(std::iter::once(Text::new(
                            "n/a",
                            (x0, ymax * 0.02),
                            (FONT, 13).into_font().color(&c),
                        )))
                        .map_err(err)?;
                    continue;
                }
                let s = chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x0, 0.0), (x1, b.value.median)],
                        c.filled(),
                    )))
                    .map_err(err)?;
                if legend_done.insert(b.label.clone()) {
                    s.label(b.label.as_str()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 6), (x + 14, y + 6)], c.filled())
                    });
                }
                let xm = (x0 + x1) / 2.0;
                if b.value.n > 1 {
                    chart
                        .draw_series(std::iter::once(PathElement::new(
                            vec![(xm, b.value.min), (xm, b.value.max)],
                            BLACK.stroke_width(2),
                        )))
                        .map_err(err)?;
                }
                let above = TextStyle::from((FONT, 12).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                chart
                    .draw_series(std::iter::once(Text::new(
                        short_num(b.value.median),
                        (xm, b.value.max.max(b.value.median) + ymax * 0.01),
                        above,
                    )))
                    .map_err(err)?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing: {e:?}")
}

/// 1234 -> "1.2k", 0.25 -> "0.25".
pub fn short_num(y: f64) -> String {
    let a = y.abs();
    if a >= 1e6 {
        format!("{:.1}M", y / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", y / 1e3)
    } else if a >= 1e3 {
        format!("{:.1}k", y / 1e3)
    } else if a >= 100.0 {
        format!("{y:.0}")
    } else if a >= 10.0 {
        format!("{y:.1}")
    } else if a >= 1.0 {
        format!("{y:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{y:.3}")
    }
}
