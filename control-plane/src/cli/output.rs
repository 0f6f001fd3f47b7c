//! Rendering command results as tables or JSON.

use std::fmt::Write as _;

use flotilla_client::registry::{ClusterRole, ClusterSpec, Epoch, TopicRoute};
use serde::Serialize;

use super::args::OutputFormat;
use crate::controller::ReconcileReport;
use crate::ops::Status;

/// Left-aligned columns separated by two spaces.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(c.chars().count());
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

fn role(r: &ClusterRole) -> String {
    match r {
        ClusterRole::Permanent => "permanent".into(),
        ClusterRole::Temporary { purpose, .. } => format!("temporary ({purpose})"),
    }
}

/// The clusters as a table.
pub fn clusters_table(clusters: &[ClusterSpec]) -> String {
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                c.state.to_string(),
                role(&c.role),
                c.weight.to_string(),
                c.bootstrap.clone(),
                c.kafka_cluster_id.clone(),
            ]
        })
        .collect();
    table(
        &[
            "CLUSTER",
            "STATE",
            "ROLE",
            "WEIGHT",
            "BOOTSTRAP",
            "KAFKA CLUSTER ID",
        ],
        &rows,
    )
}

fn write_set(e: &Epoch) -> String {
    e.write
        .iter()
        .map(|w| format!("{}={}", w.cluster, w.weight))
        .collect::<Vec<_>>()
        .join(",")
}

/// One route with its epochs.
pub fn route_text(r: &TopicRoute) -> String {
    let mut out = format!("topic {}  partitions {}\n", r.topic, r.partitions);
    let rows: Vec<Vec<String>> = r
        .epochs
        .iter()
        .map(|e| {
            let fence = if e.fence.is_empty() {
                "-".to_string()
            } else {
                e.fence
                    .iter()
                    .map(|(c, offs)| {
                        format!(
                            "{c}:{}",
                            offs.iter()
                                .map(i64::to_string)
                                .collect::<Vec<_>>()
                                .join("/")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            vec![e.n.to_string(), e.state.to_string(), write_set(e), fence]
        })
        .collect();
    out.push_str(&table(
        &[
            "EPOCH",
            "STATE",
            "WRITE SET",
            "FENCE (end offset per partition)",
        ],
        &rows,
    ));
    out
}

/// The whole fleet.
pub fn status_text(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "registry revision {}\n", s.revision);
    out.push_str(&clusters_table(&s.clusters));
    out.push('\n');
    let routes: Vec<Vec<String>> = s
        .routes
        .iter()
        .map(|r| {
            let open = r.open_epoch();
            let pending = r.pending_epoch();
            vec![
                r.topic.clone(),
                r.partitions.to_string(),
                open.map_or("-".into(), |e| e.n.to_string()),
                open.map_or("-".into(), write_set),
                pending.map_or("-".into(), |e| format!("{} ({})", e.n, write_set(e))),
            ]
        })
        .collect();
    out.push_str(&table(
        &["TOPIC", "PARTITIONS", "OPEN EPOCH", "WRITE SET", "PENDING"],
        &routes,
    ));
    out.push('\n');
    let clients: Vec<Vec<String>> = s
        .clients
        .iter()
        .map(|c| {
            let acked = c
                .acked
                .iter()
                .map(|(t, n)| format!("{t}@{n}"))
                .collect::<Vec<_>>()
                .join(",");
            vec![
                c.kind.to_string(),
                c.id.clone(),
                c.group.clone().unwrap_or_else(|| "-".into()),
                acked,
            ]
        })
        .collect();
    out.push_str(&table(&["CLIENT", "ID", "GROUP", "ACKED EPOCHS"], &clients));
    out
}

/// A reconcile report, one line per thing done.
pub fn report_text(r: &ReconcileReport) -> String {
    let mut out = String::new();
    for (t, n) in &r.sealed {
        let _ = writeln!(out, "switch completed: {t} now writes with epoch {n}");
    }
    for (t, n, why) in &r.aborted {
        let _ = writeln!(out, "switch aborted: {t} epoch {n}: {why}");
    }
    for (t, n, missing) in &r.waiting {
        let _ = writeln!(
            out,
            "switch pending: {t} epoch {n}, waiting for {}",
            if missing.is_empty() {
                "the boundary".to_string()
            } else {
                missing.join(", ")
            }
        );
    }
    for c in &r.drained {
        let _ = writeln!(out, "expired, now draining: {c}");
    }
    for (c, topics) in &r.fenced {
        let _ = writeln!(out, "writes fenced: {c}: {}", topics.join(", "));
    }
    for c in &r.retired {
        let _ = writeln!(out, "retired: {c}");
    }
    for (c, why) in &r.blocked {
        let _ = writeln!(out, "not retired yet: {c}: {why}");
    }
    for e in &r.errors {
        let _ = writeln!(out, "error: {e}");
    }
    out
}

/// Prints `value` as JSON, or `text()` as is.
pub fn print<T: Serialize>(format: OutputFormat, value: &T, text: impl FnOnce() -> String) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).expect("serializable")
        ),
        OutputFormat::Table => print!("{}", text()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    LONGER\nxyz  1\nq    22\n");
    }

    #[test]
    fn report_names_fenced_clusters_and_their_topics() {
        let r = ReconcileReport {
            fenced: vec![("a".into(), vec!["t".into(), "u".into()])],
            ..ReconcileReport::default()
        };
        assert_eq!(report_text(&r), "writes fenced: a: t, u\n");
    }
}
