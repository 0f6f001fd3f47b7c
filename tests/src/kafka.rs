//! N independent single-node Apache Kafka clusters (KRaft, broker + controller
//! in one JVM) on loopback ports, started in parallel.

use crate::process::{self, ManagedProcess};
use crate::HarnessError;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{BaseProducer, Producer};
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Default readiness deadline per cluster; override with
/// `FLOTILLA_KAFKA_START_TIMEOUT_SECS`.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`KafkaCluster::stop`] waits for a graceful shutdown before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// Lines of broker log included in start-up errors.
const ERROR_TAIL_LINES: usize = 40;
/// JVM tuning used unless `FLOTILLA_KAFKA_JVM_OPTS` replaces it: small heap,
/// serial GC, C1 only (fast start-up, plenty for tests).
const DEFAULT_JVM_OPTS: &str = "-Xms32m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
     -XX:+ExitOnOutOfMemoryError -XX:-UsePerfData -Djava.awt.headless=true";

/// Options for [`KafkaFleet::start_with`].
#[derive(Debug, Clone, Default)]
pub struct KafkaOptions {
    /// Folder under which each cluster gets its own sub-folder; `None` means
    /// [`crate::default_base_dir`].
    pub base_dir: Option<PathBuf>,
    /// Extra `server.properties` lines (`key`, `value`), appended after the
    /// harness defaults (so they override them).
    pub extra_properties: Vec<(String, String)>,
}

/// Where the JVM, the jars and the log4j2 config are.
#[derive(Debug, Clone)]
struct Runtime {
    java: PathBuf,
    libs: PathBuf,
    log4j: PathBuf,
    jvm_opts: Vec<String>,
    heap: String,
    /// Extra JVM flags for the broker JVM only (class-data-sharing archive).
    broker_opts: Vec<String>,
}

impl Runtime {
    fn locate() -> Result<Runtime, HarnessError> {
        let java = locate_java()?;
        let libs = ensure_kafka_libs()?;
        let log4j = match std::env::var_os("FLOTILLA_KAFKA_LOG4J") {
            Some(p) => PathBuf::from(p),
            None => crate::repo_root().join("tools/kafka/log4j2.properties"),
        };
        if !log4j.is_file() {
            return Err(HarnessError::KafkaJars(format!(
                "log4j2 config {} is missing",
                log4j.display()
            )));
        }
        let opts =
            std::env::var("FLOTILLA_KAFKA_JVM_OPTS").unwrap_or_else(|_| DEFAULT_JVM_OPTS.into());
        let heap = std::env::var("FLOTILLA_KAFKA_HEAP").unwrap_or_else(|_| "384m".into());
        let mut runtime = Runtime {
            java,
            libs,
            log4j,
            jvm_opts: opts.split_whitespace().map(String::from).collect(),
            heap,
            broker_opts: Vec::new(),
        };
        if let Some(archive) = ensure_cds_archive(&runtime) {
            runtime.broker_opts = vec![
                format!("-XX:SharedArchiveFile={}", archive.display()),
                "-Xshare:auto".into(),
            ];
        }
        // Options for the brokers only, not the storage tool (e.g. `-Xms`,
        // which the tool's smaller heap would refuse).
        if let Ok(extra) = std::env::var("FLOTILLA_KAFKA_BROKER_JVM_OPTS") {
            runtime
                .broker_opts
                .extend(extra.split_whitespace().map(String::from));
        }
        Ok(runtime)
    }

    /// `java <opts> <extra> -cp libs/* <main>` for a cluster living in `dir`.
    fn command(&self, dir: &Path, heap: &str, extra: &[String], main: &str) -> Command {
        let mut cmd = Command::new(&self.java);
        cmd.arg(format!("-Xmx{heap}"))
            .args(&self.jvm_opts)
            .args(extra)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.log4j.display()
            ))
            .arg(format!("-Dkafka.logs.dir={}", dir.display()))
            .arg("-Dlog4j2.disable.jmx=true")
            .arg("-cp")
            .arg(format!("{}/*", self.libs.display()))
            .arg(main)
            .current_dir(dir);
        cmd
    }
}

