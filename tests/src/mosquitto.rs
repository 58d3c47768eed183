//! Mosquitto (Debian's package) with its own config on a free loopback port; the system service
//! the package may have started on 1883 is ignored.

use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::process::{ManagedProcess, ProcessSpec, RunAs};
use crate::{StackError, free_port};

#[derive(Debug)]
pub struct Mosquitto {
    process: ManagedProcess,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Result<Mosquitto, StackError> {
        let binary = mosquitto_binary()?;
        let run_as = RunAs::system_user(&["mosquitto", "nobody"]);
        let dir = tempfile::Builder::new()
            .prefix("autocore-mqtt-")
            .tempdir()
            .map_err(|e| StackError::io("create Mosquitto folder", e))?;
        let port = free_port()?;
        // Persistence on, so that a restart keeps queued QoS 1 messages of persistent sessions,
        // as a production broker would. TCP_NODELAY: without it a QoS 1 round trip costs ~40 ms.
        let config = format!(
            "listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             set_tcp_nodelay true\n\
             max_queued_messages 100000\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n",
            dir = dir.path().display()
        );
        let config_path = dir.path().join("mosquitto.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| StackError::io("write mosquitto.conf", e))?;
        if let Some(r) = run_as {
            for p in [dir.path(), config_path.as_path()] {
                std::os::unix::fs::chown(p, Some(r.uid), Some(r.gid))
                    .map_err(|e| StackError::io(format!("chown {}", p.display()), e))?;
            }
        }
        let spec = ProcessSpec {
            name: "mosquitto",
            program: binary,
            args: vec!["-c".into(), config_path.display().to_string()],
            env: vec![],
            run_as,
            log_path: dir.path().join("mosquitto.log"),
            stop_signal: Signal::SIGTERM,
        };
        let process = ManagedProcess::spawn(spec)?;
        let mut broker = Mosquitto {
            process,
            port,
            _dir: dir,
        };
        broker.wait_ready(Duration::from_secs(15))?;
        Ok(broker)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process.ensure_running()?;
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    service: "mosquitto",
                    log_tail: self.process.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }

    pub fn restart(&mut self) -> Result<(), StackError> {
        self.process.start()?;
        self.wait_ready(Duration::from_secs(15))
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

fn mosquitto_binary() -> Result<PathBuf, StackError> {
    if let Ok(path) = std::env::var("AUTOCORE_MOSQUITTO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = PathBuf::from("/usr/sbin/mosquitto");
    if path.exists() {
        Ok(path)
    } else {
        Err(StackError::Missing {
            what: "Mosquitto (/usr/sbin/mosquitto)",
            hint: "run scripts/install-deps, or set AUTOCORE_MOSQUITTO_BIN",
        })
    }
}
