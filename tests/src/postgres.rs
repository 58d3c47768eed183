//! An ephemeral Postgres 15 cluster: `initdb` in a temporary folder, one server on a free
//! loopback port, the backend applied (sql/bootstrap, then supabase/migrations).

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::process::{ManagedProcess, ProcessSpec, RunAs};
use crate::{StackError, free_port, random_secret, repo_root};

/// The database the backend lives in.
pub const DATABASE: &str = "autocore";

#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// fsync and full-page writes on, as in production. Off makes tests faster; a crash of the
    /// machine (not of Postgres) could then lose data, which no test here simulates.
    pub durable: bool,
    pub max_connections: u32,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            durable: false,
            max_connections: 100,
        }
    }
}

#[derive(Debug)]
pub struct Postgres {
    process: ManagedProcess,
    port: u16,
    superuser_password: String,
    authenticator_password: String,
    bindir: PathBuf,
    // Dropped last: the process must stop before its folder goes.
    _root: tempfile::TempDir,
}

impl Postgres {
    /// The process id of the server (for benchmarks that read its CPU time in /proc).
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// initdb, start, wait until it answers, create the database and apply the backend.
    pub fn start(options: &PostgresOptions) -> Result<Postgres, StackError> {
        let bindir = postgres_bindir()?;
        let run_as = RunAs::system_user(&["postgres"]);
        let root = tempfile::Builder::new()
            .prefix("autocore-pg-")
            .tempdir()
            .map_err(|e| StackError::io("create Postgres folder", e))?;
        let root_path = root.path().to_path_buf();
        std::fs::set_permissions(&root_path, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| StackError::io("chmod Postgres folder", e))?;

        let superuser_password = random_secret(16);
        let pwfile = root_path.join("pwfile");
        std::fs::write(&pwfile, &superuser_password)
            .map_err(|e| StackError::io("write pwfile", e))?;
        if let Some(r) = run_as {
            for p in [&root_path, &pwfile] {
                std::os::unix::fs::chown(p, Some(r.uid), Some(r.gid))
                    .map_err(|e| StackError::io(format!("chown {}", p.display()), e))?;
            }
        }

        let data = root_path.join("data");
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-E", "UTF8", "--no-locale"])
            .args(["--auth-local=trust", "--auth-host=scram-sha-256"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--no-sync");
        if let Some(r) = run_as {
            std::os::unix::process::CommandExt::uid(&mut initdb, r.uid);
            std::os::unix::process::CommandExt::gid(&mut initdb, r.gid);
        }
        let out = initdb
            .output()
            .map_err(|e| StackError::io("run initdb", e))?;
        check_output("initdb", &out)?;
        let _ = std::fs::remove_file(&pwfile);

        let port = free_port()?;
        let mut args = vec![
            "-D".to_string(),
            data.display().to_string(),
            "-p".to_string(),
            port.to_string(),
            "-c".to_string(),
            "listen_addresses=127.0.0.1".to_string(),
            "-c".to_string(),
            format!("unix_socket_directories={}", root_path.display()),
            "-c".to_string(),
            format!("max_connections={}", options.max_connections),
            "-c".to_string(),
            "shared_buffers=128MB".to_string(),
            // Logical decoding, so tests can read the supabase_realtime publication as Realtime
            // does (pgoutput); costs a little WAL, and no slot exists unless a test makes one.
            "-c".to_string(),
            "wal_level=logical".to_string(),
            // pg_cron, as hosted Supabase has it: the migrations schedule the telemetry rollups
            // and retention with it. Jobs run in background workers, so the scheduler needs no
            // password to connect back; it serves the backend's database only.
            "-c".to_string(),
            "shared_preload_libraries=pg_cron".to_string(),
            "-c".to_string(),
            format!("cron.database_name={DATABASE}"),
            "-c".to_string(),
            "cron.use_background_workers=on".to_string(),
        ];
        if !options.durable {
            for setting in [
                "fsync=off",
                "full_page_writes=off",
                "synchronous_commit=off",
            ] {
                args.push("-c".to_string());
                args.push(setting.to_string());
            }
        }
        let spec = ProcessSpec {
            name: "postgres",
            program: bindir.join("postgres"),
            args,
            env: vec![],
            run_as,
            log_path: root_path.join("postgres.log"),
            // SIGINT is Postgres's "fast shutdown": abort open transactions, exit cleanly.
            stop_signal: Signal::SIGINT,
        };
        let process = ManagedProcess::spawn(spec)?;
        let mut pg = Postgres {
            process,
            port,
            superuser_password,
            authenticator_password: random_secret(16),
            bindir,
            _root: root,
        };
        pg.wait_ready(Duration::from_secs(30))?;
        pg.psql("postgres", &["-c", &format!("create database {DATABASE}")])?;
        pg.apply_backend()?;
        Ok(pg)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The superuser's URL (what `AUTOCORE_PG_URL` prints): for fixtures, tests and pgbench.
    pub fn url(&self) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{DATABASE}",
            self.superuser_password, self.port
        )
    }

    /// The URL PostgREST connects with: the `authenticator` role, which can only switch to
    /// anon, authenticated and service_role.
    pub fn authenticator_url(&self) -> String {
        format!(
            "postgres://authenticator:{}@127.0.0.1:{}/{DATABASE}",
            self.authenticator_password, self.port
        )
    }

    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Environment for Postgres client programs (psql, pgbench) to reach this cluster.
    pub fn client_env(&self) -> Vec<(String, String)> {
        vec![
            ("PGHOST".into(), "127.0.0.1".into()),
            ("PGPORT".into(), self.port.to_string()),
            ("PGUSER".into(), "postgres".into()),
            ("PGPASSWORD".into(), self.superuser_password.clone()),
            ("PGDATABASE".into(), DATABASE.into()),
        ]
    }

    /// Runs psql against `database` with ON_ERROR_STOP; returns stdout, fails with stderr.
    pub fn psql(&self, database: &str, args: &[&str]) -> Result<String, StackError> {
        let out = Command::new(self.bindir.join("psql"))
            .envs(self.client_env())
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", database])
            .args(args)
            .output()
            .map_err(|e| StackError::io("run psql", e))?;
        check_output("psql", &out)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs one SQL file and returns its stdout (pgTAP output, say) even when psql fails, with
    /// whether it succeeded.
    pub fn psql_file_output(&self, file: &Path) -> Result<(bool, String, String), StackError> {
        let out = Command::new(self.bindir.join("psql"))
            .envs(self.client_env())
            .args([
                "-X",
                "-q",
                "-t",
                "-A",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                DATABASE,
                "-f",
            ])
            .arg(file)
            .output()
            .map_err(|e| StackError::io("run psql", e))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn apply_backend(&self) -> Result<(), StackError> {
        let root = repo_root();
        for folder in ["sql/bootstrap", "supabase/migrations"] {
            for file in sql_files(&root.join(folder))? {
                self.psql(DATABASE, &["-f", &file.display().to_string()])
                    .map_err(|e| StackError::Migration {
                        file: file.clone(),
                        message: e.to_string(),
                    })?;
            }
        }
        self.psql(
            DATABASE,
            &[
                "-c",
                &format!(
                    "alter role authenticator password '{}'",
                    self.authenticator_password
                ),
            ],
        )?;
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.process.ensure_running()?;
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.psql("postgres", &["-c", "select 1"]).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    service: "postgres",
                    log_tail: self.process.log_tail(),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown); data and port are kept for [`Postgres::restart`].
    pub fn stop(&mut self) {
        self.process.stop(Duration::from_secs(10));
    }

    /// Starts the server again after [`Postgres::stop`] and waits until it answers.
    pub fn restart(&mut self) -> Result<(), StackError> {
        self.process.start()?;
        self.wait_ready(Duration::from_secs(30))
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// The `.sql` files of a folder in name order.
pub fn sql_files(folder: &Path) -> Result<Vec<PathBuf>, StackError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(folder)
        .map_err(|e| StackError::io(format!("read {}", folder.display()), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    Ok(files)
}

fn postgres_bindir() -> Result<PathBuf, StackError> {
    if let Ok(dir) = std::env::var("AUTOCORE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let default = PathBuf::from("/usr/lib/postgresql/15/bin");
    if default.join("postgres").exists() {
        Ok(default)
    } else {
        Err(StackError::Missing {
            what: "Postgres 15 server (/usr/lib/postgresql/15/bin/postgres)",
            hint: "run scripts/install-deps, or set AUTOCORE_PG_BINDIR",
        })
    }
}

fn check_output(what: &'static str, out: &Output) -> Result<(), StackError> {
    if out.status.success() {
        Ok(())
    } else {
        Err(StackError::Command {
            what,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}
