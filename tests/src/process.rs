//! One child process of the stack: spawned as a service user when we are root, logged to a
//! file, stopped with a signal and a grace period, and never outliving its owner.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::{Pid, Uid, User};

use crate::StackError;

/// The uid and gid a service runs as: a named system user when we are root (Postgres refuses
/// to run as root), otherwise whoever we are.
#[derive(Debug, Clone, Copy)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// The first of `names` that exists, if we are root; `None` means "as ourselves".
    pub fn system_user(names: &[&str]) -> Option<RunAs> {
        if !Uid::effective().is_root() {
            return None;
        }
        names.iter().find_map(|name| {
            User::from_name(name).ok().flatten().map(|u| RunAs {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            })
        })
    }
}

/// What to start, kept so that the same process can be started again after a stop.
#[derive(Debug, Clone)]
pub struct ProcessSpec {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub run_as: Option<RunAs>,
    pub log_path: PathBuf,
    /// The signal that asks the process to shut down cleanly.
    pub stop_signal: Signal,
}

#[derive(Debug)]
pub struct ManagedProcess {
    spec: ProcessSpec,
    child: Option<Child>,
}

impl ManagedProcess {
    pub fn spawn(spec: ProcessSpec) -> Result<Self, StackError> {
        let mut process = ManagedProcess { spec, child: None };
        process.start()?;
        Ok(process)
    }

    /// Starts the process if it is not running.
    pub fn start(&mut self) -> Result<(), StackError> {
        if self.is_running() {
            return Ok(());
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.spec.log_path)
            .map_err(|e| StackError::io(format!("open log {}", self.spec.log_path.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| StackError::io("clone log handle", e))?;
        let mut command = Command::new(&self.spec.program);
        command
            .args(&self.spec.args)
            .envs(self.spec.env.iter().cloned())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        if let Some(run_as) = self.spec.run_as {
            command.uid(run_as.uid).gid(run_as.gid);
        }
        die_with_parent(&mut command);
        let child = command.spawn().map_err(|e| {
            StackError::io(
                format!("spawn {} ({})", self.spec.name, self.spec.program.display()),
                e,
            )
        })?;
        self.child = Some(child);
        Ok(())
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Fails with the tail of the log if the process has exited.
    pub fn ensure_running(&mut self) -> Result<(), StackError> {
        if self.is_running() {
            Ok(())
        } else {
            Err(StackError::Exited {
                service: self.spec.name,
                log_tail: self.log_tail(),
            })
        }
    }

    /// Waits until something accepts TCP connections on loopback `port`, checking every `poll`
    /// that the process still runs; fails with the log's tail after `timeout`.
    pub fn wait_for_port(
        &mut self,
        port: u16,
        timeout: Duration,
        poll: Duration,
    ) -> Result<(), StackError> {
        let deadline = Instant::now() + timeout;
        loop {
            self.ensure_running()?;
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(StackError::NotReady {
                    service: self.spec.name,
                    log_tail: self.log_tail(),
                });
            }
            std::thread::sleep(poll);
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Asks the process to stop, waits up to `grace`, then kills it.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = Pid::from_raw(child.id() as i32);
        let _ = signal::kill(pid, self.spec.stop_signal);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Kills the process at once, as a crash or power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.spec.log_path
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.spec.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// Makes the child receive SIGKILL when the thread that spawned it dies, so a test process that
/// is itself killed (a CI timeout, Ctrl-C) leaves no Postgres or Mosquitto behind. Drop covers
/// every orderly exit, panics included; this covers the rest. The stack must therefore be
/// started on the thread that owns it, not on a short-lived helper thread.
#[allow(
    unsafe_code,
    reason = "pre_exec is the only way to set PR_SET_PDEATHSIG in the child"
)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure only calls prctl(2), which is async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}