/// A dynamic class-data-sharing (AppCDS) archive of the broker's classes, which
/// cuts a broker JVM's start-up CPU by about a third. Created once per JVM +
/// jar folder under `.cache/kafka/cds/` by starting a throwaway broker with
/// `-XX:ArchiveClassesAtExit` and stopping it gracefully (~10 s, once).
/// `FLOTILLA_KAFKA_CDS=0` disables it. Best effort: any failure means `None`
/// (brokers then start without the archive).
fn ensure_cds_archive(runtime: &Runtime) -> Option<PathBuf> {
    use std::hash::{Hash, Hasher};
    static CREATE: Mutex<()> = Mutex::new(());
    if std::env::var("FLOTILLA_KAFKA_CDS").is_ok_and(|v| v == "0") {
        return None;
    }
    // Key: the JVM binary (path, size, mtime), the jar folder and its listing, the JVM flags.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let java = fs::canonicalize(&runtime.java).unwrap_or_else(|_| runtime.java.clone());
    java.hash(&mut hasher);
    if let Ok(m) = fs::metadata(&java) {
        m.len().hash(&mut hasher);
        m.modified().ok().hash(&mut hasher);
    }
    runtime.libs.hash(&mut hasher);
    let mut jars: Vec<String> = fs::read_dir(&runtime.libs)
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    jars.sort();
    jars.hash(&mut hasher);
    runtime.jvm_opts.hash(&mut hasher);
    let dir = crate::repo_root().join(".cache/kafka/cds");
    let archive = dir.join(format!("broker-{:016x}.jsa", hasher.finish()));
    let _guard = CREATE.lock().unwrap_or_else(|e| e.into_inner());
    if archive.is_file() {
        return Some(archive);
    }
    fs::create_dir_all(&dir).ok()?;
    let tmp = dir.join(format!(
        "broker-{}-{}.jsa.tmp",
        std::process::id(),
        u32::from_le_bytes(process::random_bytes::<4>())
    ));
    let mut training = runtime.clone();
    training.broker_opts = vec![format!("-XX:ArchiveClassesAtExit={}", tmp.display())];
    let base = crate::default_base_dir();
    // Keep the archive only if a JVM can map it (`-Xshare:on` fails otherwise),
    // e.g. not when the dump was cut short.
    let usable = |workdir: &Path| {
        let flags = [
            format!("-XX:SharedArchiveFile={}", tmp.display()),
            "-Xshare:on".into(),
        ];
        let mut check = runtime.command(workdir, "128m", &flags, "kafka.Kafka");
        check.arg("--version");
        check.output().map(|o| o.status.success()).unwrap_or(false)
    };
    let ok = match KafkaCluster::launch(0, &base, Arc::new(training), &KafkaOptions::default()) {
        Ok(mut cluster) => {
            cluster.stop();
            tmp.is_file() && usable(cluster.dir())
        }
        Err(_) => false,
    };
    if ok && fs::rename(&tmp, &archive).is_ok() {
        Some(archive)
    } else {
        let _ = fs::remove_file(&tmp);
        None
    }
}

fn locate_java() -> Result<PathBuf, HarnessError> {
    if let Some(home) = std::env::var_os("JAVA_HOME") {
        let java = PathBuf::from(home).join("bin/java");
        if java.is_file() {
            return Ok(java);
        }
    }
    process::find_program("java", &["/usr/bin"]).ok_or_else(|| HarnessError::MissingProgram {
        program: "java".into(),
        hint: "install a JDK/JRE >= 17, e.g. `apt-get install -y openjdk-17-jre-headless` \
               (or run `scripts/install-deps`)"
            .into(),
    })
}

/// The Kafka version pinned in `tools/kafka/pom.xml` (`<kafka.version>`).
pub fn kafka_version() -> Result<String, HarnessError> {
    let pom = crate::repo_root().join("tools/kafka/pom.xml");
    let text = fs::read_to_string(&pom)
        .map_err(|e| HarnessError::io(format!("read {}", pom.display()), e))?;
    let start = text
        .find("<kafka.version>")
        .map(|i| i + "<kafka.version>".len());
    let version = start.and_then(|s| text[s..].find("</kafka.version>").map(|e| &text[s..s + e]));
    version
        .map(|v| v.trim().to_string())
        .ok_or_else(|| HarnessError::KafkaJars(format!("no <kafka.version> in {}", pom.display())))
}

