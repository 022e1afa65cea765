//! Helpers of the tests that run the `planner-svc` binary: the command, clean of the caller's
//! environment, and a spawned process that is killed when dropped (a failed test leaves no
//! daemon behind) whose output is read as it comes (it never blocks on a full pipe).

use std::io::{BufRead as _, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The binary, with nothing of the caller's environment but `PATH`: tests must not pick up the
/// repository's config or the caller's overrides.
pub fn planner_svc() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_planner-svc"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default());
    command
}

/// A running `planner-svc`, stdout and stderr gathered into one text as they are written.
pub struct Spawned {
    child: Child,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Spawned {
    /// Spawns `command` with its stdout and stderr piped to this process.
    pub fn start(command: &mut Command) -> Spawned {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let readers = pipes
            .into_iter()
            .map(|pipe| {
                let output = Arc::clone(&output);
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines() {
                        let Ok(line) = line else { return };
                        let mut output = output.lock().unwrap();
                        output.push_str(&line);
                        output.push('\n');
                    }
                })
            })
            .collect();
        Spawned {
            child,
            output,
            readers,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything written so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Sends `signal` (`-TERM`, `-INT`) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal} failed");
    }

    /// Its exit status if it exits within `within`; it is killed otherwise (and `None`).
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < within {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.join_readers();
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
        None
    }

    /// Whether it has not exited yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Kills it, and returns all it wrote.
    pub fn kill(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
        self.output()
    }

    /// Once the process ended, what it wrote is all read.
    fn join_readers(&mut self) {
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `url` as `user`, and the events it receives (the server's permission
/// violations among them), as text.
pub async fn connect_watching(
    url: &str,
    user: &str,
    password: &str,
) -> (
    async_nats::Client,
    tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event.to_string());
            }
        })
        .connect(url)
        .await
        .unwrap();
    (client, rx)
}

/// Waits (5 s at most) for the server's permissions violation naming `subject`.
pub async fn refused(events: &mut tokio::sync::mpsc::UnboundedReceiver<String>, subject: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut seen = Vec::new();
    while let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if event.to_lowercase().contains("permission") && event.contains(subject) {
            return;
        }
        seen.push(event);
    }
    panic!("no permissions violation for {subject}; events: {seen:?}");
}

/// Whether a daemon answers the micro-service ping on `client` within about ten seconds.
pub async fn answers_ping(client: &async_nats::Client) -> bool {
    for _ in 0..200 {
        let ping = client.request("$SRV.PING.planner", "".into());
        if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), ping).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// `planner-svc serve` on `url`, one of several instances: warnings only, no metrics listener
/// (instances would share its port), lease TTL `lease_ttl_ms`, and the short timers the
/// failover tests wait on (reports redelivered after 2 s, recovery every second, retries after
/// 50 ms); `extra` settings as `PLANNER_…` variables. Killed when dropped.
pub fn serve_instance(url: &str, lease_ttl_ms: u64, extra: &[(&str, &str)]) -> Spawned {
    let mut command = planner_svc();
    command
        .arg("serve")
        .env("PLANNER_NATS__URL", url)
        .env("PLANNER_LOG__LEVEL", "warn")
        .env("PLANNER_METRICS__LISTEN", "")
        .env("PLANNER_OWNERSHIP__LEASE_TTL_MS", lease_ttl_ms.to_string())
        .env("PLANNER_REPORTS__ACK_WAIT_S", "2")
        .env("PLANNER_SESSIONS__RECOVERY_INTERVAL_S", "1")
        .env("PLANNER_PLANNER__RETRY__INITIAL_BACKOFF_MS", "50");
    for (key, value) in extra {
        command.env(key, value);
    }
    Spawned::start(&mut command)
}
