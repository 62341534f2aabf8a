//! `skyferry-bench pipeline --svg FILE`: the pipeline table as a picture, one group of bars
//! per case: guest memory moved against the encrypted-transfer reference, the CPU each end
//! spent, and the pause. Drawn with plotters' SVG backend (text stays text: no font needed).

use std::path::Path;

use plotters::prelude::*;

/// One case's bars.
#[derive(Debug, Clone)]
pub struct Bars {
    /// The case's name.
    pub case: String,
    /// Guest GB/s and the reference's.
    pub guest_gbps: f64,
    /// See `guest_gbps`.
    pub reference_gbps: f64,
    /// CPU-seconds per GB at each end.
    pub src_cpu_s_per_gb: f64,
    /// See `src_cpu_s_per_gb`.
    pub dst_cpu_s_per_gb: f64,
    /// The guest's pause.
    pub pause_ms: u64,
}

/// Writes the picture of `cases` to `path`; `title` says what ran.
pub fn write_svg(title: &str, cases: &[Bars], path: &Path) -> Result<(), String> {
    if cases.is_empty() {
        return Err("no case to draw".into());
    }
    draw(title, cases, path).map_err(|e| format!("drawing {}: {e}", path.display()))
}

/// A figure of a case, for a series.
type Pick = fn(&Bars) -> f64;
/// A panel: its caption, its unit, and its series (name, colour, figure).
type Panel<'a> = (&'a str, &'a str, &'a [(&'a str, RGBColor, Pick)]);

fn draw(title: &str, cases: &[Bars], path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (960, 820)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(40);
    top.titled(title, ("sans-serif", 18))?;
    let panels = rest.split_evenly((3, 1));
    let n = cases.len();
    let names: Vec<String> = cases.iter().map(|c| c.case.clone()).collect();
    let groups: [Panel<'_>; 3] = [
        (
            "guest memory moved (GB/s) against the encrypted-transfer reference",
            "GB/s",
            &[
                ("skyferry", BLUE, |c| c.guest_gbps),
                ("reference", RGBColor(150, 150, 150), |c| c.reference_gbps),
            ],
        ),
        (
            "CPU-seconds per GB of guest memory",
            "s/GB",
            &[
                ("source", RGBColor(230, 140, 0), |c| c.src_cpu_s_per_gb),
                ("destination", MAGENTA, |c| c.dst_cpu_s_per_gb),
            ],
        ),
        (
            "guest paused (ms)",
            "ms",
            &[("pause", RED, |c| c.pause_ms as f64)],
        ),
    ];
    for (panel, (caption, unit, series)) in panels.iter().zip(groups) {
        let top = cases
            .iter()
            .flat_map(|c| series.iter().map(move |(_, _, f)| f(c)))
            .fold(0.0, f64::max)
            .max(f64::MIN_POSITIVE);
        // Case i spans [i, i + 1); its bars share it.
        let mut chart = ChartBuilder::on(panel)
            .caption(caption, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..n as f64, 0.0..top * 1.2)?;
        // Labels at case centres only.
        let label = |x: &f64| {
            (0..n)
                .find(|&i| (x - (i as f64 + 0.5)).abs() < 1e-6)
                .map(|i| names[i].clone())
                .unwrap_or_default()
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(2 * n + 1)
            .x_label_formatter(&label)
            .y_desc(unit)
            .draw()?;
        let width = 0.7 / series.len() as f64;
        for (k, (name, color, f)) in series.iter().enumerate() {
            let color = *color;
            chart
                .draw_series(cases.iter().enumerate().map(|(i, c)| {
                    let x0 = i as f64 + 0.15 + k as f64 * width;
                    Rectangle::new([(x0, 0.0), (x0 + width * 0.9, f(c))], color.filled())
                }))?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            chart.draw_series(cases.iter().enumerate().map(|(i, c)| {
                let x = i as f64 + 0.15 + (k as f64 + 0.45) * width;
                Text::new(
                    format!("{:.2}", f(c)),
                    (x, f(c) + top * 0.02),
                    ("sans-serif", 11).into_font().color(&BLACK).pos(
                        plotters::style::text_anchor::Pos::new(
                            plotters::style::text_anchor::HPos::Center,
                            plotters::style::text_anchor::VPos::Bottom,
                        ),
                    ),
                )
            }))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_gets_its_bars_and_its_name() {
        let cases: Vec<Bars> = ["unique", "zero"]
            .iter()
            .map(|n| Bars {
                case: (*n).into(),
                guest_gbps: 1.5,
                reference_gbps: 2.0,
                src_cpu_s_per_gb: 0.8,
                dst_cpu_s_per_gb: 0.6,
                pause_ms: 12,
            })
            .collect();
        let path = std::env::temp_dir().join(format!("sf-bench-{}.svg", std::process::id()));
        write_svg("pipeline: test", &cases, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        for text in [
            "pipeline: test",
            "unique",
            "zero",
            "reference",
            "1.50",
            "12.00",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        assert!(write_svg("t", &[], &path).is_err());
    }
}
