//! Charts: line charts and grouped bars, and Pareto fronts over objectives. A training run's
//! charts (loss and eval-loss curves, learning rate, gradient norm, DPO reward margins and
//! accuracies, the explicit-reward share, the reward model's per-objective quality) are drawn
//! from its files; reports draw theirs from their own typed values. SVG always (text stays
//! text, no fonts needed); PNG with the `png` feature.

use crate::util::io::write_atomic;
use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (720, 420);
/// One scatter panel of the Pareto pairs grid (when there is more than one panel).
const PANEL: (u32, u32) = (400, 340);
/// Title plus legend strip above the Pareto charts.
const PARETO_HEADER: u32 = 64;
/// Horizontal room per objective axis in the parallel-coordinates chart.
const PARALLEL_AXIS_GAP: u32 = 170;
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

type Series = Vec<(f64, f64)>;

/// Reads metrics.jsonl into name -> [(step, value)].
pub fn read_metrics(path: &Path) -> Result<BTreeMap<String, Series>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out: BTreeMap<String, Series> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(obj) = v.as_object() {
            for (k, x) in obj {
                if let (Some(x), false) = (x.as_f64(), k == "step" || k == "epoch") {
                    out.entry(k.clone()).or_default().push((step, x));
                }
            }
        }
    }
    Ok(out)
}

fn bounds(series: &[(&str, &Series)]) -> Option<((f64, f64), (f64, f64))> {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s.iter().copied())
        .filter(|(_, y)| y.is_finite())
        .collect();
    if pts.is_empty() {
        return None;
    }
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-9);
    Some(((x0, x1), (y0 - pad, y1 + pad)))
}

/// A line chart of named series over steps, drawn on any plotters backend.
fn draw_lines<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    y_label: &str,
    series: &[(&str, &Series)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let Some(((x0, x1), (y0, y1))) = bounds(series) else {
        return Ok(());
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(y_label)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s.iter().copied().filter(|(_, y)| y.is_finite()).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        if pts.len() <= 30 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Grouped bars: one group per label, one bar per series.
fn draw_bars<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    labels: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .collect();
    let y1 = all.iter().copied().fold(0.0f64, f64::max).max(1e-9) * 1.15;
    let y0 = all.iter().copied().fold(0.0f64, f64::min) * 1.15;
    let n = labels.len().max(1);
    let k = series.len().max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..n as f64, y0..y1)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let names = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.26 {
                names.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    for (j, (name, values)) in series.iter().enumerate() {
        let color = COLORS[j % COLORS.len()];
        let w = 0.8 / k;
        let bars = values
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_finite())
            .map(move |(i, &v)| {
                let x = i as f64 + 0.1 + j as f64 * w;
                Rectangle::new([(x, 0.0), (x + w * 0.95, v)], color.filled())
            });
        chart
            .draw_series(bars)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// What to draw: a line chart or grouped bars.
pub enum Chart<'a> {
    Lines {
        title: &'a str,
        y_label: &'a str,
        series: Vec<(&'a str, &'a Series)>,
    },
    Bars {
        title: &'a str,
        labels: Vec<String>,
        series: Vec<(&'a str, Vec<f64>)>,
    },
    /// Scatter panels, one per pair of objectives.
    ParetoPairs {
        objectives: &'a [String],
        points: &'a [ParetoPoint],
    },
    /// Parallel coordinates, one vertical axis per objective.
    ParetoParallel {
        objectives: &'a [String],
        points: &'a [ParetoPoint],
    },
}

impl Chart<'_> {
    /// Canvas size in pixels: the Pareto charts grow with the number of objectives.
    fn size(&self) -> (u32, u32) {
        match self {
            Chart::Lines { .. } | Chart::Bars { .. } => SIZE,
            Chart::ParetoPairs { objectives, .. } => {
                let (rows, cols) = grid_shape(pair_count(objectives.len()));
                let panel = if rows * cols == 1 { SIZE } else { PANEL };
                (panel.0 * cols as u32, panel.1 * rows as u32 + PARETO_HEADER)
            }
            Chart::ParetoParallel { objectives, .. } => (
                SIZE.0.max(PARALLEL_AXIS_GAP * objectives.len() as u32),
                SIZE.1 + PARETO_HEADER,
            ),
        }
    }
}

/// Draws `chart` on any plotters backend (SVG and PNG share this).
fn draw_chart<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    chart: &Chart,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    match chart {
        Chart::Lines {
            title,
            y_label,
            series,
        } => draw_lines(root, title, y_label, series),
        Chart::Bars {
            title,
            labels,
            series,
        } => draw_bars(root, title, labels, series),
        Chart::ParetoPairs { objectives, points } => draw_pareto(
            root,
            objectives,
            points,
            "Pareto fronts by pair of objectives",
            "filled: on the policy's front, hollow: dominated; bars: 95% interval",
            draw_pareto_pairs,
        ),
        Chart::ParetoParallel { objectives, points } => draw_pareto(
            root,
            objectives,
            points,
            "Pareto fronts, parallel coordinates",
            "bold: on the policy's front, faint: dominated",
            draw_pareto_parallel,
        ),
    }
}

