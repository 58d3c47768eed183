//! Mosquitto (Debian's package) with its own config on a free loopback port; the system service
//! the package may have started on 1883 is ignored. Secured as in production: no anonymous
//! clients, and the password file and ACL that `autocore_agent::broker` generates, with logins
//! added while it runs (files rewritten, SIGHUP: clients stay connected).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use autocore_agent::broker::{self, BrokerUser};
use autocore_agent::config::Secret;
use nix::sys::signal::Signal;

use crate::process::{ManagedProcess, ProcessSpec, RunAs};
use crate::{StackError, free_port, random_secret};

pub use autocore_agent::broker::Role;

/// How long a new login may take to be accepted after the reload.
const LOGIN_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A username and password for the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub username: String,
    pub password: String,
}

/// Whether the broker checks who connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `allow_anonymous false`, the password file and the ACL: the default.
    Secured,
    /// Anyone may do anything, as before the broker was secured. Only for proving that the broker
    /// tests fail without the lock: `AUTOCORE_OPEN_BROKER=1`.
    Open,
}

impl Security {
    /// [`Security::Open`] if `AUTOCORE_OPEN_BROKER=1`, else [`Security::Secured`].
    pub fn from_env() -> Security {
        if std::env::var("AUTOCORE_OPEN_BROKER").is_ok_and(|v| v == "1") {
            Security::Open
        } else {
            Security::Secured
        }
    }
}

#[derive(Debug)]
struct Registered {
    user: BrokerUser,
    /// Its password file line, kept so a rewrite does not re-salt the users already there.
    line: String,
}

#[derive(Debug)]
pub struct Mosquitto {
    process: ManagedProcess,
    port: u16,
    security: Security,
    run_as: Option<RunAs>,
    passwd: PathBuf,
    acl: PathBuf,
    users: Mutex<Vec<Registered>>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Secured, unless `AUTOCORE_OPEN_BROKER=1`; no logins yet (see [`Mosquitto::login`]).
    pub fn start() -> Result<Mosquitto, StackError> {
        Mosquitto::start_with(Security::from_env())
    }

