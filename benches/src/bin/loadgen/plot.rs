//! SVG plots (plotters, SVG backend only): throughput bars, ratio bars against the targets,
//! latency percentile curves and RSS over the course of each run.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::chart::SeriesLabelStyle;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::{Results, Row, StepRecord, Target};
use crate::spec::Side;

const POLYBUS: RGBColor = RGBColor(31, 119, 180);
const RAW: RGBColor = RGBColor(255, 127, 14);
const TEMPLATE: RGBColor = RGBColor(148, 103, 189);
const BARE: RGBColor = RGBColor(150, 150, 150);
const LEAN: RGBColor = RGBColor(44, 160, 44);
const PEER: RGBColor = RGBColor(214, 39, 40);
const FONT: &str = "sans-serif";

fn color(side: Side) -> RGBColor {
    match side {
        Side::Polybus => POLYBUS,
        Side::Raw => RAW,
        Side::Template => TEMPLATE,
        Side::Bare => BARE,
        Side::Lean => LEAN,
        Side::RustStream => PEER,
    }
}

/// plotters' errors borrow nothing but are not all `Send`; keep their text.
fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// One line per side, in the side's colour, each with a legend entry `legend_len` wide.
fn side_lines<'a, CT: CoordTranslate<From = (f64, f64)>>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, CT>,
    series: Vec<(Side, Vec<(f64, f64)>)>,
    legend_len: i32,
) -> Result<()> {
    for (side, pts) in series {
        chart
            .draw_series(LineSeries::new(pts, color(side).stroke_width(2)))
            .map_err(err)?
            .label(side.name())
            .legend(move |(x, y)| {
                PathElement::new(
                    vec![(x, y), (x + legend_len, y)],
                    color(side).stroke_width(2),
                )
            });
    }
    Ok(())
}

/// The legend box every plot has, at `position` (draw it after setting anything else).
fn legend<'a, 'b, CT: CoordTranslate>(
    chart: &'b mut ChartContext<'a, SVGBackend<'a>, CT>,
    position: SeriesLabelPosition,
) -> SeriesLabelStyle<'a, 'b, SVGBackend<'a>, CT> {
    let mut style = chart.configure_series_labels();
    style
        .position(position)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK);
    style
}

pub(crate) fn all(results: &Results, rows: &[Row], out: &Path) -> Result<()> {
    throughput(results, &out.join("throughput.svg"))?;
    ratios(rows, &out.join("ratios.svg"))?;
    for s in results.steps.iter().filter(|s| s.kind.has_latency()) {
        latency(s, &out.join(format!("latency-{}.svg", s.id)))?;
    }
    memory(results, &out.join("memory.svg"))?;
    Ok(())
}

/// Horizontal bars with one row per label; `values[i]` are the bars of row i (one per
/// series), drawn top to bottom.
fn label_at(labels: &[String], y: f64) -> String {
    let i = y.round();
    if (y - i).abs() > 1e-6 || i < 0.0 {
        return String::new();
    }
    labels
        .get(labels.len().wrapping_sub(1).wrapping_sub(i as usize))
        .cloned()
        .unwrap_or_default()
}

/// Median throughput per side and step, log scale (rates differ by orders of magnitude).
fn throughput(results: &Results, path: &Path) -> Result<()> {
    let sides = Side::ALL;
    let mut labels = Vec::new();
    let mut bars: Vec<Vec<(Side, f64)>> = Vec::new();
    for s in &results.steps {
        let mut row = Vec::new();
        for side in sides {
            let v = crate::report::median(s.of(side).iter().map(|(_, r)| r.throughput).collect());
            if let Some(v) = v.filter(|v| *v > 0.0) {
                row.push((side, v));
            }
        }
        if !row.is_empty() {
            labels.push(s.title.clone());
            bars.push(row);
        }
    }
    if bars.is_empty() {
        return Ok(());
    }
    let max = bars.iter().flatten().map(|b| b.1).fold(1.0, f64::max);
    let min = bars.iter().flatten().map(|b| b.1).fold(max, f64::min);
    let n = labels.len();
    let height = 120 + 46 * n as u32;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Throughput, median of the rounds (msg/s, log scale)",
            (FONT, 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(290)
        .build_cartesian_2d(
            ((min / 2.0).max(1.0)..max * 1.5).log_scale(),
            -0.6f64..n as f64 - 0.4,
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| label_at(&labels, *y))
        .x_label_formatter(&|x| short(*x))
        .x_desc("messages per second")
        .disable_y_mesh()
        .draw()
        .map_err(err)?;
    for side in sides {
        let rects: Vec<_> = bars
            .iter()
            .enumerate()
            .filter_map(|(i, row)| {
                let k = row.iter().position(|(s, _)| *s == side)?;
                let count = row.len() as f64;
                let h = 0.8 / count;
                let y_top = (n - 1 - i) as f64 + 0.4 - h * k as f64;
                Some(Rectangle::new(
                    [((min / 2.0).max(1.0), y_top - h), (row[k].1, y_top)],
                    color(side).filled(),
                ))
            })
            .collect();
        if rects.is_empty() {
            continue;
        }
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(match side {
                Side::Polybus => "polybus",
                Side::Raw => "raw client (same headers)",
                Side::Template => "raw client, prebuilt headers",
                Side::Bare => "raw client, payload only",
                Side::Lean => "polybus, lean wire format",
                Side::RustStream => "RustStream",
            })
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], color(side).filled())
            });
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn short(x: f64) -> String {
    if x >= 1e6 {
        format!("{}M", trim(x / 1e6))
    } else if x >= 1e3 {
        format!("{}k", trim(x / 1e3))
    } else {
        trim(x)
    }
}