/// The folder with the broker jars, fetching them first if needed.
///
/// `FLOTILLA_KAFKA_LIBS` overrides the folder (it must already contain
/// `kafka_2.13-*.jar`). Otherwise the folder is `.cache/kafka/<version>/libs`
/// in the repository, complete once `.cache/kafka/<version>/.complete` exists;
/// when that marker is missing this runs `scripts/fetch-kafka` (once per process).
pub fn ensure_kafka_libs() -> Result<PathBuf, HarnessError> {
    static FETCH: Mutex<()> = Mutex::new(());
    if let Some(dir) = std::env::var_os("FLOTILLA_KAFKA_LIBS") {
        let dir = PathBuf::from(dir);
        return if has_kafka_jar(&dir) {
            Ok(dir)
        } else {
            Err(HarnessError::KafkaJars(format!(
                "FLOTILLA_KAFKA_LIBS={} contains no kafka_2.13-*.jar",
                dir.display()
            )))
        };
    }
    let root = crate::repo_root();
    let version = kafka_version()?;
    let cache = root.join(".cache/kafka").join(&version);
    let libs = cache.join("libs");
    let marker = cache.join(".complete");
    let _guard = FETCH.lock().unwrap_or_else(|e| e.into_inner());
    if marker.is_file() && has_kafka_jar(&libs) {
        return Ok(libs);
    }
    let script = root.join("scripts/fetch-kafka");
    let out = Command::new(&script)
        .current_dir(&root)
        .output()
        .map_err(|e| HarnessError::io(format!("run {}", script.display()), e))?;
    if !out.status.success() || !marker.is_file() || !has_kafka_jar(&libs) {
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let tail: Vec<&str> = text.lines().collect();
        return Err(HarnessError::CommandFailed {
            command: script.display().to_string(),
            status: out.status.to_string(),
            output: tail[tail.len().saturating_sub(30)..].join("\n"),
        });
    }
    Ok(libs)
}

fn has_kafka_jar(dir: &Path) -> bool {
    fs::read_dir(dir)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("kafka_2.13-") && name.ends_with(".jar")
            })
        })
        .unwrap_or(false)
}

/// A random Kafka cluster id: 16 random bytes as 22 characters of unpadded
/// base64url, never starting with `-` (it would read as a command-line flag).
pub fn random_cluster_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    loop {
        let bytes = process::random_bytes::<16>();
        let mut out = String::with_capacity(22);
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let chars = chunk.len() + 1;
            for i in 0..chars {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            }
        }
        if !out.starts_with('-') && bytes != [0u8; 16] {
            return out;
        }
    }
}

/// A set of independent single-node Kafka clusters. Dropping it kills every
/// JVM and removes every cluster folder (also during a panic's unwinding).
#[derive(Debug)]
pub struct KafkaFleet {
    clusters: Vec<KafkaCluster>,
}

impl KafkaFleet {
    /// Starts `n` clusters in parallel (each: own ports, folder and random
    /// cluster id) and waits until each answers a metadata request with its own
    /// cluster id (deadline ~60 s per cluster). Blocking; fine inside
    /// `#[tokio::test]`.
    pub fn start(n: usize) -> Result<KafkaFleet, HarnessError> {
        Self::start_with(n, &KafkaOptions::default())
    }

    /// Like [`KafkaFleet::start`], with the cluster folders inside `base`.
    pub fn start_in(n: usize, base: &Path) -> Result<KafkaFleet, HarnessError> {
        Self::start_with(
            n,
            &KafkaOptions {
                base_dir: Some(base.to_path_buf()),
                ..KafkaOptions::default()
            },
        )
    }

