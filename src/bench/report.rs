//! Turning measurements into a table, CSV, JSON and SVG charts.

use std::fmt::Write as _;
use std::io;
use std::path::Path;

use plotters::coord::combinators::LogCoord;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use serde::Serialize;

use super::runner::{Cell, Churn, Fanout, Idle};
use super::{median, Sample};

/// Everything one `muxserve bench` invocation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    /// The echo matrix.
    pub cells: Vec<Cell>,
    /// Memory per idle connection.
    pub idle: Vec<Idle>,
    /// Connection churn.
    pub churn: Vec<Churn>,
    /// Chat fan-out.
    pub fanout: Vec<Fanout>,
    /// The engine the table's ratios compare with.
    pub reference: String,
    /// Cores the machine has.
    pub cores: usize,
    /// The load averages (1, 5, 15 minutes) when the runs started and when
    /// they ended: other work on the machine, which the numbers carry.
    pub load: [Option<[f64; 3]>; 2],
}

/// The human-readable summary: medians per cell (and the worst latency of
/// any run), with each engine's rate and CPU as a ratio to the reference
/// engine ([`Results::reference`]). Ratios are medians of run-by-run
/// ratios, and the range of those is shown for the rate, so a difference
/// smaller than the noise can be seen to be one.
pub fn table(results: &Results) -> String {
    let mut out = String::new();
    let reference = results.reference.as_str();
    if !results.cells.is_empty() {
        let _ = writeln!(
            out,
            "ratios (vs ref, runs, cpu vs) are to {reference}, run by run"
        );
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>6} {:>5} {:>11} {:>7} {:>11} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>8} {:>9}",
            "engine",
            "conns",
            "size",
            "depth",
            "req/s",
            "vs ref",
            "runs",
            "p50 µs",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "user µs/r",
            "total µs/r",
            "cpu vs",
            "RSS KiB"
        );
    }
    for cell in &results.cells {
        let base = results.cells.iter().find(|c| {
            c.engine == reference
                && c.conns == cell.conns
                && c.size == cell.size
                && c.depth == cell.depth
        });
        let total_cpu = |s: &Sample| s.cpu_us.0 + s.cpu_us.1;
        let mut rate_ratios = base.map_or_else(Vec::new, |b| cell.ratios(b, |s| s.rate));
        let vs_cpu = base.map_or(f64::NAN, |b| median(&mut cell.ratios(b, total_cpu)));
        let vs_rate = median(&mut rate_ratios);
        // `median` sorted them.
        let range = match (rate_ratios.first(), rate_ratios.last()) {
            (Some(lo), Some(hi)) => format!("{lo:.2}-{hi:.2}"),
            _ => "-".to_string(),
        };
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>6} {:>5} {:>11.0} {:>6.2}x {:>11} {:>9.1} {:>9.1} {:>9.1} {:>10.1} {:>10.3} {:>10.3} {:>7.2}x {:>9.0}",
            cell.engine,
            cell.conns,
            cell.size,
            cell.depth,
            cell.median(|s| s.rate),
            vs_rate,
            range,
            cell.median(|s| s.latency_us[0]),
            cell.median(|s| s.latency_us[1]),
            cell.median(|s| s.latency_us[2]),
            cell.worst(|s| s.latency_us[3]),
            cell.median(|s| s.cpu_us.0),
            cell.median(total_cpu),
            vs_cpu,
            cell.median(|s| s.rss as f64) / 1024.0
        );
    }
    for i in &results.idle {
        let _ = writeln!(
            out,
            "idle     {:<8} {:>8.0} B of server RSS per connection ({} connections, each echoed once)",
            i.engine, i.bytes_per_conn, i.conns
        );
    }
    for c in &results.churn {
        let _ = writeln!(
            out,
            "churn    {:<8} {:>8.0} connections/s, {:.1} µs server CPU per connection",
            c.engine, c.per_second, c.cpu_us
        );
    }
    for f in &results.fanout {
        let _ = writeln!(
            out,
            "fan-out  {:<8} {:>5} members: {:>10.0} deliveries/s ({} missing)",
            f.engine, f.members, f.per_second, f.missing
        );
    }
    if let [Some(start), Some(end)] = results.load {
        let _ = write!(
            out,
            "load average (1, 5, 15 min): {:.2} {:.2} {:.2} at the start, {:.2} {:.2} {:.2} at the end",
            start[0], start[1], start[2], end[0], end[1], end[2]
        );
        // A one-minute load above the core count means more was ready to
        // run than there were cores: the load generator and the server
        // waited for other work.
        if start[0].max(end[0]) > results.cores as f64 {
            let _ = write!(
                out,
                "; busier than its {} cores, so compare the ratios, not the absolute numbers",
                results.cores
            );
        }
        out.push('\n');
    }
    out
}

/// Writes `results.json`, `samples.csv` and SVG charts into `dir`.
pub fn write(dir: &Path, results: &Results) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(results).map_err(io::Error::other)?;
    std::fs::write(dir.join("results.json"), json)?;

    let mut csv = String::from(
        "engine,conns,size,depth,run,req_per_s,p50_us,p99_us,p999_us,max_us,cpu_user_us_per_req,cpu_sys_us_per_req,rss_bytes\n",
    );
    for cell in &results.cells {
        for (run, s) in cell.samples.iter().enumerate() {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{:.1},{:.1},{:.1},{:.1},{:.1},{:.4},{:.4},{}",
                cell.engine,
                cell.conns,
                cell.size,
                cell.depth,
                run,
                s.rate,
                s.latency_us[0],
                s.latency_us[1],
                s.latency_us[2],
                s.latency_us[3],
                s.cpu_us.0,
                s.cpu_us.1,
                s.rss
            );
        }
    }
    std::fs::write(dir.join("samples.csv"), csv)?;

    let mut shapes: Vec<(usize, usize)> = results.cells.iter().map(|c| (c.size, c.depth)).collect();
    shapes.sort_unstable();
    shapes.dedup();
    for (size, depth) in shapes {
        let path = dir.join(format!("rate_{size}B_depth{depth}.svg"));
        rate_chart(&path, results, size, depth).map_err(|e| io::Error::other(e.to_string()))?;
    }
    if let Some(biggest) = results.cells.iter().map(|c| c.conns).max() {
        let first = &results.cells[0];
        let path = dir.join("latency_cdf.svg");
        cdf_chart(&path, results, biggest, first.size, first.depth)
            .map_err(|e| io::Error::other(e.to_string()))?;
    }
    Ok(())
}