    pub fn start_with(security: Security) -> Result<Mosquitto, StackError> {
        let binary = mosquitto_binary()?;
        let run_as = RunAs::system_user(&["mosquitto", "nobody"]);
        let dir = tempfile::Builder::new()
            .prefix("autocore-mqtt-")
            .tempdir()
            .map_err(|e| StackError::io("create Mosquitto folder", e))?;
        let port = free_port()?;
        let passwd = dir.path().join("passwd");
        let acl = dir.path().join("acl");
        write_owned(&passwd, &broker_files(&[], |_| String::new()).0, run_as)?;
        write_owned(&acl, &broker_files(&[], |_| String::new()).1, run_as)?;
        let security_lines = match security {
            Security::Secured => broker::mosquitto_conf(&passwd, &acl, None),
            Security::Open => "allow_anonymous true\nset_tcp_nodelay true\n".to_string(),
        };
        // Persistence on, so that a restart keeps queued QoS 1 messages of persistent sessions,
        // as a production broker would. The listener first: the username-as-client-id setting
        // belongs to the listener above it.
        let config = format!(
            "listener {port} 127.0.0.1\n\
             persistence true\n\
             persistence_location {dir}/\n\
             autosave_interval 1\n\
             max_queued_messages 100000\n\
             log_dest stderr\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             {security_lines}",
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
            security,
            run_as,
            passwd,
            acl,
            users: Mutex::new(Vec::new()),
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

    pub fn security(&self) -> Security {
        self.security
    }

    /// A new login with `role`'s rights and a random password. With [`Role::Master`] and a
    /// username other than the device id, a second login with that master's rights (a real
    /// master logs in with [`Mosquitto::add_master`]).
    pub fn login(&self, role: Role, username: &str) -> Result<Login, StackError> {
        let login = Login {
            username: username.to_string(),
            password: random_secret(16),
        };
        self.add_users(&[BrokerUser {
            username: login.username.clone(),
            password: Secret::new(login.password.clone()),
            role,
        }])?;
        Ok(login)
    }

    /// A master's own login, as in production: its device id and the password derived from its
    /// key, which is what `esp32-sim` logs in with.
    pub fn add_master(
        &self,
        device_id: &firmware_protocol::DeviceId,
        key: &firmware_protocol::MasterKey,
    ) -> Result<Login, StackError> {
        let user = BrokerUser::master(device_id, key);
        let login = Login {
            username: user.username.clone(),
            password: user.password.expose().to_string(),
        };
        self.add_users(&[user])?;
        Ok(login)
    }

    /// The logins of every master a simulator plays, so that it can connect.
    pub fn add_sim_masters(
        &self,
        config: &firmware_protocol::sim::SimConfig,
    ) -> Result<(), StackError> {
        let users: Vec<BrokerUser> = config
            .masters
            .iter()
            .map(|m| BrokerUser::master(&m.id, &m.key))
            .collect();
        self.add_users(&users)
    }

    /// Adds `users` (replacing any of the same name), rewrites the password file and the ACL,
    /// makes Mosquitto reload them (SIGHUP) and waits until each new login is accepted.
    pub fn add_users(&self, users: &[BrokerUser]) -> Result<(), StackError> {
        let mut registered = self.users.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = Vec::new();
        for user in users {
            if registered.iter().any(|r| &r.user == user) {
                continue;
            }
            registered.retain(|r| r.user.username != user.username);
            let line = broker::password_line(user).map_err(|e| bad_user(e.to_string()))?;
            registered.push(Registered {
                user: user.clone(),
                line,
            });
            changed.push(Login {
                username: user.username.clone(),
                password: user.password.expose().to_string(),
            });
        }
        if changed.is_empty() {
            return Ok(());
        }
        let all: Vec<BrokerUser> = registered.iter().map(|r| r.user.clone()).collect();
        let (passwd, acl) = broker_files(&all, |user| {
            registered
                .iter()
                .find(|r| r.user.username == user.username)
                .map(|r| r.line.clone())
                .unwrap_or_default()
        });
        broker::check_users(&all).map_err(|e| bad_user(e.to_string()))?;
        write_owned(&self.passwd, &passwd, self.run_as)?;
        write_owned(&self.acl, &acl, self.run_as)?;
        drop(registered);
        // A stopped broker reads the files when it starts again.
        let Some(pid) = self.process.pid() else {
            return Ok(());
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGHUP)
            .map_err(|e| StackError::io("SIGHUP to mosquitto", e.into()))?;
        let deadline = Instant::now() + LOGIN_READY_TIMEOUT;
        for login in &changed {
            while self.connack(Some(login))? != Some(0) {
                if Instant::now() > deadline {
                    return Err(StackError::NotReady {
                        service: "mosquitto (a new login)",
                        log_tail: self.log_tail(),
                    });
                }
                // The reload has no event to wait on; a refused CONNECT costs well under 1 ms.
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }

    /// One MQTT 3.1.1 CONNECT (clean session) with `login`, or none: the CONNACK's return code
    /// (0 accepted, 4 bad username or password, 5 not authorised), or `None` if the broker
    /// closed the connection without one.
    pub fn connack(&self, login: Option<&Login>) -> Result<Option<u8>, StackError> {
        connack(self.port, login).map_err(|e| StackError::io("CONNECT to mosquitto", e))
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), StackError> {
        self.process
            .wait_for_port(self.port, timeout, Duration::from_millis(20))
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

fn bad_user(reason: String) -> StackError {
    StackError::Io {
        what: "a broker login".into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason),
    }
}

/// The password file (from each user's kept line) and the ACL.
fn broker_files(users: &[BrokerUser], line: impl Fn(&BrokerUser) -> String) -> (String, String) {
    let passwd = users.iter().map(line).collect();
    let acl = broker::acl_file(users).unwrap_or_default();
    (passwd, acl)
}

/// Writes a file Mosquitto reads as its own user.
fn write_owned(path: &Path, text: &str, run_as: Option<RunAs>) -> Result<(), StackError> {
    broker::write_atomically(path, text, 0o600).map_err(|e| {
        StackError::io(
            format!("write {}", path.display()),
            std::io::Error::other(e.to_string()),
        )
    })?;
    if let Some(r) = run_as {
        std::os::unix::fs::chown(path, Some(r.uid), Some(r.gid))
            .map_err(|e| StackError::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

fn connack(port: u16, login: Option<&Login>) -> std::io::Result<Option<u8>> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(4);
    let mut flags = 0x02; // clean session
    if login.is_some() {
        flags |= 0x80 | 0x40;
    }
    body.push(flags);
    body.extend_from_slice(&5u16.to_be_bytes());
    string(&mut body, &format!("autocore-probe-{}", random_secret(4)));
    if let Some(login) = login {
        string(&mut body, &login.username);
        string(&mut body, &login.password);
    }
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&packet)?;
    let mut reply = [0u8; 4];
    match stream.read_exact(&mut reply) {
        Ok(()) if reply[0] == 0x20 => {
            if reply[3] == 0 {
                let _ = stream.write_all(&[0xe0, 0x00]);
            }
            Ok(Some(reply[3]))
        }
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
        Err(e) => Err(e),
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