    /// Like [`KafkaFleet::start`], with [`KafkaOptions`].
    pub fn start_with(n: usize, options: &KafkaOptions) -> Result<KafkaFleet, HarnessError> {
        let runtime = Arc::new(Runtime::locate()?);
        let base = options
            .base_dir
            .clone()
            .unwrap_or_else(crate::default_base_dir);
        let results: Vec<Result<KafkaCluster, HarnessError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..n)
                .map(|index| {
                    let runtime = Arc::clone(&runtime);
                    let base = &base;
                    scope.spawn(move || KafkaCluster::launch(index, base, runtime, options))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(HarnessError::Kafka(
                            "cluster start-up thread panicked".into(),
                        ))
                    })
                })
                .collect()
        });
        let mut clusters = Vec::with_capacity(n);
        let mut first_error = None;
        for result in results {
            match result {
                Ok(cluster) => clusters.push(cluster),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            // The clusters that did start are dropped (killed, removed) here.
            Some(e) => Err(e),
            None => Ok(KafkaFleet { clusters }),
        }
    }

    /// Cluster `i` (0-based). Panics when out of range.
    pub fn cluster(&self, i: usize) -> &KafkaCluster {
        &self.clusters[i]
    }

    /// Cluster `i` (0-based), mutable (for kill/stop/restart). Panics when out of range.
    pub fn cluster_mut(&mut self, i: usize) -> &mut KafkaCluster {
        &mut self.clusters[i]
    }

    /// All clusters, in index order.
    pub fn clusters(&self) -> &[KafkaCluster] {
        &self.clusters
    }

    /// Number of clusters.
    pub fn len(&self) -> usize {
        self.clusters.len()
    }

    /// Whether the fleet has no clusters.
    pub fn is_empty(&self) -> bool {
        self.clusters.is_empty()
    }

    /// The bootstrap address of every cluster, in index order.
    pub fn bootstraps(&self) -> Vec<String> {
        self.clusters.iter().map(KafkaCluster::bootstrap).collect()
    }

    /// Leaks every cluster on purpose: the JVMs keep running and the folders
    /// stay after this handle is gone. They also outlive this program only if
    /// they were started after [`crate::process::set_outlive_process`]`(true)`.
    pub fn into_detached(self) -> Vec<DetachedKafkaCluster> {
        self.clusters
            .into_iter()
            .map(KafkaCluster::into_detached)
            .collect()
    }
}

/// What remains of a [`KafkaCluster`] after [`KafkaCluster::into_detached`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachedKafkaCluster {
    /// Index in the fleet it was started with.
    pub index: usize,
    /// JVM process id, also the process-group id.
    pub pid: i32,
    /// Bootstrap address, `127.0.0.1:PORT`.
    pub bootstrap: String,
    /// The Kafka cluster id the storage was formatted with.
    pub kafka_cluster_id: String,
    /// Controller (KRaft) port.
    pub controller_port: u16,
    /// The cluster's folder (`server.properties`, `data/`, `server.log`, `stdout.log`).
    pub dir: PathBuf,
}

/// One single-node KRaft cluster (broker and controller in one JVM).
#[derive(Debug)]
pub struct KafkaCluster {
    index: usize,
    dir: PathBuf,
    broker_port: u16,
    controller_port: u16,
    cluster_id: String,
    runtime: Arc<Runtime>,
    process: Option<ManagedProcess>,
    detached: bool,
}

impl KafkaCluster {
    fn launch(
        index: usize,
        base: &Path,
        runtime: Arc<Runtime>,
        options: &KafkaOptions,
    ) -> Result<KafkaCluster, HarnessError> {
        let dir = process::make_server_dir(base, &format!("kafka{index}-"))?;
        let mut cluster = KafkaCluster {
            index,
            dir,
            broker_port: 0,
            controller_port: 0,
            cluster_id: random_cluster_id(),
            runtime,
            process: None,
            detached: false,
        };
        // From here on Drop removes the folder (and kills the JVM) on failure.
        cluster.broker_port = process::free_port()?;
        cluster.controller_port = process::free_port()?;
        cluster.write_properties(&options.extra_properties)?;
        cluster.format()?;
        cluster.spawn()?;
        cluster.wait_ready()?;
        Ok(cluster)
    }

    fn write_properties(&self, extra: &[(String, String)]) -> Result<(), HarnessError> {
        let (b, c) = (self.broker_port, self.controller_port);
        let data = self.dir.join("data");
        let mut props = format!(
            "# Generated by flotilla-testkit: single-node KRaft cluster {index}.\n\
             process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{c}\n\
             listeners=PLAINTEXT://127.0.0.1:{b},CONTROLLER://127.0.0.1:{c}\n\
             advertised.listeners=PLAINTEXT://127.0.0.1:{b}\n\
             controller.listener.names=CONTROLLER\n\
             inter.broker.listener.name=PLAINTEXT\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             log.dirs={data}\n\
             num.partitions=4\n\
             default.replication.factor=1\n\
             min.insync.replicas=1\n\
             auto.create.topics.enable=false\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=4\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             transaction.state.log.num.partitions=4\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             share.coordinator.state.topic.num.partitions=1\n\
             group.initial.rebalance.delay.ms=0\n\
             broker.heartbeat.interval.ms=500\n\
             broker.session.timeout.ms=2000\n\
             num.network.threads=2\n\
             num.io.threads=2\n\
             background.threads=2\n\
             num.recovery.threads.per.data.dir=1\n\
             num.replica.fetchers=1\n\
             log.cleaner.threads=1\n\
             log.cleaner.dedupe.buffer.size=4194304\n",
            index = self.index,
            data = data.display(),
        );
        for (k, v) in extra {
            props.push_str(&format!("{k}={v}\n"));
        }
        let path = self.properties_path();
        fs::write(&path, props)
            .map_err(|e| HarnessError::io(format!("write {}", path.display()), e))
    }

