//! The edge functions (`edge-functions/`, Deno) served at `/functions/v1/NAME` on a free
//! loopback port, as the Supabase gateway serves them, by the dev-only router
//! `edge-functions/_dev/serve.ts`, talking to the local PostgREST. Deno is the npm package's
//! binary in `tools/`; the functions' npm imports come from `tools/deno` (filled by
//! scripts/install-deps) with `--cached-only`, so nothing is fetched at test time.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::process::{ManagedProcess, ProcessSpec};
use crate::{StackError, free_port, repo_root};

#[derive(Debug)]
pub struct EdgeFunctions {
    process: ManagedProcess,
    port: u16,
    _dir: tempfile::TempDir,
}

impl EdgeFunctions {
    /// Starts the functions against PostgREST at `rest_url` and waits until they listen.
    pub fn start(rest_url: &str) -> Result<EdgeFunctions, StackError> {
        let deno = deno_binary()?;
        let root = repo_root();
        let deno_dir = root.join("tools/deno");
        if !deno_dir.join("npm").exists() {
            return Err(StackError::Missing {
                what: "the edge functions' npm imports (tools/deno)",
                hint: "run scripts/install-deps",
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("autocore-edge-")
            .tempdir()
            .map_err(|e| StackError::io("create the edge functions' folder", e))?;
        let port = free_port()?;
        let spec = ProcessSpec {
            name: "edge-functions",
            program: deno,
            args: vec![
                "run".into(),
                // Only what the dev router and the functions need: listen and call PostgREST on
                // loopback, read their environment.
                "--allow-net=127.0.0.1".into(),
                "--allow-env=PORT,AUTOCORE_REST_URL,SUPABASE_URL,SUPABASE_ANON_KEY".into(),
                "--cached-only".into(),
                "--frozen".into(),
                format!("--lock={}", root.join("edge-functions/deno.lock").display()),
                "--no-prompt".into(),
                root.join("edge-functions/_dev/serve.ts")
                    .display()
                    .to_string(),
            ],
            env: vec![
                ("PORT".into(), port.to_string()),
                ("AUTOCORE_REST_URL".into(), rest_url.to_string()),
                ("DENO_DIR".into(), deno_dir.display().to_string()),
                ("DENO_NO_UPDATE_CHECK".into(), "1".into()),
                ("NO_COLOR".into(), "1".into()),
            ],
            run_as: None,
            log_path: dir.path().join("edge-functions.log"),
            stop_signal: Signal::SIGTERM,
        };
        let process = ManagedProcess::spawn(spec)?;
        let mut functions = EdgeFunctions {
            process,
            port,
            _dir: dir,
        };
        functions.wait_ready(Duration::from_secs(30))?;
        Ok(functions)
    }

    /// The base URL clients use, as `https://<project>.supabase.co/functions/v1` would be.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/functions/v1", self.port)
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        // The router listens only once every function's module graph has loaded.
        self.process
            .wait_for_port(self.port, timeout, Duration::from_millis(50))
    }

    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

fn deno_binary() -> Result<PathBuf, StackError> {
    if let Ok(path) = std::env::var("AUTOCORE_DENO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = repo_root().join("tools/node_modules/deno/deno");
    if path.exists() {
        Ok(path)
    } else {
        Err(StackError::Missing {
            what: "Deno (tools/node_modules/deno/deno)",
            hint: "run scripts/install-deps, or set AUTOCORE_DENO_BIN",
        })
    }
}
