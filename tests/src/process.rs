//! Process, port and folder plumbing shared by the etcd and Kafka harnesses.

use crate::HarnessError;
use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Loopback ports handed out by this process (never handed out twice).
static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// Lowest candidate port. Candidates lie below Linux's default ephemeral range
/// (32768–60999), so outgoing client connections never take a port the harness
/// reserved for a server that is restarted later.
const PORT_LO: u16 = 20000;
/// One past the highest candidate port.
const PORT_HI: u16 = 32700;

/// `N` bytes from `/dev/urandom`.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let filled = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !filled {
        // Fallback: mix the clock, the pid and a counter (good enough for ports/ids in tests).
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut x = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ (u64::from(std::process::id()) << 32)
            ^ COUNTER.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        for b in buf.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    buf
}

/// A free loopback TCP port in 20000..32700 that this process has not handed out
/// before. Free means: binding `127.0.0.1:port` succeeded just now.
pub fn free_port() -> Result<u16, HarnessError> {
    const ATTEMPTS: usize = 2000;
    let mut guard = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let used = guard.get_or_insert_with(HashSet::new);
    for _ in 0..ATTEMPTS {
        let r = u16::from_le_bytes(random_bytes::<2>());
        let port = PORT_LO + r % (PORT_HI - PORT_LO);
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            used.insert(port);
            return Ok(port);
        }
    }
    Err(HarnessError::NoFreePort { attempts: ATTEMPTS })
}