    /// `kafka.tools.StorageTool format -t ID -c server.properties`.
    fn format(&self) -> Result<(), HarnessError> {
        let mut cmd = self
            .runtime
            .command(&self.dir, "128m", &[], "kafka.tools.StorageTool");
        cmd.arg("format")
            .arg("-t")
            .arg(&self.cluster_id)
            .arg("-c")
            .arg(self.properties_path());
        let out = cmd
            .output()
            .map_err(|e| HarnessError::io("run kafka.tools.StorageTool", e))?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(HarnessError::CommandFailed {
            command: format!(
                "kafka.tools.StorageTool format -t {} -c {}",
                self.cluster_id,
                self.properties_path().display()
            ),
            status: out.status.to_string(),
            output: text,
        })
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let heap = self.runtime.heap.clone();
        let mut cmd =
            self.runtime
                .command(&self.dir, &heap, &self.runtime.broker_opts, "kafka.Kafka");
        cmd.arg(self.properties_path());
        let p = ManagedProcess::spawn(cmd, &self.stdout_path())?;
        process::write_pgid(&self.dir, p.pid());
        self.process = Some(p);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let timeout = std::env::var("FLOTILLA_KAFKA_START_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_START_TIMEOUT);
        let started = Instant::now();
        let what = format!("kafka cluster {} ({})", self.index, self.bootstrap());
        let probe: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .set("reconnect.backoff.ms", "50")
            .set("reconnect.backoff.max.ms", "250")
            .set("socket.connection.setup.timeout.ms", "1000")
            .create()
            .map_err(|e| HarnessError::Kafka(format!("create probe client: {e}")))?;
        let mut last_error;
        loop {
            let status = self.process.as_mut().and_then(|p| p.exit_status());
            if let Some(status) = status {
                self.process = None;
                return Err(HarnessError::Exited {
                    what,
                    status: status.to_string(),
                    log: self.log_path(),
                    tail: self.log_tail(ERROR_TAIL_LINES),
                });
            }
            match probe
                .client()
                .fetch_metadata(None, Duration::from_millis(1000))
            {
                Ok(md) if md.brokers().is_empty() => last_error = "no broker registered yet".into(),
                Ok(_) => match probe.client().fetch_cluster_id(Duration::from_millis(1000)) {
                    Some(id) if id == self.cluster_id => return Ok(()),
                    Some(id) => {
                        last_error =
                            format!("answers with cluster id {id}, expected {}", self.cluster_id)
                    }
                    None => last_error = "no cluster id yet".into(),
                },
                Err(e) => last_error = format!("metadata request: {e}"),
            }
            if started.elapsed() >= timeout {
                return Err(HarnessError::NotReady {
                    what,
                    waited: started.elapsed(),
                    last_error,
                    log: self.log_path(),
                    tail: self.log_tail(ERROR_TAIL_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Index of this cluster in its fleet.
    pub fn index(&self) -> usize {
        self.index
    }

    /// Bootstrap address, `127.0.0.1:PORT`.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.broker_port)
    }

    /// The Kafka cluster id its storage was formatted with (22-char base64url).
    pub fn kafka_cluster_id(&self) -> &str {
        &self.cluster_id
    }

    /// The broker (PLAINTEXT) port.
    pub fn broker_port(&self) -> u16 {
        self.broker_port
    }

    /// The controller (KRaft) port.
    pub fn controller_port(&self) -> u16 {
        self.controller_port
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the generated `server.properties`.
    pub fn properties_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    /// Path of the broker's log4j2 log (`server.log`).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    /// Path of the JVM's stdout/stderr (`stdout.log`).
    pub fn stdout_path(&self) -> PathBuf {
        self.dir.join("stdout.log")
    }

    /// JVM process id (= process-group id) while running.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Whether the JVM is running (started and neither killed, stopped nor exited).
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => p.exit_status().is_none(),
            None => false,
        }
    }

    /// The last `lines` lines of `server.log`, followed by the tail of the
    /// JVM's stdout/stderr when that is not empty.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = process::log_tail(&self.log_path(), lines);
        let stdout = self.stdout_path();
        if fs::metadata(&stdout).map(|m| m.len() > 0).unwrap_or(false) {
            out.push_str("\n--- stdout/stderr ---\n");
            out.push_str(&process::log_tail(&stdout, lines.min(20)));
        }
        out
    }

    /// SIGKILLs the JVM (its whole process group); data stays. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Graceful stop: SIGTERM, wait for the JVM to exit (SIGKILL after 30 s).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.terminate(STOP_GRACE);
        }
    }

    /// Starts the cluster again on the same ports with the same data and
    /// cluster id (stopping it gracefully first if it still runs), and waits
    /// until it answers metadata requests.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.stop();
        self.spawn()?;
        self.wait_ready()
    }

    /// Leaks the cluster on purpose: the JVM keeps running and the folder stays
    /// (past this program's exit only with [`crate::process::set_outlive_process`]`(true)`).
    pub fn into_detached(mut self) -> DetachedKafkaCluster {
        self.detached = true;
        process::disown_dir(&self.dir);
        let pid = self.process.take().map(ManagedProcess::detach).unwrap_or(0);
        DetachedKafkaCluster {
            index: self.index,
            pid,
            bootstrap: self.bootstrap(),
            kafka_cluster_id: self.cluster_id.clone(),
            controller_port: self.controller_port,
            dir: self.dir.clone(),
        }
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Creates `topic` with `partitions` partitions (replication factor 1) on the
/// cluster at `bootstrap` through the rdkafka `AdminClient`, then waits (up to
/// 30 s) until metadata shows every partition with a leader. An already
/// existing topic is fine. Needs a tokio runtime (uses `spawn_blocking`).
pub async fn create_topic(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<(), HarnessError> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .map_err(|e| HarnessError::Kafka(format!("create admin client for {bootstrap}: {e}")))?;
    let new_topic = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let opts = AdminOptions::new()
        .request_timeout(Some(Duration::from_secs(15)))
        .operation_timeout(Some(Duration::from_secs(15)));
    let results = admin
        .create_topics([&new_topic], &opts)
        .await
        .map_err(|e| HarnessError::Kafka(format!("create topic {topic} on {bootstrap}: {e}")))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(HarnessError::Kafka(format!(
                    "create topic {name} on {bootstrap}: {code}"
                )))
            }
        }
    }
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || wait_topic_visible(&bootstrap, &topic, partitions))
        .await
        .map_err(|e| HarnessError::Kafka(format!("topic wait task: {e}")))?
}

