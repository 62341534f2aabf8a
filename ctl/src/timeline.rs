//! A migration's timeline as an SVG picture (`skyferry report ID --svg FILE`, and the demo's
//! end): per iteration the pages sent, dirtied and left, the link rate, the pause, and the
//! bytes each optimization saved. Drawn with plotters' SVG backend: the text goes into the
//! SVG as text, so no font is needed here.

use std::path::Path;

use dataplane::migrate::{IterationPoint, MigrationId, MigrationStatus};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 900;
const MIB: f64 = 1024.0 * 1024.0;

/// A figure of an iteration, for a series.
type Pick = fn(&IterationPoint) -> u64;

/// Writes `status`'s timeline to `path`.
pub fn write_svg(status: &MigrationStatus, path: &Path) -> Result<(), String> {
    if status.history.is_empty() {
        return Err(format!(
            "migration {} has no finished iteration to draw yet",
            MigrationId(status.id)
        ));
    }
    draw(status, path).map_err(|e| format!("drawing {}: {e}", path.display()))
}

fn draw(status: &MigrationStatus, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let h = &status.history;
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let pause = status.pause_ms.map_or_else(
        || "not paused yet".into(),
        |ms| format!("guest paused {ms} ms in all"),
    );
    let title = format!(
        "migration {} ({}, {}): {} iterations, {}",
        MigrationId(status.id),
        status.guest,
        crate::progress::phase_name(status.phase),
        h.len(),
        pause
    );
    let (top, rest) = root.split_vertically(40);
    top.titled(&title, ("sans-serif", 20))?;
    let panels = rest.split_evenly((3, 1));
    let first = h.first().map_or(0, |p| p.iteration);
    let last = h.last().map_or(0, |p| p.iteration);
    let xs = first.saturating_sub(1)..last + 1;
    let label_x = |x: &u32| {
        if h.iter().any(|p| p.iteration == *x && p.paused) {
            format!("{x} (paused)")
        } else if *x >= first && *x <= last {
            x.to_string()
        } else {
            String::new()
        }
    };

    // 1: pages sent, dirtied, left; on a log scale, as iteration 1 sends the whole guest
    // and the later ones a small part (a zero has no place on it and is left out).
    let pages_max = h
        .iter()
        .flat_map(|p| [p.sent, p.dirtied, p.remaining])
        .max()
        .unwrap_or(1)
        .max(1);
    let mut c = ChartBuilder::on(&panels[0])
        .caption("pages per iteration", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(xs.clone(), (1..pages_max * 2).log_scale())?;
    c.configure_mesh()
        .x_labels(h.len().min(20) + 2)
        .x_label_formatter(&label_x)
        .y_desc("pages (log scale)")
        .y_label_formatter(&|y| y.to_string())
        .draw()?;
    // At the source what is left after an iteration is what it dirtied: the thick line under
    // the thin one shows both where they agree.
    let series: [(&str, RGBColor, u32, Pick); 3] = [
        ("sent", BLUE, 2, |p| p.sent),
        ("dirtied meanwhile", RED, 6, |p| p.dirtied),
        ("left after it", GREEN, 2, |p| p.remaining),
    ];
    for (name, color, width, f) in series {
        let points: Vec<(u32, u64)> = h
            .iter()
            .map(|p| (p.iteration, f(p)))
            .filter(|&(_, v)| v > 0)
            .collect();
        let style = color.stroke_width(width);
        c.draw_series(LineSeries::new(points.clone(), style))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        c.draw_series(
            points
                .into_iter()
                .map(|xy| Circle::new(xy, 3, color.filled())),
        )?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;

    // 2: the link rate per iteration; the paused one is the final copy, part of the pause.
    let rate_max = h
        .iter()
        .map(|p| p.rate_bps() / MIB)
        .fold(0.0, f64::max)
        .max(1.0);
    let mut c = ChartBuilder::on(&panels[1])
        .caption(
            format!("link rate per iteration (MiB/s); {pause}"),
            ("sans-serif", 16),
        )
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(xs.clone(), 0.0..rate_max * 1.15)?;
    c.configure_mesh()
        .x_labels(h.len().min(20) + 2)
        .x_label_formatter(&label_x)
        .y_desc("MiB/s")
        .draw()?;
    c.draw_series(
        h.iter()
            .map(|p| (p.iteration, p.rate_bps() / MIB))
            .collect::<Vec<_>>()
            .into_iter()
            .map(|(x, y)| Circle::new((x, y), 3, BLUE.filled())),
    )?;
    c.draw_series(LineSeries::new(
        h.iter().map(|p| (p.iteration, p.rate_bps() / MIB)),
        BLUE,
    ))?;
    for p in h.iter().filter(|p| p.paused) {
        // Ending above the point, so it stays inside the picture.
        c.draw_series(std::iter::once(Text::new(
            format!("final copy: {} ms", p.ms),
            (p.iteration, p.rate_bps() / MIB + rate_max * 0.1),
            ("sans-serif", 13)
                .into_font()
                .color(&RED)
                .pos(Pos::new(HPos::Right, VPos::Bottom)),
        )))?;
    }

    // 3: bytes saved per optimization.
    let saved_max = h
        .iter()
        .flat_map(|p| [p.saved.zero, p.saved.cbr, p.saved.delta, p.saved.compress])
        .map(|b| b as f64 / MIB)
        .fold(0.0, f64::max)
        .max(1.0);
    let mut c = ChartBuilder::on(&panels[2])
        .caption("bytes saved per iteration (MiB)", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xs, 0.0..saved_max * 1.1)?;
    c.configure_mesh()
        .x_labels(h.len().min(20) + 2)
        .x_label_formatter(&label_x)
        .x_desc("iteration")
        .y_desc("MiB")
        .draw()?;
    let saved: [(&str, RGBColor, Pick); 4] = [
        ("zero pages", RGBColor(120, 120, 120), |p| p.saved.zero),
        ("block cache", BLUE, |p| p.saved.cbr),
        ("deltas", MAGENTA, |p| p.saved.delta),
        ("compression", RGBColor(230, 140, 0), |p| p.saved.compress),
    ];
    for (name, color, f) in saved {
        c.draw_series(LineSeries::new(
            h.iter().map(|p| (p.iteration, f(p) as f64 / MIB)),
            color,
        ))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dataplane::migrate::{Role, Saved};

    #[test]
    fn the_timeline_has_every_iteration_and_the_pause() {
        let mut s = MigrationStatus::new(0xab12, Role::Source, "tpcw-1", 1000);
        for i in 1..=4_u32 {
            let sent = 1000 / u64::from(i);
            s.push_history(IterationPoint {
                iteration: i,
                sent,
                dirtied: sent / 2,
                remaining: sent / 2,
                wire_bytes: sent * 4096,
                ms: 100,
                saved: Saved {
                    zero: 1 << 20,
                    cbr: 2 << 20,
                    delta: 3 << 20,
                    compress: 0,
                },
                paused: i == 4,
            });
        }
        s.pause_ms = Some(42);
        let dir = std::env::temp_dir().join(format!("sf-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.svg");
        write_svg(&s, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
        assert!(svg.contains("migration ab12"));
        assert!(svg.contains("guest paused 42 ms in all"));
        assert!(svg.contains("final copy: 100 ms"));
        assert!(svg.contains("4 (paused)"));
        for legend in ["sent", "dirtied meanwhile", "block cache", "deltas"] {
            assert!(svg.contains(legend), "{legend}");
        }
        // Nothing to draw is an error, not an empty picture.
        let empty = MigrationStatus::new(1, Role::Source, "g", 1);
        assert!(write_svg(&empty, &path).is_err());
    }
}
