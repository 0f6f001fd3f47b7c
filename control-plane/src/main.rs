//! `flotilla`: the control-plane CLI.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use flotilla_client::kafka::{KafkaProperties, SecurityProfiles};
use flotilla_client::registry::etcd::{EtcdKv, EtcdOptions};
use flotilla_client::registry::{ClusterRole, ClusterState, Registry};
use flotilla_control::cli::args::{
    Cli, ClusterCommand, Command, ControllerArgs, OutputFormat, RouteCommand,
};
use flotilla_control::cli::output;
use flotilla_control::controller::{self, now_millis, Controller, ElectionOptions, Leadership};
use flotilla_control::{AddCluster, ControlPlane, RdKafkaFleet, RouteOutcome, SetRoute};
use tokio::sync::watch;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own story; the daemons and commands log progress.
    let default_filter = match cli.command {
        // librdkafka reports every closed connection at error level; the demo shuts its
        // embedded clusters down on purpose at the end.
        Command::Demo(_) => "error,librdkafka=off,rdkafka::client=off",
        _ => "warn,flotilla=info,flotilla_control=info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOTILLA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(cli: &Cli) -> anyhow::Result<ControlPlane> {
    let opts = EtcdOptions {
        connect_timeout: cli.timeout,
        op_timeout: cli.timeout,
        ..EtcdOptions::default()
    };
    let kv = EtcdKv::connect(&cli.endpoints, opts).await?;
    let registry = Registry::new(Arc::new(kv), cli.fleet.clone());
    let profiles = SecurityProfiles::from_env().context("loading security profiles")?;
    let kafka = RdKafkaFleet::new(KafkaProperties::new(), profiles, cli.timeout);
    Ok(ControlPlane::new(registry, Arc::new(kafka)))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let fmt = cli.output;
    match &cli.command {
        Command::Demo(args) => flotilla_control::demo::run(args).await,
        Command::Cluster(cmd) => {
            let cp = connect(&cli).await?;
            cluster(&cp, cmd, fmt, &cli).await
        }
        Command::Route(cmd) => {
            let cp = connect(&cli).await?;
            route(&cp, cmd, fmt, &cli).await
        }
        Command::Status => {
            let cp = connect(&cli).await?;
            let s = cp.status().await?;
            output::print(fmt, &s, || output::status_text(&s));
            Ok(())
        }
        Command::Controller(args) => {
            let cp = connect(&cli).await?;
            run_controller(cp, args).await
        }
        Command::Backfill(cmd) => {
            let cp = connect(&cli).await?;
            let profiles = SecurityProfiles::from_env().context("loading security profiles")?;
            flotilla_control::backfill::command::run(cp, cmd, fmt, cli.timeout, profiles).await?;
            Ok(())
        }
    }
}

async fn cluster(
    cp: &ControlPlane,
    cmd: &ClusterCommand,
    fmt: OutputFormat,
    cli: &Cli,
) -> anyhow::Result<()> {
    let show = |spec: &flotilla_client::registry::ClusterSpec| {
        output::print(fmt, spec, || {
            output::clusters_table(std::slice::from_ref(spec))
        });
    };
    match cmd {
        ClusterCommand::Add(a) => {
            let now = now_millis();
            let role = match &a.temporary {
                None => ClusterRole::Permanent,
                Some(purpose) => ClusterRole::Temporary {
                    purpose: purpose.clone(),
                    expires_at: now + a.expires_in.as_millis() as u64,
                },
            };
            let req = AddCluster {
                id: a.id.clone(),
                bootstrap: a.bootstrap.clone(),
                weight: a.weight,
                role,
                labels: a.labels.iter().cloned().collect(),
                security_profile: a.security_profile.clone(),
                activate: a.activate,
            };
            let outcome = cp.add_cluster(req, now).await?;
            output::print(fmt, &outcome, || match &outcome {
                flotilla_control::AddOutcome::Created { spec } => {
                    format!(
                        "registered cluster {} (Kafka cluster id {}, {})\n",
                        spec.id, spec.kafka_cluster_id, spec.state
                    )
                }
                flotilla_control::AddOutcome::AlreadyRegistered { spec } => {
                    format!(
                        "cluster {} was already registered ({}); nothing changed\n",
                        spec.id, spec.state
                    )
                }
            });
        }
        ClusterCommand::Activate(a) => show(&cp.activate(&a.id).await?),
        ClusterCommand::Drain(a) => {
            let spec = cp.drain(&a.id).await?;
            show(&spec);
            if a.wait {
                reconcile(cp, cli, fmt).await?;
            }
        }
        ClusterCommand::Retire(a) => {
            let spec = cp.retire(&a.id).await?;
            show(&spec);
            debug_assert_eq!(spec.state, ClusterState::Retired);
        }
        ClusterCommand::List => {
            let all = cp.clusters().await?;
            output::print(fmt, &all, || output::clusters_table(&all));
        }
        ClusterCommand::Show { id } => show(&cp.cluster(id).await?),
    }
    Ok(())
}