/// Finds `program` on `PATH` (or as an absolute/relative path), then in `extra` folders.
pub fn find_program(program: &str, extra: &[&str]) -> Option<PathBuf> {
    let direct = Path::new(program);
    if direct.components().count() > 1 {
        return is_executable(direct).then(|| direct.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Sends `signal` to every process of process group `pgid`. Errors (e.g. the
/// group is already gone) are ignored.
pub fn signal_group(pgid: i32, signal: i32) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Whether process `pid` exists (it may be a zombie).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks for existence/permission.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether any process of process group `pgid` still exists.
pub fn group_alive(pgid: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: kill(2) with signal 0 only checks for existence/permission.
    let rc = unsafe { libc::kill(-pgid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether servers started from now on may outlive this process.
static OUTLIVE: AtomicBool = AtomicBool::new(false);

/// `true`: servers started from now on survive the exit of this process (no
/// parent-death signal); needed before [`crate::EtcdServer::into_detached`] /
/// [`crate::KafkaFleet::into_detached`] can leave them running, as
/// `flotilla-fleet up` does. `false` (the default): they are SIGKILLed by the
/// kernel when this process dies, whatever the reason.
pub fn set_outlive_process(outlive: bool) {
    OUTLIVE.store(outlive, Ordering::SeqCst);
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// Runs `f` on the harness's spawner thread, which lives as long as the
/// process. `PR_SET_PDEATHSIG` fires when the *thread* that forked a child
/// exits, so children must not be forked from short-lived (test) threads.
fn on_spawner_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnJob>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("flotilla-testkit-spawner".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("start the harness spawner thread");
        Mutex::new(tx)
    });
    let (result_tx, result_rx) = mpsc::sync_channel(1);
    let job: SpawnJob = Box::new(move || {
        let _ = result_tx.send(f());
    });
    sender
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .expect("harness spawner thread is gone");
    result_rx
        .recv()
        .expect("harness spawner thread dropped a job")
}

/// A child process that leads its own process group, with stdout and stderr
/// appended to a log file. Signals go to the whole group.
#[derive(Debug)]
pub struct ManagedProcess {
    child: Child,
    exited: Option<ExitStatus>,
}

impl ManagedProcess {
    /// Spawns `cmd` as leader of a new process group, stdin from /dev/null,
    /// stdout and stderr appended to `log`.
    ///
    /// Unless [`set_outlive_process`]`(true)` was called, the child also gets
    /// `PR_SET_PDEATHSIG = SIGKILL` and is forked from one long-lived harness
    /// thread, so it dies with this process even when no `Drop` runs (test
    /// binary SIGKILLed, Ctrl-C, `cargo test` timeout).
    pub fn spawn(mut cmd: Command, log: &Path) -> Result<Self, HarnessError> {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| HarnessError::io(format!("open {}", log.display()), e))?;
        let err = out
            .try_clone()
            .map_err(|e| HarnessError::io("dup log file", e))?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let program = format!("{:?}", cmd.get_program());
        let child = if OUTLIVE.load(Ordering::SeqCst) {
            cmd.spawn()
        } else {
            // SAFETY: getpid is async-signal-safe; it runs before the fork.
            let parent = unsafe { libc::getpid() };
            // SAFETY: the closure only calls async-signal-safe functions
            // (prctl, getppid) between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before prctl took effect: do not run orphaned.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
            on_spawner_thread(move || cmd.spawn())
        }
        .map_err(|e| HarnessError::io(format!("spawn {program}"), e))?;
        Ok(ManagedProcess {
            child,
            exited: None,
        })
    }

    /// The process id, which is also the process-group id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// SIGKILL to the whole process group, then reap the leader.
    pub fn kill(&mut self) {
        signal_group(self.pid(), libc::SIGKILL);
        if self.exited.is_none() {
            self.exited = self.child.wait().ok();
        }
    }

    /// SIGTERM to the process group; waits up to `grace` for the leader to exit,
    /// then SIGKILLs the group.
    pub fn terminate(&mut self, grace: Duration) {
        if self.exit_status().is_none() {
            signal_group(self.pid(), libc::SIGTERM);
            let deadline = Instant::now() + grace;
            while self.exit_status().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill();
    }

    /// Gives up ownership without killing: the process keeps running after this
    /// handle (and this program) is gone. Returns its pid (= process group id).
    pub fn detach(self) -> i32 {
        self.pid()
    }
}

/// The last `lines` lines of a text file (reads at most the last 256 KiB).
/// Returns a note instead when the file cannot be read.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 256 * 1024;
    let read = || -> std::io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(MAX)))?;
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    match read() {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Name of the marker file holding the pid of the process that owns a server
/// folder. Detached folders have no owner file and are never reaped.
pub const OWNER_FILE: &str = "owner.pid";
/// Name of the file holding the process-group id of a folder's server.
pub const PGID_FILE: &str = "server.pgid";

/// Creates a fresh, uniquely named folder `base/<prefix>XXXXXX` owned by this
/// process (it writes [`OWNER_FILE`]). First reaps stale folders in `base`.
pub fn make_server_dir(base: &Path, prefix: &str) -> Result<PathBuf, HarnessError> {
    fs::create_dir_all(base)
        .map_err(|e| HarnessError::io(format!("create {}", base.display()), e))?;
    reap_stale(base);
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .map_err(|e| HarnessError::io(format!("create temp dir in {}", base.display()), e))?
        .keep();
    fs::write(dir.join(OWNER_FILE), std::process::id().to_string())
        .map_err(|e| HarnessError::io(format!("write owner file in {}", dir.display()), e))?;
    Ok(dir)
}

/// Records the process-group id of the server living in `dir`.
pub fn write_pgid(dir: &Path, pgid: i32) {
    let _ = fs::write(dir.join(PGID_FILE), pgid.to_string());
}

/// Marks `dir` as detached: no owner, so no later run reaps it.
pub fn disown_dir(dir: &Path) {
    let _ = fs::remove_file(dir.join(OWNER_FILE));
}

fn read_i32(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Kills and removes server folders in `base` whose owning test process is gone
/// (left behind by a test binary that was SIGKILLed, so its `Drop`s never ran).
pub fn reap_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Some(owner) = read_i32(&dir.join(OWNER_FILE)) else {
            continue;
        };
        if pid_alive(owner) {
            continue;
        }
        if let Some(pgid) = read_i32(&dir.join(PGID_FILE)) {
            signal_group(pgid, libc::SIGKILL);
        }
        let _ = fs::remove_dir_all(&dir);
    }
}
