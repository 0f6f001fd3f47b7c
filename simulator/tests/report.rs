//! `flotilla-sim run --report FILE.md` writes the Markdown report and two SVG
//! plots next to it, linked from the Markdown, carrying the data they show.

use std::path::PathBuf;

use flotilla_sim::report::{plot_paths, Summary};
use flotilla_sim::{run_seed, Config, Fault, Faults};

/// A fresh folder under the system temp dir (removed at the end of the test).
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flotilla-sim-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Every value of attribute `attr` in `svg`, in order.
fn attr_values<'a>(svg: &'a str, attr: &str) -> Vec<&'a str> {
    let pat = format!(" {attr}=\"");
    svg.match_indices(&pat)
        .map(|(i, _)| {
            let rest = &svg[i + pat.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

#[test]
fn report_writes_pause_and_lag_plots_with_their_data() {
    let cfg = Config {
        faults: Faults::none().with(Fault::ClusterLoss),
        ..Config::tiny()
    };
    let mut sum = Summary::default();
    let mut peaks = Vec::new();
    for seed in 0..3 {
        let r = run_seed(seed, &cfg);
        peaks.push((
            r.stats.lag.iter().map(|&(_, v)| v).max().unwrap_or(0),
            seed,
            r.stats.lag.clone(),
        ));
        sum.add(&r);
    }
    assert!(!sum.pauses.is_empty(), "no switch sealed");
    let dir = scratch("report");
    let md = dir.join("sim-report.md");
    let written = sum.write_report(&md, &cfg, 1.0).unwrap();
    let (pause_path, lag_path) = plot_paths(&md);
    assert_eq!(pause_path, dir.join("sim-report-pause.svg"));
    assert_eq!(lag_path, dir.join("sim-report-lag.svg"));
    assert_eq!(written, vec![pause_path.clone(), lag_path.clone()]);

    let text = std::fs::read_to_string(&md).unwrap();
    assert!(text.contains("](sim-report-pause.svg)"), "{text}");
    assert!(text.contains("](sim-report-lag.svg)"), "{text}");

    // The pause plot: one bar per (series, bucket); the counts add up to every
    // switch and every hold, and each bucket's count is the histogram's.
    let pause = std::fs::read_to_string(&pause_path).unwrap();
    assert!(pause.starts_with("<svg") && pause.trim_end().ends_with("</svg>"));
    let series = attr_values(&pause, "data-series");
    let counts: Vec<u64> = attr_values(&pause, "data-count")
        .iter()
        .map(|c| c.parse().unwrap())
        .collect();
    assert_eq!(series.len(), counts.len());
    let total = |name: &str| -> u64 {
        series
            .iter()
            .zip(&counts)
            .filter(|(s, _)| **s == name)
            .map(|(_, c)| c)
            .sum()
    };
    assert_eq!(total("pause"), sum.pauses.len() as u64);
    assert_eq!(total("hold"), sum.holds.len() as u64);
    let slowest = *sum.pauses.iter().max().unwrap();
    let top = 64 - slowest.max(1).leading_zeros();
    let top_lo = if top == 1 { 0 } else { 1u64 << (top - 1) };
    let label = top_lo.to_string();
    assert!(
        pause.contains(&format!("data-series=\"pause\" data-bucket-ms=\"{label}\"")),
        "no bar for the slowest switch ({slowest} ms, bucket {label})"
    );

    // The lag plot: the worst seed's samples, one polyline point each.
    // The first seed with the highest peak (ties keep the earlier seed).
    let best = peaks.iter().map(|p| p.0).max().unwrap();
    let (peak, seed, lag) = peaks.into_iter().find(|p| p.0 == best).unwrap();
    assert!(peak > 0, "the group never lagged");
    assert_eq!(sum.worst_lag.as_ref().map(|(s, _)| *s), Some(seed));
    let svg = std::fs::read_to_string(&lag_path).unwrap();
    assert!(
        svg.contains(&format!("seed {seed} (peak {peak} records")),
        "{svg}"
    );
    let samples = attr_values(&svg, "data-samples");
    assert_eq!(samples, vec![lag.len().to_string()]);
    let points = attr_values(&svg, "points");
    assert_eq!(points.len(), 1);
    let pts: Vec<(f64, f64)> = points[0]
        .split(' ')
        .map(|p| {
            let (x, y) = p.split_once(',').unwrap();
            (x.parse().unwrap(), y.parse().unwrap())
        })
        .collect();
    assert_eq!(pts.len(), lag.len());
    assert!(
        pts.windows(2).all(|w| w[0].0 <= w[1].0),
        "time goes forward"
    );
    // The highest point (smallest y) is at the peak sample.
    let top_i = (0..pts.len())
        .min_by(|&a, &b| pts[a].1.total_cmp(&pts[b].1))
        .unwrap();
    assert_eq!(lag[top_i].1, peak);
    let _ = std::fs::remove_dir_all(&dir);
}