/// Writes `chart` as `<dir>/<name>.svg` (and `.png` when asked); returns the paths written.
pub fn write_chart(dir: &Path, name: &str, chart: &Chart, png: bool) -> Result<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, chart.size()).into_drawing_area();
        draw_chart(root, chart)?;
    }
    let path = dir.join(format!("{name}.svg"));
    write_atomic(&path, svg.as_bytes())?;
    let mut out = vec![path];
    if png {
        out.push(write_png(dir, name, chart)?);
    }
    Ok(out)
}

#[cfg(feature = "png")]
fn write_png(dir: &Path, name: &str, chart: &Chart) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.png"));
    // The encoder picks the format from the extension, so the temporary name must end in .png.
    let tmp = dir.join(format!(".{name}.tmp-{}.png", std::process::id()));
    let drawn = {
        let root = BitMapBackend::new(&tmp, chart.size()).into_drawing_area();
        draw_chart(root, chart)
    };
    if let Err(e) = drawn {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

#[cfg(not(feature = "png"))]
fn write_png(_dir: &Path, _name: &str, _chart: &Chart) -> Result<PathBuf> {
    anyhow::bail!("PNG output needs a build with `--features png`; SVG files were written")
}

/// Draws every chart a training run's files support (metrics.jsonl, rm_report.json); returns
/// the files written.
pub fn plot_run(dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
    let mut written = vec![];
    let metrics_path = dir.join("metrics.jsonl");
    if metrics_path.is_file() {
        let m = read_metrics(&metrics_path)?;
        let pick = |names: &[&'static str]| -> Vec<(&'static str, &Series)> {
            names
                .iter()
                .filter_map(|n| m.get(*n).map(|s| (*n, s)))
                .collect()
        };
        let charts = [
            ("loss", "loss", "loss", pick(&["loss", "eval_loss"])),
            ("lr", "learning rate", "lr", pick(&["lr"])),
            (
                "grad_norm",
                "gradient norm (before clipping)",
                "norm",
                pick(&["grad_norm"]),
            ),
            (
                "dpo_rewards",
                "implicit rewards",
                "beta * log-ratio",
                pick(&[
                    "rewards/chosen",
                    "rewards/rejected",
                    "rewards/margins",
                    "eval_rewards/margins",
                ]),
            ),
            (
                "dpo_accuracy",
                "preference accuracy",
                "fraction",
                pick(&["rewards/accuracies", "eval_rewards/accuracies"]),
            ),
            (
                "explicit_reward",
                "explicit reward term",
                "value",
                pick(&["explicit/margin", "explicit/share"]),
            ),
        ];
        for (name, title, y, series) in charts {
            if !series.is_empty() {
                written.extend(write_chart(
                    dir,
                    name,
                    &Chart::Lines {
                        title,
                        y_label: y,
                        series,
                    },
                    png,
                )?);
            }
        }
    }
    Ok(written)
}

/// One evaluated weighting of one policy in objective space (every objective maximised).
#[derive(Debug, Clone)]
pub struct ParetoPoint {
    /// e.g. "w=(0.50, 0.25, 0.25, 0.00)"
    pub label: String,
    /// Which policy produced it, e.g. "conditioned", "separate", "soup"; one colour per policy.
    pub policy: String,
    /// Mean score per objective.
    pub means: Vec<f64>,
    /// Half-width of the 95% interval per objective (may be 0).
    pub half_widths: Vec<f64>,
    /// Whether the point is on the non-dominated front of all points of its policy.
    pub on_front: bool,
}

/// Writes `<dir>/pareto_pairs.svg` (a grid of scatter plots, one panel per pair of objectives,
/// k*(k-1)/2 panels: x = objective i, y = objective j; every point drawn with its 95% interval as
/// error bars, front points filled and larger, others hollow/smaller; one colour per policy with a
/// legend) and `<dir>/pareto_parallel.svg` (parallel coordinates: one vertical axis per objective,
/// each point a polyline across the axes, front points drawn bold/opaque and the rest faint; one
/// colour per policy; legend). With `png`, also the .png of each (same pattern as `write_chart`).
/// Returns the paths written. Errors (not panics) on empty `points`, fewer than 2 objectives, or a
/// point whose `means` length differs from `objectives.len()`. Missing, negative or non-finite
/// half-widths count as 0; points with non-finite means are left out of the panels they fall in.
pub fn write_pareto_plots(
    dir: &Path,
    objectives: &[String],
    points: &[ParetoPoint],
    png: bool,
) -> Result<Vec<PathBuf>> {
    check_pareto_input(objectives, points)?;
    let charts = [
        ("pareto_pairs", Chart::ParetoPairs { objectives, points }),
        (
            "pareto_parallel",
            Chart::ParetoParallel { objectives, points },
        ),
    ];
    // Both SVGs first: a build without the `png` feature errors on the PNG, and its message
    // promises that the SVG files exist.
    let mut out = vec![];
    for (name, chart) in &charts {
        out.extend(write_chart(dir, name, chart, false)?);
    }
    if png {
        for (name, chart) in &charts {
            out.push(write_png(dir, name, chart)?);
        }
    }
    Ok(out)
}

fn check_pareto_input(objectives: &[String], points: &[ParetoPoint]) -> Result<()> {
    anyhow::ensure!(!points.is_empty(), "Pareto plots need at least one point");
    anyhow::ensure!(
        objectives.len() >= 2,
        "Pareto plots need at least 2 objectives, got {}",
        objectives.len()
    );
    for p in points {
        anyhow::ensure!(
            p.means.len() == objectives.len(),
            "Pareto point {} of policy {}: {} means for {} objectives",
            p.label,
            p.policy,
            p.means.len(),
            objectives.len()
        );
    }
    Ok(())
}

fn pair_count(k: usize) -> usize {
    k * k.saturating_sub(1) / 2
}

/// (rows, cols) for `n` panels: as square as possible, never taller than wide.
fn grid_shape(n: usize) -> (usize, usize) {
    let n = n.max(1);
    let cols = (1..=n).find(|c| c * c >= n).unwrap_or(n);
    (n.div_ceil(cols), cols)
}

/// Policies in order of first appearance, so colours follow the caller's order.
fn policy_order(points: &[ParetoPoint]) -> Vec<&str> {
    let mut out: Vec<&str> = vec![];
    for p in points {
        if !out.contains(&p.policy.as_str()) {
            out.push(&p.policy);
        }
    }
    out
}

fn policy_color(policies: &[&str], policy: &str) -> RGBColor {
    let i = policies.iter().position(|p| *p == policy).unwrap_or(0);
    COLORS[i % COLORS.len()]
}

fn half_width(p: &ParetoPoint, i: usize) -> f64 {
    p.half_widths
        .get(i)
        .copied()
        .filter(|h| h.is_finite() && *h > 0.0)
        .unwrap_or(0.0)
}

/// Padded range of the finite values; never empty, so a constant objective still gets an axis.
fn padded_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.08
    } else {
        (lo.abs() * 0.1).max(0.05)
    };
    (lo - pad, hi + pad)
}