fn engines(results: &Results) -> Vec<&str> {
    let mut names: Vec<&str> = Vec::new();
    for c in &results.cells {
        if !names.contains(&c.engine.as_str()) {
            names.push(&c.engine);
        }
    }
    names
}

/// Requests/s against connections, one line per engine.
fn rate_chart(path: &Path, results: &Results, size: usize, depth: usize) -> Drawn {
    let cells: Vec<&Cell> = results
        .cells
        .iter()
        .filter(|c| c.size == size && c.depth == depth)
        .collect();
    let max_conns = cells.iter().map(|c| c.conns).max().unwrap_or(1) as f64;
    let min_conns = cells.iter().map(|c| c.conns).min().unwrap_or(1) as f64;
    let max_rate = cells
        .iter()
        .map(|c| c.median(|s| s.rate))
        .fold(1.0, f64::max);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let mut chart = frame(
        &root,
        &format!("echo, {size} B, depth {depth}: requests/s"),
        80,
        min_conns / 1.5..max_conns * 1.5,
        0.0..max_rate * 1.15,
    )?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("requests/s (median)")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{:.0}k", v / 1000.0))
        .draw()?;
    for (i, engine) in engines(results).into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let mut points: Vec<(f64, f64)> = cells
            .iter()
            .filter(|c| c.engine == engine)
            .map(|c| (c.conns as f64, c.median(|s| s.rate)))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        engine_line(&mut chart, engine, color, points.clone())?;
        chart.draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, 3, color.filled())),
        )?;
    }
    finish(chart, &root, SeriesLabelPosition::UpperRight)
}

/// The latency distribution of each engine in one cell.
fn cdf_chart(path: &Path, results: &Results, conns: usize, size: usize, depth: usize) -> Drawn {
    let cells: Vec<&Cell> = results
        .cells
        .iter()
        .filter(|c| c.conns == conns && c.size == size && c.depth == depth)
        .collect();
    let latencies = || {
        cells
            .iter()
            .filter_map(|c| c.median_sample())
            .flat_map(|s| s.cdf.iter().map(|p| p.1.max(1.0)))
    };
    let max_us = latencies().fold(10.0, f64::max);
    let min_us = latencies().fold(max_us, f64::min);
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    let mut chart = frame(
        &root,
        &format!("latency CDF, {conns} connections x {size} B, depth {depth}"),
        60,
        min_us / 1.2..max_us * 1.2,
        0.0..1.0,
    )?;
    chart
        .configure_mesh()
        .x_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("round-trip latency, µs")
        .y_desc("fraction of requests")
        .draw()?;
    for (i, engine) in engines(results).into_iter().enumerate() {
        let Some(sample) = cells
            .iter()
            .find(|c| c.engine == engine)
            .and_then(|c| c.median_sample())
        else {
            continue;
        };
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = sample.cdf.iter().map(|&(q, us)| (us.max(1.0), q)).collect();
        engine_line(&mut chart, engine, color, points)?;
    }
    finish(chart, &root, SeriesLabelPosition::LowerRight)
}

type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<LogCoord<f64>, RangedCoordf64>>;
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// A white chart with a log-scale x axis over `x` and a linear y axis.
fn frame<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, Shift>,
    caption: &str,
    y_label_area: u32,
    x: std::ops::Range<f64>,
    y: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    root.fill(&WHITE)?;
    Ok(ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(y_label_area)
        .build_cartesian_2d(x.log_scale(), y)?)
}

/// One engine's line, with its legend entry.
fn engine_line(
    chart: &mut Chart<'_, '_>,
    engine: &str,
    color: RGBAColor,
    points: Vec<(f64, f64)>,
) -> Drawn {
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(engine)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

/// Draws the legend at `position` and writes the file.
fn finish<'a, 'b: 'a>(
    mut chart: Chart<'a, 'b>,
    root: &DrawingArea<SVGBackend<'b>, Shift>,
    position: SeriesLabelPosition,
) -> Drawn {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with_load(start: [f64; 3], end: [f64; 3]) -> String {
        table(&Results {
            cores: 2,
            load: [Some(start), Some(end)],
            ..Results::default()
        })
    }

    #[test]
    fn the_table_says_how_busy_the_machine_was() {
        assert_eq!(
            table_with_load([0.7, 0.38, 1.73], [1.5, 1.0, 1.2]),
            "load average (1, 5, 15 min): 0.70 0.38 1.73 at the start, 1.50 1.00 1.20 at the end\n"
        );
        let busy = table_with_load([0.7, 0.38, 1.73], [5.7, 15.06, 9.71]);
        assert!(
            busy.ends_with(
                "; busier than its 2 cores, so compare the ratios, not the absolute numbers\n"
            ),
            "{busy}"
        );
        // Unknown (no /proc/loadavg): no line at all.
        assert_eq!(table(&Results::default()), "");
    }
}