fn parse_write_set(items: &[String]) -> anyhow::Result<Vec<(String, Option<u32>)>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            None => Ok((s.clone(), None)),
            Some((id, w)) => {
                let w: u32 = w.parse().map_err(|_| {
                    anyhow::anyhow!(
                        "bad weight in `--cluster {s}`: expected a whole number ≥ 1, like {id}=100"
                    )
                })?;
                if w == 0 {
                    anyhow::bail!("bad weight in `--cluster {s}`: weights must be at least 1");
                }
                Ok((id.to_string(), Some(w)))
            }
        })
        .collect()
}

async fn route(
    cp: &ControlPlane,
    cmd: &RouteCommand,
    fmt: OutputFormat,
    cli: &Cli,
) -> anyhow::Result<()> {
    match cmd {
        RouteCommand::Set(a) => {
            let req = SetRoute {
                topic: a.topic.clone(),
                clusters: parse_write_set(&a.clusters)?,
                partitions: a.partitions,
                ack_timeout_ms: a.ack_timeout.as_millis() as u64,
            };
            let outcome = cp.set_route(req, now_millis()).await?;
            output::print(fmt, &outcome, || {
                let head = match &outcome {
                    RouteOutcome::Created { .. } => "route created",
                    RouteOutcome::Proposed { .. } => {
                        "new epoch proposed (pending until the controller completes the switch)"
                    }
                    RouteOutcome::Unchanged { .. } => "route unchanged",
                };
                format!("{head}\n{}", output::route_text(outcome.route()))
            });
            if a.wait && matches!(outcome, RouteOutcome::Proposed { .. }) {
                let ctl = Controller::new(cp.clone());
                let r = ctl
                    .reconcile_until_settled(
                        a.ack_timeout + cli.timeout,
                        std::time::Duration::from_millis(200),
                    )
                    .await?;
                if fmt == OutputFormat::Table {
                    print!("{}", output::report_text(&r));
                }
                if !r.switches_done() {
                    anyhow::bail!("the switch of {} did not complete in time; a running controller will finish it", a.topic);
                }
            }
        }
        RouteCommand::Abort { topic } => {
            let r = cp.abort_switch(topic).await?;
            output::print(fmt, &r, || {
                format!("switch aborted\n{}", output::route_text(&r))
            });
        }
        RouteCommand::Show { topic } => {
            let r = cp.route(topic).await?;
            output::print(fmt, &r, || output::route_text(&r));
        }
    }
    Ok(())
}

async fn reconcile(cp: &ControlPlane, _cli: &Cli, fmt: OutputFormat) -> anyhow::Result<()> {
    let r = Controller::new(cp.clone())
        .reconcile_once(now_millis())
        .await?;
    output::print(fmt, &r, || output::report_text(&r));
    Ok(())
}

async fn run_controller(cp: ControlPlane, args: &ControllerArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the Prometheus endpoint on {addr}"))?;
        // The leader's registry watch (it triggers the reconcile passes).
        flotilla_client::registry::watcher::describe_metrics();
    }
    let id = args.id.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
        format!("{host}-{}", std::process::id())
    });
    let (lead_tx, mut lead_rx) = watch::channel(Leadership::Follower);
    let (stop_tx, stop_rx) = watch::channel(false);
    let leader_file = args.leader_file.clone();
    tokio::spawn(async move {
        while lead_rx.changed().await.is_ok() {
            let state = *lead_rx.borrow();
            if let Some(f) = &leader_file {
                let _ = match state {
                    Leadership::Leader => std::fs::write(f, b"leader"),
                    Leadership::Follower => std::fs::remove_file(f),
                };
            }
        }
    });
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = stop_tx.send(true);
    });
    let opts = ElectionOptions {
        id,
        lease_ttl: args.lease_ttl,
        interval: args.interval,
    };
    controller::run_elected(Controller::new(cp), opts, lead_tx, stop_rx).await?;
    Ok(())
}