fn trim(x: f64) -> String {
    let s = format!("{x:.1}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// Ratio bars (polybus / raw) against their targets: throughput above, p99 latency below.
fn ratios(rows: &[Row], path: &Path) -> Result<()> {
    let thr: Vec<&Row> = rows
        .iter()
        .filter(|r| r.unit == "msg/s" && r.ratio.is_some())
        .collect();
    let lat: Vec<&Row> = rows
        .iter()
        .filter(|r| matches!(r.target, Some(Target::AtMost(_))) && r.ratio.is_some())
        .collect();
    if thr.is_empty() && lat.is_empty() {
        return Ok(());
    }
    let h_thr = 110 + 34 * thr.len() as u32;
    let h_lat = 110 + 34 * lat.len() as u32;
    let root = SVGBackend::new(path, (1000, h_thr + h_lat)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(h_thr);
    ratio_panel(
        &top,
        &thr,
        "Throughput ratio polybus / raw (higher is better)",
    )?;
    ratio_panel(
        &bottom,
        &lat,
        "p99 latency ratio polybus / raw (lower is better)",
    )?;
    root.present().map_err(err)?;
    Ok(())
}

fn ratio_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    rows: &[&Row],
    title: &str,
) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let labels: Vec<String> = rows
        .iter()
        .map(|r| r.figure.split(" (").next().unwrap_or(&r.figure).to_owned())
        .collect();
    let n = rows.len();
    let max = rows.iter().filter_map(|r| r.ratio).fold(1.2f64, f64::max) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 18))
        .margin(15)
        .x_label_area_size(35)
        .y_label_area_size(380)
        .build_cartesian_2d(0f64..max, -0.6f64..n as f64 - 0.4)
        .map_err(err)?;
    chart
        .configure_mesh()
        .y_labels(n)
        .y_label_formatter(&|y| label_at(&labels, *y))
        .disable_y_mesh()
        .draw()
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = (n - 1 - i) as f64;
            let ratio = r.ratio.unwrap_or(0.0);
            let c = if r.met == Some(false) {
                RGBColor(214, 39, 40)
            } else {
                RGBColor(44, 160, 44)
            };
            Rectangle::new([(0.0, y - 0.35), (ratio, y + 0.35)], c.filled())
        }))
        .map_err(err)?;
    // Each row's target as a black tick, and 1.0 as a grey line.
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(1.0, -0.6), (1.0, n as f64 - 0.4)],
            BLACK.mix(0.3).stroke_width(1),
        )))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().filter_map(|(i, r)| {
            let t = match r.target? {
                Target::AtLeast(t) | Target::AtMost(t) => t,
            };
            let y = (n - 1 - i) as f64;
            Some(PathElement::new(
                vec![(t, y - 0.45), (t, y + 0.45)],
                BLACK.stroke_width(3),
            ))
        }))
        .map_err(err)?;
    chart
        .draw_series(rows.iter().enumerate().map(|(i, r)| {
            let y = (n - 1 - i) as f64;
            let ratio = r.ratio.unwrap_or(0.0);
            // Right of the bar and of the target tick, whichever ends later.
            let target = match r.target {
                Some(Target::AtLeast(t) | Target::AtMost(t)) => t,
                None => 0.0,
            };
            Text::new(
                format!("{ratio:.3}"),
                (ratio.max(target) + max * 0.012, y + 0.15),
                (FONT, 13),
            )
        }))
        .map_err(err)?;
    Ok(())
}