/// Enough decimals that the two ends of an axis spanning `span` read differently.
fn axis_value(v: f64, span: f64) -> String {
    let decimals = (2.0 - span.log10().floor()).clamp(0.0, 8.0) as usize;
    format!("{v:.decimals$}")
}

/// The body of a Pareto chart, drawn on the area below its header; the policies are in the
/// colours' order.
type ParetoBody<DB> = fn(&DrawingArea<DB, Shift>, &[String], &[ParetoPoint], &[&str]) -> Result<()>;

/// A Pareto chart: the points checked, a header with `title` and a legend of the policies
/// (in order of first appearance) ending in `note`, and `body` below it.
fn draw_pareto<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    objectives: &[String],
    points: &[ParetoPoint],
    title: &str,
    note: &str,
    body: ParetoBody<DB>,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    check_pareto_input(objectives, points)?;
    let policies = policy_order(points);
    let area = pareto_header(&root, title, &policies, note)?;
    body(&area, objectives, points, &policies)?;
    root.present().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(())
}

/// Fills `root`, draws the title and a legend strip (one entry per policy plus `note`), and
/// returns the area left for the chart itself.
fn pareto_header<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    policies: &[&str],
    note: &str,
) -> Result<DrawingArea<DB, Shift>>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let (header, body) = root.split_vertically(PARETO_HEADER);
    let legend = header
        .titled(title, ("sans-serif", 20))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let grey = RGBColor(90, 90, 90);
    let style =
        TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let y = legend.dim_in_pixel().1 as i32 / 2;
    let mut x = 16;
    for (i, name) in policies.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        legend
            .draw(&Circle::new((x, y), 5, color.filled()))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        legend
            .draw_text(name, &style, (x + 10, y))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let (w, _) = legend
            .estimate_text_size(name, &style)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        x += 10 + w as i32 + 24;
    }
    legend
        .draw_text(note, &style.color(&grey), (x + 8, y))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    Ok(body)
}

