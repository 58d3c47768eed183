//! The local stack for the demo and the end-to-end tests: an ephemeral Postgres 15 with the
//! backend applied, real PostgREST 12 and Mosquitto, each on a free loopback port, torn down when
//! the [`Stack`] is dropped (panics included) and killed with their owner otherwise.

pub mod auth;
pub mod bench;
pub mod edge;
pub mod faults;
pub mod jwt;
pub mod mosquitto;
pub mod postgres;
pub mod postgrest;
pub mod process;
pub mod tap;

use std::net::TcpListener;
use std::path::PathBuf;

pub use edge::EdgeFunctions;
pub use jwt::Claims;
pub use mosquitto::{Login, Mosquitto, Role, Security};
pub use postgres::{Postgres, PostgresOptions};
pub use postgrest::Postgrest;

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} is missing: {hint}")]
    Missing {
        what: &'static str,
        hint: &'static str,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: &'static str,
        status: String,
        stderr: String,
    },
    #[error("migration {file} failed: {message}")]
    Migration { file: PathBuf, message: String },
    #[error("{service} exited early; its log ends:\n{log_tail}")]
    Exited {
        service: &'static str,
        log_tail: String,
    },
    #[error("{service} did not become ready in time; its log ends:\n{log_tail}")]
    NotReady {
        service: &'static str,
        log_tail: String,
    },
    #[error("{0} is not part of this stack")]
    NotStarted(&'static str),
}

impl StackError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> StackError {
        StackError::Io {
            what: what.into(),
            source,
        }
    }
}

/// Which services to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Postgres with the backend, and PostgREST in front of it.
    pub backend: bool,
    /// Mosquitto.
    pub mqtt: bool,
    /// Mosquitto secured as the product ships it, unless a test needs a broker without limits
    /// (`AUTOCORE_OPEN_BROKER=1` opens it for every test, to show which tests need the security).
    pub broker: Security,
    pub postgres: PostgresOptions,
}

impl Default for StackOptions {
    fn default() -> Self {
        StackOptions {
            backend: true,
            mqtt: true,
            broker: Security::from_env(),
            postgres: PostgresOptions::default(),
        }
    }
}

impl StackOptions {
    pub fn backend_only() -> StackOptions {
        StackOptions {
            mqtt: false,
            ..StackOptions::default()
        }
    }

    pub fn mqtt_only() -> StackOptions {
        StackOptions {
            backend: false,
            ..StackOptions::default()
        }
    }
}

/// The running stack. Fields drop in order: PostgREST before the Postgres it talks to.
#[derive(Debug)]
pub struct Stack {
    postgrest: Option<Postgrest>,
    postgres: Option<Postgres>,
    mosquitto: Option<Mosquitto>,
    jwt_secret: String,
}

impl Stack {
    /// Starts the chosen services and waits until each answers. Call it on the thread that will
    /// own the stack (see [`process`]): the services die with that thread.
    pub fn start(options: StackOptions) -> Result<Stack, StackError> {
        let jwt_secret = random_secret(32);
        let mut stack = Stack {
            postgrest: None,
            postgres: None,
            mosquitto: None,
            jwt_secret,
        };
        if options.mqtt {
            stack.mosquitto = Some(Mosquitto::start_with(options.broker)?);
        }
        if options.backend {
            let pg = Postgres::start(&options.postgres)?;
            stack.postgrest = Some(Postgrest::start(
                &pg.authenticator_url(),
                &stack.jwt_secret,
            )?);
            stack.postgres = Some(pg);
        }
        Ok(stack)
    }

    pub fn postgres(&self) -> Result<&Postgres, StackError> {
        self.postgres
            .as_ref()
            .ok_or(StackError::NotStarted("postgres"))
    }

    pub fn postgrest(&self) -> Result<&Postgrest, StackError> {
        self.postgrest
            .as_ref()
            .ok_or(StackError::NotStarted("postgrest"))
    }