/// Percentile curves of one step (the run with the median p99 of each side).
fn latency(s: &StepRecord, path: &Path) -> Result<()> {
    let curves: Vec<(Side, Vec<(f64, f64)>)> = Side::ALL
        .into_iter()
        .filter_map(|side| {
            let run = s.median_run(side, |r| r.latency.as_ref().map_or(0.0, |l| l.p99_us))?;
            let l = run.latency.as_ref()?;
            // x = "nines": 0 at 0 %, 1 at 90 %, 2 at 99 %, ... (the 100 % point is left out).
            let pts = l
                .curve
                .iter()
                .filter(|(p, _)| *p < 100.0)
                .map(|&(p, v)| (-(1.0 - p / 100.0).log10(), v.max(0.001)))
                .collect();
            Some((side, pts))
        })
        .collect();
    if curves.is_empty() {
        return Ok(());
    }
    let all = curves.iter().flat_map(|(_, c)| c.iter());
    let (lo, hi) = all.fold((f64::MAX, 0f64), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    let x_max = curves
        .iter()
        .flat_map(|(_, c)| c.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "{}: {} latency by percentile (window {})",
                s.title,
                s.kind.latency_label(),
                s.window
            ),
            (FONT, 18),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, ((lo * 0.8).max(0.001)..hi * 1.25).log_scale())
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_labels(x_max.ceil() as usize + 1)
        .x_label_formatter(&|x| nines(*x))
        .y_label_formatter(&|y| trim(*y))
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .draw()
        .map_err(err)?;
    side_lines(&mut chart, curves, 16)?;
    legend(&mut chart, SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn nines(x: f64) -> String {
    let i = x.round();
    if (x - i).abs() > 1e-6 {
        return String::new();
    }
    match i as i32 {
        0 => "0%".into(),
        1 => "90%".into(),
        k => format!("99.{}%", "9".repeat((k - 2).max(0) as usize)).replace("99.%", "99%"),
    }
}

/// RSS over the course of each run (median-throughput run of each side), one panel per step.
fn memory(results: &Results, path: &Path) -> Result<()> {
    let steps: Vec<&StepRecord> = results
        .steps
        .iter()
        .filter(|s| !s.of(Side::Polybus).is_empty() || !s.of(Side::Raw).is_empty())
        .collect();
    if steps.is_empty() {
        return Ok(());
    }
    let cols = 3usize;
    let rows = steps.len().div_ceil(cols);
    let root = SVGBackend::new(path, (1200, 40 + 260 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (title, body) = root.split_vertically(40);
    title
        .draw_text(
            "Resident set size during each run (MiB) against messages done (%)",
            &(FONT, 18).into_text_style(&title),
            (15, 10),
        )
        .map_err(err)?;
    let panels = body.split_evenly((rows, cols));
    for (s, panel) in steps.iter().zip(panels.iter()) {
        let series: Vec<(Side, Vec<(f64, f64)>)> = Side::ALL
            .into_iter()
            .filter_map(|side| {
                let run = s.median_run(side, |r| r.throughput)?;
                let pts = run
                    .rss_samples
                    .iter()
                    .map(|&(done, kib)| {
                        (
                            done as f64 * 100.0 / s.messages.max(1) as f64,
                            kib as f64 / 1024.0,
                        )
                    })
                    .collect();
                Some((side, pts))
            })
            .collect();
        let hi = series
            .iter()
            .flat_map(|(_, p)| p.iter().map(|q| q.1))
            .fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(s.id.as_str(), (FONT, 14))
            .margin(8)
            .x_label_area_size(22)
            .y_label_area_size(45)
            .build_cartesian_2d(0f64..100f64, 0f64..hi * 1.2)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(6)
            .y_labels(5)
            .draw()
            .map_err(err)?;
        side_lines(&mut chart, series, 12)?;
        legend(&mut chart, SeriesLabelPosition::LowerRight)
            .label_font((FONT, 11))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_labels() {
        assert_eq!(nines(0.0), "0%");
        assert_eq!(nines(1.0), "90%");
        assert_eq!(nines(2.0), "99%");
        assert_eq!(nines(3.0), "99.9%");
        assert_eq!(nines(5.0), "99.999%");
        assert_eq!(nines(2.5), "");
    }

    #[test]
    fn short_numbers() {
        assert_eq!(short(1_500_000.0), "1.5M");
        assert_eq!(short(20_000.0), "20k");
        assert_eq!(short(7.0), "7");
    }
}
