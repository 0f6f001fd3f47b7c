//! A throwaway single-member etcd on free loopback ports.

use crate::process::{self, ManagedProcess};
use crate::HarnessError;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How to install etcd when it is missing.
const INSTALL_HINT: &str =
    "install it with `apt-get install -y etcd-server` (or run `scripts/install-deps`)";

/// Default readiness deadline; override with `FLOTILLA_ETCD_START_TIMEOUT_SECS`.
const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running single-member etcd listening on `127.0.0.1`, with its own data
/// folder. Dropping it kills the process and removes the folder.
///
/// All methods are blocking; they are fine to call from a `#[tokio::test]`
/// (they block the calling thread for at most the readiness deadline).
#[derive(Debug)]
pub struct EtcdServer {
    etcd: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    process: Option<ManagedProcess>,
    detached: bool,
}

/// What remains of an [`EtcdServer`] after [`EtcdServer::into_detached`]: the
/// process keeps running and the folder stays until someone kills/removes them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DetachedEtcd {
    /// Process id, also the process-group id.
    pub pid: i32,
    /// Client endpoint, `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The server's folder (data in `data/`, log in `etcd.log`).
    pub dir: PathBuf,
}

impl EtcdServer {
    /// Starts etcd in a new folder under [`crate::default_etcd_base_dir`]
    /// (tmpfs when available) and waits
    /// (up to ~20 s) until `/health` on its client port reports healthy.
    ///
    /// Fails with [`HarnessError::MissingProgram`] naming the fix
    /// (`apt-get install -y etcd-server`) when etcd is not installed.
    pub fn start() -> Result<EtcdServer, HarnessError> {
        Self::start_in(&crate::default_etcd_base_dir())
    }

    /// Like [`EtcdServer::start`], with the server folder created inside `base`.
    pub fn start_in(base: &Path) -> Result<EtcdServer, HarnessError> {
        let etcd = locate_etcd()?;
        let dir = process::make_server_dir(base, "etcd-")?;
        let mut server = EtcdServer {
            etcd,
            dir,
            client_port: 0,
            peer_port: 0,
            process: None,
            detached: false,
        };
        // From here on, Drop cleans up the folder if anything fails.
        server.client_port = process::free_port()?;
        server.peer_port = process::free_port()?;
        server.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    /// The client endpoint, `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The server's folder: `data/` (etcd data dir) and `etcd.log`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the etcd log file (stdout and stderr of the process).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// The last `lines` lines of the etcd log.
    pub fn log_tail(&self, lines: usize) -> String {
        process::log_tail(&self.log_path(), lines)
    }

    /// Process id (= process-group id) while running.
    pub fn pid(&self) -> Option<i32> {
        self.process.as_ref().map(ManagedProcess::pid)
    }

    /// Whether the etcd process is running (started and not killed or exited).
    pub fn is_running(&mut self) -> bool {
        match self.process.as_mut() {
            Some(p) => p.exit_status().is_none(),
            None => false,
        }
    }

    /// SIGKILLs etcd (its whole process group). The data folder is kept, so
    /// [`EtcdServer::restart`] comes back with the same data. No-op when not running.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Restarts etcd on the same ports with the same data folder (killing it
    /// first if it still runs) and waits until it is healthy again.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        self.kill();
        self.spawn()?;
        self.wait_ready()
    }

    /// Leaks the server on purpose: the process keeps running and the folder
    /// stays after this handle is gone. It also outlives this program only if
    /// it was started after [`crate::process::set_outlive_process`]`(true)`.
    pub fn into_detached(mut self) -> DetachedEtcd {
        self.detached = true;
        process::disown_dir(&self.dir);
        let pid = self.process.take().map(ManagedProcess::detach).unwrap_or(0);
        DetachedEtcd {
            pid,
            endpoint: self.endpoint(),
            dir: self.dir.clone(),
        }
    }

    fn spawn(&mut self) -> Result<(), HarnessError> {
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.etcd);
        cmd.arg("--name")
            .arg("flotilla-test")
            .arg("--data-dir")
            .arg(self.dir.join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("flotilla-test={peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .current_dir(&self.dir);
        let p = ManagedProcess::spawn(cmd, &self.log_path())?;
        process::write_pgid(&self.dir, p.pid());
        self.process = Some(p);
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<(), HarnessError> {
        let timeout = std::env::var("FLOTILLA_ETCD_START_TIMEOUT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_START_TIMEOUT);
        let started = Instant::now();
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client_port));
        let mut last_error;
        loop {
            let status = self.process.as_mut().and_then(|p| p.exit_status());
            if let Some(status) = status {
                self.process = None;
                return Err(HarnessError::Exited {
                    what: format!("etcd on {}", self.endpoint()),
                    status: status.to_string(),
                    log: self.log_path(),
                    tail: self.log_tail(40),
                });
            }
            match probe_health(addr) {
                Ok(()) => return Ok(()),
                Err(e) => last_error = e,
            }
            if started.elapsed() >= timeout {
                return Err(HarnessError::NotReady {
                    what: format!("etcd on {}", self.endpoint()),
                    waited: started.elapsed(),
                    last_error,
                    log: self.log_path(),
                    tail: self.log_tail(40),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn locate_etcd() -> Result<PathBuf, HarnessError> {
    locate(&std::env::var("FLOTILLA_ETCD").unwrap_or_else(|_| "etcd".to_string()))
}

fn locate(wanted: &str) -> Result<PathBuf, HarnessError> {
    process::find_program(wanted, &["/usr/bin", "/usr/local/bin"]).ok_or_else(|| {
        HarnessError::MissingProgram {
            program: wanted.to_string(),
            hint: INSTALL_HINT.to_string(),
        }
    })
}

/// `GET /health` on the client port; Ok once etcd reports `"health":"true"`
/// (it has a leader and serves requests).
fn probe_health(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("GET /health on {addr}: {e}");
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    stream
        .set_write_timeout(Some(Duration::from_secs(2)))
        .map_err(io)?;
    stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(io)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(io)?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or("");
    if body.replace(' ', "").contains("\"health\":\"true\"") {
        Ok(())
    } else {
        Err(format!(
            "unhealthy: {}",
            response.lines().last().unwrap_or("(empty)")
        ))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn missing_etcd_names_the_fix() {
        let err = super::locate("etcd-that-does-not-exist").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apt-get install -y etcd-server"), "{msg}");
        assert!(msg.contains("scripts/install-deps"), "{msg}");
    }
}