    pub fn postgres_mut(&mut self) -> Result<&mut Postgres, StackError> {
        self.postgres
            .as_mut()
            .ok_or(StackError::NotStarted("postgres"))
    }

    pub fn postgrest_mut(&mut self) -> Result<&mut Postgrest, StackError> {
        self.postgrest
            .as_mut()
            .ok_or(StackError::NotStarted("postgrest"))
    }

    pub fn mosquitto(&self) -> Result<&Mosquitto, StackError> {
        self.mosquitto
            .as_ref()
            .ok_or(StackError::NotStarted("mosquitto"))
    }

    pub fn mosquitto_mut(&mut self) -> Result<&mut Mosquitto, StackError> {
        self.mosquitto
            .as_mut()
            .ok_or(StackError::NotStarted("mosquitto"))
    }

    /// A new broker login with `role`'s rights and a random password (see [`Mosquitto::login`]).
    pub fn broker_login(&self, role: Role, username: &str) -> Result<Login, StackError> {
        self.mosquitto()?.login(role, username)
    }

    /// A master's own broker login: its id and the password derived from its key.
    pub fn broker_master(
        &self,
        device_id: &firmware_protocol::DeviceId,
        key: &firmware_protocol::MasterKey,
    ) -> Result<Login, StackError> {
        self.mosquitto()?.add_master(device_id, key)
    }

    /// The logins of every master a simulator plays (see [`Mosquitto::add_sim_masters`]).
    pub fn admit_sim(&self, config: &firmware_protocol::sim::SimConfig) -> Result<(), StackError> {
        self.mosquitto()?.add_sim_masters(config)
    }

    pub fn pg_url(&self) -> Result<String, StackError> {
        Ok(self.postgres()?.url())
    }

    pub fn rest_url(&self) -> Result<String, StackError> {
        Ok(self.postgrest()?.url())
    }

    pub fn mqtt_url(&self) -> Result<String, StackError> {
        Ok(self.mosquitto()?.url())
    }

    /// The HS256 secret PostgREST verifies tokens with; tests sign their own tokens with it.
    pub fn jwt_secret(&self) -> &str {
        &self.jwt_secret
    }

    pub fn token(&self, claims: &Claims) -> String {
        claims.sign(&self.jwt_secret)
    }

    /// `KEY=value` lines for the services that run, as `autocore-stack` prints them.
    pub fn env_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some(pg) = &self.postgres {
            lines.push(format!("AUTOCORE_PG_URL={}", pg.url()));
        }
        if let Some(rest) = &self.postgrest {
            lines.push(format!("AUTOCORE_REST_URL={}", rest.url()));
        }
        if let Some(mqtt) = &self.mosquitto {
            lines.push(format!("AUTOCORE_MQTT_URL={}", mqtt.url()));
        }
        lines.push(format!("AUTOCORE_JWT_SECRET={}", self.jwt_secret));
        lines
    }

    /// Takes the backend away (PostgREST, then Postgres), as an outage would.
    pub fn stop_backend(&mut self) {
        if let Some(rest) = self.postgrest.as_mut() {
            rest.stop();
        }
        if let Some(pg) = self.postgres.as_mut() {
            pg.stop();
        }
    }

    /// Brings the backend back on the same ports with the same data.
    pub fn restart_backend(&mut self) -> Result<(), StackError> {
        if let Some(pg) = self.postgres.as_mut() {
            pg.restart()?;
        }
        if let Some(rest) = self.postgrest.as_mut() {
            rest.restart()?;
        }
        Ok(())
    }
}

/// A free TCP port on 127.0.0.1. Another process could take it before we bind it; the window is
/// short and the services fail loudly if it happens.
pub fn free_port() -> Result<u16, StackError> {
    let listener =
        TcpListener::bind(("127.0.0.1", 0)).map_err(|e| StackError::io("bind a free port", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| StackError::io("read the free port", e))
}

/// `bytes` random bytes as lowercase hex.
pub fn random_secret(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the harness crate lives one level below the repository root")
        .to_path_buf()
}