/// Grid of scatter panels on `body`, one per pair of objectives.
fn draw_pareto_pairs<DB: DrawingBackend>(
    body: &DrawingArea<DB, Shift>,
    objectives: &[String],
    points: &[ParetoPoint],
    policies: &[&str],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let k = objectives.len();
    // One range per objective, shared by every panel it appears in, so panels compare directly.
    let ranges: Vec<(f64, f64)> = (0..k)
        .map(|i| {
            padded_range(points.iter().flat_map(|p| {
                let h = half_width(p, i);
                [p.means[i] - h, p.means[i] + h]
            }))
        })
        .collect();
    let pairs: Vec<(usize, usize)> = (0..k)
        .flat_map(|i| (i + 1..k).map(move |j| (i, j)))
        .collect();
    let panels = body.split_evenly(grid_shape(pairs.len()));
    for (&(i, j), panel) in pairs.iter().zip(&panels) {
        let (x0, x1) = ranges[i];
        let (y0, y1) = ranges[j];
        let mut chart = ChartBuilder::on(panel)
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        chart
            .configure_mesh()
            .x_desc(objectives[i].as_str())
            .y_desc(objectives[j].as_str())
            .x_labels(5)
            .y_labels(5)
            .draw()
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let area = chart.plotting_area();
        // Dominated points first, so the front is drawn on top of them.
        for front in [false, true] {
            for p in points.iter().filter(|p| p.on_front == front) {
                let (x, y) = (p.means[i], p.means[j]);
                if !(x.is_finite() && y.is_finite()) {
                    continue;
                }
                let color = policy_color(policies, &p.policy);
                let style = if front {
                    color.stroke_width(2)
                } else {
                    color.mix(0.5).stroke_width(1)
                };
                let (hx, hy) = (half_width(p, i), half_width(p, j));
                for bar in [[(x - hx, y), (x + hx, y)], [(x, y - hy), (x, y + hy)]] {
                    if bar[0] != bar[1] {
                        area.draw(&PathElement::new(bar.to_vec(), style))
                            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    }
                }
                let marker = if front {
                    Circle::new((x, y), 5, color.filled())
                } else {
                    Circle::new((x, y), 3, color.stroke_width(1))
                };
                area.draw(&marker).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
    }
    Ok(())
}

/// Parallel coordinates on `body`: one vertical axis per objective, one polyline per point.
fn draw_pareto_parallel<DB: DrawingBackend>(
    body: &DrawingArea<DB, Shift>,
    objectives: &[String],
    points: &[ParetoPoint],
    policies: &[&str],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let k = objectives.len();
    // Each axis spans its own objective's range, so objectives on different scales share a chart.
    let ranges: Vec<(f64, f64)> = (0..k)
        .map(|i| padded_range(points.iter().map(|p| p.means[i])))
        .collect();
    let last = (k - 1) as f64;
    // The y range reaches below 0 and above 1 to leave room for the axis labels.
    let chart = ChartBuilder::on(body)
        .margin(16)
        .build_cartesian_2d(-0.3..last + 0.3, -0.22..1.1)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let area = chart.plotting_area();
    let font = ("sans-serif", 13).into_font();
    let above = TextStyle::from(font.clone()).pos(Pos::new(HPos::Center, VPos::Bottom));
    let below = TextStyle::from(font).pos(Pos::new(HPos::Center, VPos::Top));
    let name_style = TextStyle::from(("sans-serif", 15).into_font().style(FontStyle::Bold))
        .pos(Pos::new(HPos::Center, VPos::Top));
    for (i, (name, &(lo, hi))) in objectives.iter().zip(&ranges).enumerate() {
        let x = i as f64;
        let elements = [
            Text::new(axis_value(hi, hi - lo), (x, 1.02), above.clone()),
            Text::new(axis_value(lo, hi - lo), (x, -0.02), below.clone()),
            Text::new(name.clone(), (x, -0.10), name_style.clone()),
        ];
        area.draw(&PathElement::new(
            vec![(x, 0.0), (x, 1.0)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for t in &elements {
            area.draw(t).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
    }
    // Dominated points first, so the front is drawn on top of them.
    for front in [false, true] {
        for p in points.iter().filter(|p| p.on_front == front) {
            if !p.means.iter().all(|v| v.is_finite()) {
                continue;
            }
            let color = policy_color(policies, &p.policy);
            let line: Vec<(f64, f64)> = p
                .means
                .iter()
                .zip(&ranges)
                .enumerate()
                .map(|(i, (v, (lo, hi)))| (i as f64, (v - lo) / (hi - lo)))
                .collect();
            if front {
                area.draw(&PathElement::new(line.clone(), color.stroke_width(3)))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                for pt in line {
                    area.draw(&Circle::new(pt, 4, color.filled()))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                }
            } else {
                area.draw(&PathElement::new(line, color.mix(0.4).stroke_width(1)))
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mo-align-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn point(policy: &str, means: &[f64], half_widths: &[f64], on_front: bool) -> ParetoPoint {
        ParetoPoint {
            label: format!("w=({means:?})"),
            policy: policy.to_string(),
            means: means.to_vec(),
            half_widths: half_widths.to_vec(),
            on_front,
        }
    }

    fn names(k: usize) -> Vec<String> {
        ["helpfulness", "harmlessness", "honesty", "concision"][..k]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn check_svgs(paths: &[PathBuf], objectives: &[String]) {
        assert_eq!(paths.len(), 2);
        for (path, name) in paths
            .iter()
            .zip(["pareto_pairs.svg", "pareto_parallel.svg"])
        {
            assert_eq!(path.file_name().unwrap(), name);
            let text = std::fs::read_to_string(path).unwrap();
            assert!(
                text.starts_with("<svg"),
                "{}: {}",
                path.display(),
                &text[..40]
            );
            roxmltree::Document::parse(&text)
                .unwrap_or_else(|e| panic!("{}: not XML: {e}", path.display()));
            for o in objectives {
                assert!(text.contains(o.as_str()), "{}: no {o}", path.display());
            }
        }
    }

    #[test]
    fn pareto_plots_four_objectives() {
        let dir = temp_dir("pareto4");
        let objectives = names(4);
        // The last objective is constant, so its axis range must be padded out of zero width.
        let points = vec![
            point(
                "conditioned",
                &[0.8, 0.3, 0.5, 0.2],
                &[0.05, 0.04, 0.0, 0.0],
                true,
            ),
            point(
                "conditioned",
                &[0.4, 0.7, 0.6, 0.2],
                &[0.05, 0.04, 0.02, 0.0],
                true,
            ),
            point("conditioned", &[0.3, 0.2, 0.4, 0.2], &[], false),
            point(
                "separate",
                &[0.7, 0.4, 0.5, 0.2],
                &[0.1, 0.1, 0.1, 0.1],
                true,
            ),
            point("soup", &[0.5, 0.5, f64::NAN, 0.2], &[0.0; 4], false),
        ];
        let paths = write_pareto_plots(&dir, &objectives, &points, false).unwrap();
        check_svgs(&paths, &objectives);
        let pairs = std::fs::read_to_string(&paths[0]).unwrap();
        for policy in ["conditioned", "separate", "soup"] {
            assert!(pairs.contains(policy), "legend lacks {policy}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pareto_plots_two_objectives_all_equal() {
        let dir = temp_dir("pareto2");
        let objectives = names(2);
        let points = vec![
            point("soup", &[0.0, 1.0], &[0.0, 0.0], true),
            point("soup", &[0.0, 1.0], &[0.0, 0.0], true),
        ];
        let paths = write_pareto_plots(&dir, &objectives, &points, false).unwrap();
        check_svgs(&paths, &objectives);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pareto_plots_reject_bad_input() {
        let dir = temp_dir("pareto-bad");
        let two = names(2);
        let ok = point("soup", &[0.1, 0.2], &[], true);
        assert!(write_pareto_plots(&dir, &two, &[], false).is_err());
        assert!(
            write_pareto_plots(&dir, &names(1), &[point("soup", &[0.1], &[], true)], false)
                .is_err()
        );
        let short = point("soup", &[0.1], &[], true);
        assert!(write_pareto_plots(&dir, &two, &[ok.clone(), short], false).is_err());
        let long = point("soup", &[0.1, 0.2, 0.3], &[], true);
        assert!(write_pareto_plots(&dir, &two, &[ok, long], false).is_err());
        assert!(!dir.exists(), "nothing is written on bad input");
    }

    #[test]
    fn pareto_grid_shapes() {
        assert_eq!(pair_count(2), 1);
        assert_eq!(pair_count(4), 6);
        assert_eq!(grid_shape(1), (1, 1));
        assert_eq!(grid_shape(3), (2, 2));
        assert_eq!(grid_shape(6), (2, 3));
        assert_eq!(grid_shape(10), (3, 4));
    }

    #[test]
    fn padded_range_is_never_empty() {
        let (lo, hi) = padded_range([0.5, 0.5].into_iter());
        assert!(lo < 0.5 && hi > 0.5);
        let (lo, hi) = padded_range([0.0].into_iter());
        assert!(lo < 0.0 && hi > 0.0);
        assert_eq!(padded_range([f64::NAN].into_iter()), (0.0, 1.0));
    }
}
