//! The `flotilla backfill` subcommands: argument mapping and output.

use std::sync::Arc;
use std::time::Duration;

use flotilla_client::kafka::{KafkaProperties, SecurityProfiles};

use super::{
    Backfill, BackfillError, BackfillOptions, BackfillRecord, Bound, HookPoint, Phase,
    ProgressMode, StartRequest,
};
use crate::cli::args::{BackfillCommand, BackfillRunArgs, OutputFormat, ProgressArg};
use crate::cli::output;
use crate::ops::ControlPlane;

/// Exit code of the hidden crash flags (a simulated `kill -9`).
pub const CRASH_EXIT_CODE: i32 = 86;

fn options(
    run: &BackfillRunArgs,
    timeout: Duration,
    profiles: SecurityProfiles,
) -> Result<BackfillOptions, BackfillError> {
    let crash_phase = match &run.crash_at_phase {
        None => None,
        Some(p) => Some(
            Phase::parse(p)
                .ok_or_else(|| BackfillError::BadInput(format!("unknown phase `{p}`")))?,
        ),
    };
    let crash_records = run.crash_after_records;
    let hook: Option<super::Hook> = (crash_phase.is_some() || crash_records.is_some()).then(|| {
        Arc::new(move |p: &HookPoint| {
            let hit = match p {
                HookPoint::Phase(ph) => crash_phase == Some(*ph),
                HookPoint::Copied(n) => crash_records.is_some_and(|k| *n >= k),
                HookPoint::Acked(_) | HookPoint::Lag(_) => false,
            };
            if hit {
                eprintln!("backfill: simulated crash at {p:?}");
                std::process::exit(CRASH_EXIT_CODE);
            }
            false
        }) as super::Hook
    });
    Ok(BackfillOptions {
        kafka: KafkaProperties::new(),
        profiles,
        timeout,
        checkpoint_every: run.checkpoint_every,
        batch: run.batch,
        wait_timeout: run.wait_timeout,
        teardown_timeout: run.teardown_timeout,
        ack_timeout: run.ack_timeout,
        delivery_timeout: run.delivery_timeout,
        progress: match run.progress {
            ProgressArg::Auto => ProgressMode::Auto,
            ProgressArg::Bars => ProgressMode::Bars,
            ProgressArg::Lines => ProgressMode::Lines,
            ProgressArg::Quiet => ProgressMode::Quiet,
        },
        hook,
    })
}

/// A human-readable summary of a backfill.
pub fn record_text(r: &BackfillRecord) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let total = r.total_records();
    let copied = r.copied_records();
    let _ = writeln!(s, "backfill {}  phase {}", r.name, r.phase);
    let _ = writeln!(
        s,
        "  source   {}:{} ({})",
        r.source.cluster.as_deref().unwrap_or(&r.source.bootstrap),
        r.source.topic,
        r.source.bootstrap
    );
    let _ = writeln!(s, "  range    from {} to {}", r.from, r.to);
    for p in &r.ranges {
        let pos = r
            .checkpoint
            .as_ref()
            .and_then(|c| c.positions.get(&p.partition).copied())
            .unwrap_or(p.from);
        let _ = writeln!(
            s,
            "    partition {:>3}  [{}, {})  copied up to {pos}",
            p.partition, p.from, p.to
        );
    }
    let _ = writeln!(
        s,
        "  target   {} ({} partitions){}",
        r.target_topic,
        r.target_partitions,
        r.epoch.map_or(String::new(), |e| format!(", epoch {e}"))
    );
    for c in &r.clusters {
        let _ = writeln!(
            s,
            "  cluster  {}  {}{}{}",
            c.id,
            c.bootstrap.as_deref().unwrap_or("(not provisioned yet)"),
            if c.provisioned { "  provisioned" } else { "" },
            if c.deprovisioned {
                ", deprovisioned"
            } else {
                ""
            }
        );
    }
    let _ = writeln!(s, "  groups   {}", r.groups.join(", "));
    let _ = writeln!(
        s,
        "  progress {copied}/{total} records ({:.1}%)",
        if total == 0 {
            100.0
        } else {
            copied as f64 * 100.0 / total as f64
        }
    );
    if r.skipped_duplicates > 0 {
        let _ = writeln!(
            s,
            "  dedupe   {} records found already copied on resume (not copied again)",
            r.skipped_duplicates
        );
    }
    if let Some(e) = &r.last_error {
        let _ = writeln!(s, "  error    {e}");
    }
    for n in &r.notes {
        let _ = writeln!(s, "  note     {n}");
    }
    s
}

/// Runs one `flotilla backfill` subcommand.
pub async fn run(
    cp: ControlPlane,
    cmd: &BackfillCommand,
    fmt: OutputFormat,
    timeout: Duration,
    profiles: SecurityProfiles,
) -> Result<(), BackfillError> {
    let show = |r: &BackfillRecord| output::print(fmt, r, || record_text(r));
    match cmd {
        BackfillCommand::Start(a) => {
            let bound = |s: &str| Bound::parse(s).map_err(BackfillError::BadInput);
            let req = StartRequest {
                name: a.name.clone(),
                source: a.source.clone(),
                from: bound(&a.from)?,
                to: bound(&a.to)?,
                target_topic: a.target_topic.clone(),
                clusters: a.clusters.clone(),
                provision_cmd: a.provision_cmd.clone(),
                count: a.count,
                deprovision_cmd: a.deprovision_cmd.clone(),
                groups: a.groups.clone(),
                expires_in: a.expires_in,
            };
            let bf = Backfill::new(cp, options(&a.run, timeout, profiles)?);
            show(&bf.start(&req).await?);
        }
        BackfillCommand::Status { name } => {
            let bf = Backfill::new(cp, BackfillOptions::default());
            match name {
                Some(n) => show(&bf.status(n).await?),
                None => {
                    let all = bf.list().await?;
                    output::print(fmt, &all, || {
                        if all.is_empty() {
                            "no backfills\n".into()
                        } else {
                            all.iter().map(record_text).collect()
                        }
                    });
                }
            }
        }
        BackfillCommand::Resume(a) => {
            let bf = Backfill::new(cp, options(&a.run, timeout, profiles)?);
            show(&bf.resume(&a.name).await?);
        }
        BackfillCommand::Abort(a) => {
            let bf = Backfill::new(cp, options(&a.run, timeout, profiles)?);
            show(&bf.abort(&a.name).await?);
        }
    }
    Ok(())
}