/// [`create_topic`] for code without a tokio runtime (or inside one: it runs on
/// its own thread with its own runtime).
pub fn create_topic_blocking(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
) -> Result<(), HarnessError> {
    let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::io("build tokio runtime", e))?;
        rt.block_on(create_topic(&bootstrap, &topic, partitions))
    })
    .join()
    .unwrap_or_else(|_| Err(HarnessError::Kafka("create_topic thread panicked".into())))
}

fn wait_topic_visible(bootstrap: &str, topic: &str, partitions: i32) -> Result<(), HarnessError> {
    let probe: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("allow.auto.create.topics", "false")
        .create()
        .map_err(|e| HarnessError::Kafka(format!("create metadata client: {e}")))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::new();
    while Instant::now() < deadline {
        match probe
            .client()
            .fetch_metadata(Some(topic), Duration::from_secs(2))
        {
            Ok(md) => {
                let t = md.topics().iter().find(|t| t.name() == topic);
                match t {
                    Some(t) if t.error().is_none() => {
                        let ready = t
                            .partitions()
                            .iter()
                            .filter(|p| p.error().is_none() && p.leader() >= 0)
                            .count();
                        if ready == partitions as usize {
                            return Ok(());
                        }
                        last = format!("{ready}/{partitions} partitions have a leader");
                    }
                    Some(t) => last = format!("topic error {:?}", t.error()),
                    None => last = "topic not in metadata".into(),
                }
            }
            Err(e) => last = format!("metadata: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(HarnessError::Kafka(format!(
        "topic {topic} on {bootstrap} not ready after 30 s: {last}"
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cluster_ids_are_22_char_base64url() {
        for _ in 0..200 {
            let id = super::random_cluster_id();
            assert_eq!(id.len(), 22, "{id}");
            assert!(!id.starts_with('-'));
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        }
    }
}
