//! Plots of a run, drawn from its files: loss and eval-loss curves, learning rate, gradient
//! norm, DPO reward margins and accuracies, the explicit-reward share, the reward model's
//! per-objective quality, and per-objective scores of model vs baseline. SVG always (text stays
//! text, no fonts needed); PNG with the `png` feature.

use crate::io::write_atomic;
use anyhow::{Context, Result};
use plotters::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const SIZE: (u32, u32) = (720, 420);
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
    }
}

/// Writes `chart` as `<dir>/<name>.svg` (and `.png` when asked); returns the paths written.
pub fn write_chart(dir: &Path, name: &str, chart: &Chart, png: bool) -> Result<Vec<PathBuf>> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
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
    let tmp = dir.join(format!(".{name}.png.tmp-{}", std::process::id()));
    {
        let root = BitMapBackend::new(&tmp, SIZE).into_drawing_area();
        draw_chart(root, chart)?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(path)
}

#[cfg(not(feature = "png"))]
fn write_png(_dir: &Path, _name: &str, _chart: &Chart) -> Result<PathBuf> {
    anyhow::bail!("PNG output needs a build with `--features png`; SVG files were written")
}

/// Draws every chart a run directory's files support; returns the files written.
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
    let rm = dir.join("rm_report.json");
    if rm.is_file() {
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&rm)?)
            .with_context(|| format!("{}: not JSON", rm.display()))?;
        if let Some(v) = r["validation"].as_object() {
            let labels: Vec<String> = v.keys().cloned().collect();
            let get = |k: &str| {
                labels
                    .iter()
                    .map(|l| v[l][k].as_f64().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>()
            };
            let chart = Chart::Bars {
                title: "reward model on validation",
                labels: labels.clone(),
                series: vec![("MSE", get("mse")), ("Pearson r", get("pearson"))],
            };
            written.extend(write_chart(dir, "rm_objectives", &chart, png)?);
        }
    }
    for report in ["eval_report.json", "summary.json"] {
        let p = dir.join(report);
        if p.is_file() {
            written.extend(plot_objective_scores(&p, dir, png)?);
        }
    }
    Ok(written)
}

/// Bar chart of per-objective reward-model scores, model vs baseline, from an eval report
/// (`win_rate` object) or a pipeline summary (`stages` list).
pub fn plot_objective_scores(report: &Path, dir: &Path, png: bool) -> Result<Vec<PathBuf>> {
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report)?)
        .with_context(|| format!("{}: not JSON", report.display()))?;
    let floats = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|x| x.as_f64().unwrap_or(f64::NAN))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let strings = |v: &serde_json::Value| {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let mut out = vec![];
    if let Some(w) = r.get("win_rate") {
        let labels = strings(&w["objectives"]);
        if !labels.is_empty() {
            let chart = Chart::Bars {
                title: "reward-model scores: model vs baseline",
                labels,
                series: vec![
                    ("model", floats(&w["mean_objectives_model"])),
                    ("baseline", floats(&w["mean_objectives_baseline"])),
                ],
            };
            out.extend(write_chart(dir, "eval_objectives", &chart, png)?);
        }
    }
    if let (Some(stages), Some(judges)) = (
        r.get("stages").and_then(|s| s.as_array()),
        r.get("judges").and_then(|s| s.as_array()),
    ) {
        let names: Vec<String> = stages
            .iter()
            .map(|s| s["stage"].as_str().unwrap_or("?").to_string())
            .collect();
        let mut rates: Vec<(&str, Vec<f64>)> = vec![];
        for j in judges {
            let key = j["key"].as_str().unwrap_or("judge");
            let labels = strings(&j["objectives"]);
            if !labels.is_empty() {
                let mut series: Vec<(&str, Vec<f64>)> =
                    vec![("base", floats(&j["base_mean_objectives"]))];
                for (s, name) in stages.iter().zip(&names) {
                    series.push((name.as_str(), floats(&s["judged"][key]["mean_objectives"])));
                }
                let title = if key == "rules" {
                    "ground-truth (rule) scores by stage"
                } else {
                    "reward-model scores by stage"
                };
                let chart = Chart::Bars {
                    title,
                    labels,
                    series,
                };
                out.extend(write_chart(
                    dir,
                    &format!("stage_objectives_{key}"),
                    &chart,
                    png,
                )?);
            }
            rates.push((
                key,
                stages
                    .iter()
                    .map(|s| {
                        s["judged"][key]["vs_base"]["win_rate"]
                            .as_f64()
                            .unwrap_or(f64::NAN)
                    })
                    .collect(),
            ));
        }
        let chart = Chart::Bars {
            title: "win rate against the base model",
            labels: names,
            series: rates,
        };
        out.extend(write_chart(dir, "win_rates", &chart, png)?);
    }
    Ok(out)
}
