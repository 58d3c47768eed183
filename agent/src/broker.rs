//! Mosquitto's side of the trust boundary, generated from the agent's configuration: the password
//! file (Mosquitto 2's `$7$` PBKDF2-HMAC-SHA512 hashes), the ACL file (who may publish and read
//! which topic) and a `mosquitto.conf` snippet that turns anonymous access off
//! (docs/decisions/0008-broker-trust-boundary.md).

use std::fmt::Write as _;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use firmware_protocol::{DeviceId, MasterKey};
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{AgentConfig, Secret};

/// `mosquitto_passwd`'s default. Master passwords are 256-bit HMAC outputs, where iterations add
/// nothing; Mosquitto runs the hash on every CONNECT, and a Pi pays for each iteration.
pub const HASH_ITERATIONS: u32 = 101;
/// Salt length of `mosquitto_passwd` (`SALT_LEN` in Mosquitto's source).
pub const SALT_BYTES: usize = 12;
const HASH_BYTES: usize = 64;
static PBKDF2_ALG: pbkdf2::Algorithm = pbkdf2::PBKDF2_HMAC_SHA512;

/// What a broker user may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Reads and writes everything under `autocore/`: the edge agent.
    Agent,
    /// Publishes the reports of one master and reads what is sent to it. In production the
    /// username is the device id; the test harness also gives other usernames a master's rights.
    Master { device_id: String },
    /// Reads everything under `autocore/`, publishes nothing: dashboards, tools, tests.
    Monitor,
}

/// One login on the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUser {
    pub username: String,
    pub password: Secret,
    pub role: Role,
}

impl BrokerUser {
    /// A master's own login: its device id, and the password derived from its key
    /// (`firmware_protocol::sign::broker_password`), so nothing more has to be flashed.
    pub fn master(device_id: &DeviceId, key: &MasterKey) -> BrokerUser {
        BrokerUser {
            username: device_id.as_str().to_string(),
            password: Secret::new(firmware_protocol::sign::broker_password(key, device_id)),
            role: Role::Master {
                device_id: device_id.as_str().to_string(),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{key}: required for the broker configuration")]
    Missing { key: String },
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
    #[error("no random salt from the system")]
    Random,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> BrokerError {
    BrokerError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// The agent (`[mqtt] username` and `password`, both required) and one login per `[[masters]]`.
pub fn users_from_config(config: &AgentConfig) -> Result<Vec<BrokerUser>, BrokerError> {
    let username = config
        .mqtt
        .username
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| BrokerError::Missing {
            key: "mqtt.username".into(),
        })?;
    let password = config
        .mqtt
        .password
        .clone()
        .filter(|p| !p.expose().is_empty())
        .ok_or_else(|| BrokerError::Missing {
            key: "mqtt.password".into(),
        })?;
    check_username("mqtt.username", &username)?;
    let mut users = vec![BrokerUser {
        username,
        password,
        role: Role::Agent,
    }];
    for (i, master) in config.masters.iter().enumerate() {
        let key_name = format!("masters[{i}].device_id");
        let id = DeviceId::new(master.device_id.as_str())
            .map_err(|e| invalid(&key_name, e.to_string()))?;
        let key = MasterKey::from_hex(master.key.expose())
            .map_err(|e| invalid(format!("masters[{i}].key"), e.to_string()))?;
        check_username(&key_name, id.as_str())?;
        if users.iter().any(|u| u.username == id.as_str()) {
            return Err(invalid(
                key_name,
                format!(
                    "{} is already a broker login (mqtt.username or another master); a master's login is its device id",
                    id.as_str()
                ),
            ));
        }
        users.push(BrokerUser::master(&id, &key));
    }
    Ok(users)
}

/// Read-only logins for tools: each password is kept in `dir/monitor-{name}.secret` (0600),
/// made the first time, so a rerun of `broker-config` keeps it.
pub fn monitor_users(dir: &Path, names: &[String]) -> Result<Vec<BrokerUser>, BrokerError> {
    let mut users = Vec::new();
    for name in names {
        check_username("--monitor", name)?;
        let path = dir.join(format!("monitor-{name}.secret"));
        let password = match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => text.trim().to_string(),
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BrokerError::Io { path, source: e });
            }
            _ => {
                let mut bytes = [0u8; 24];
                SystemRandom::new()
                    .fill(&mut bytes)
                    .map_err(|_| BrokerError::Random)?;
                let password = hex::encode(bytes);
                std::fs::create_dir_all(dir).map_err(|source| BrokerError::Io {
                    path: dir.to_path_buf(),
                    source,
                })?;
                write_atomically(&path, &format!("{password}\n"), 0o600)?;
                password
            }
        };
        users.push(BrokerUser {
            username: name.clone(),
            password: Secret::new(password),
            role: Role::Monitor,
        });
    }
    Ok(users)
}

/// A username Mosquitto's files can hold and that no topic pattern can misread: a device id
/// (`A-Z a-z 0-9 _ . -`) without `:`, which separates name and hash in the password file.
pub fn check_username(key: &str, username: &str) -> Result<(), BrokerError> {
    let ok = !username.is_empty()
        && username.len() <= 64
        && username
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            key,
            format!("{username:?} cannot be a broker login: 1-64 characters of A-Z a-z 0-9 _ . -"),
        ))
    }
}

/// Checks names and uniqueness of a list of users built by hand (the harness, tools).
pub fn check_users(users: &[BrokerUser]) -> Result<(), BrokerError> {
    for (i, user) in users.iter().enumerate() {
        check_username(&format!("users[{i}].username"), &user.username)?;
        if let Role::Master { device_id } = &user.role {
            check_username(&format!("users[{i}].role"), device_id)?;
        }
        if users[..i].iter().any(|u| u.username == user.username) {
            return Err(invalid(
                format!("users[{i}].username"),
                format!("{} is listed twice", user.username),
            ));
        }
    }
    Ok(())
}

/// `$7${iterations}${base64 salt}${base64 PBKDF2-HMAC-SHA512}`, as `mosquitto_passwd` writes it,
/// with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, BrokerError> {
    let mut salt = [0u8; SALT_BYTES];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| BrokerError::Random)?;
    Ok(hash_with_salt(password, &salt, HASH_ITERATIONS))
}

fn hash_with_salt(password: &str, salt: &[u8], iterations: u32) -> String {
    let mut hash = [0u8; HASH_BYTES];
    let rounds = NonZeroU32::new(iterations).unwrap_or(NonZeroU32::MIN);
    pbkdf2::derive(PBKDF2_ALG, rounds, salt, password.as_bytes(), &mut hash);
    format!(
        "$7${iterations}${}${}",
        BASE64.encode(salt),
        BASE64.encode(hash)
    )
}

/// Whether `hash` (one `$7$` field of a password file) is `password`'s.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let mut parts = hash.split('$');
    let (Some(""), Some("7"), Some(iterations), Some(salt), Some(expected), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return false;
    };
    let (Ok(iterations), Ok(salt), Ok(expected)) = (
        iterations.parse::<u32>(),
        BASE64.decode(salt),
        BASE64.decode(expected),
    ) else {
        return false;
    };
    let Some(rounds) = NonZeroU32::new(iterations) else {
        return false;
    };
    pbkdf2::verify(PBKDF2_ALG, rounds, &salt, password.as_bytes(), &expected).is_ok()
}

/// One line of the password file, `username:$7$...` with its newline.
pub fn password_line(user: &BrokerUser) -> Result<String, BrokerError> {
    Ok(format!(
        "{}:{}\n",
        user.username,
        hash_password(user.password.expose())?
    ))
}

/// The password file: every user, each hash with its own salt.
pub fn password_file(users: &[BrokerUser]) -> Result<String, BrokerError> {
    check_users(users)?;
    users.iter().map(password_line).collect()
}

/// The topics a role may publish (`write`), read, or both, as ACL `topic` lines.
pub fn acl_topics(role: &Role) -> Vec<String> {
    match role {
        Role::Agent => vec!["topic readwrite autocore/#".into()],
        Role::Monitor => vec!["topic read autocore/#".into()],
        Role::Master { device_id } => {
            let mut lines: Vec<String> = ["announce", "status", "telemetry", "ack", "relays/state"]
                .iter()
                .map(|t| format!("topic write autocore/devices/{device_id}/{t}"))
                .collect();
            lines.extend([
                format!("topic read autocore/devices/{device_id}/command"),
                format!("topic read autocore/config/devices/{device_id}"),
                "topic read autocore/emergency/stop".into(),
                "topic read autocore/emergency/reset".into(),
            ]);
            lines
        }
    }
}

/// The ACL file: one `user` block per login and nothing for anyone else. Blocks rather than
/// `pattern … %u` lines, because Mosquitto applies patterns to every user: a monitor or the
/// agent would also get the rights of a master named like itself.
pub fn acl_file(users: &[BrokerUser]) -> Result<String, BrokerError> {
    check_users(users)?;
    let mut out = String::from(
        "# AutoCore broker ACL, generated by `autocore-agent broker-config`: regenerate, do not edit.\n\
         # Only the users below may do anything, and only what their block says.\n",
    );
    for user in users {
        let what = match &user.role {
            Role::Agent => "the edge agent".to_string(),
            Role::Monitor => "a monitor (read only)".to_string(),
            Role::Master { device_id } => format!("master {device_id}"),
        };
        let _ = write!(out, "\n# {what}\nuser {}\n", user.username);
        for line in acl_topics(&user.role) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Where Mosquitto listens: `listener PORT [ADDRESS]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub port: u16,
    /// The address to bind; every interface when `None`.
    pub address: Option<String>,
}

impl std::str::FromStr for Listener {
    type Err = BrokerError;

    /// `PORT` or `ADDRESS:PORT`.
    fn from_str(text: &str) -> Result<Listener, BrokerError> {
        let (address, port) = match text.rsplit_once(':') {
            Some((address, port)) => (Some(address.to_string()), port),
            None => (None, text),
        };
        let port = port.parse::<u16>().map_err(|_| {
            invalid(
                "--listener",
                format!("{text:?} is not PORT or ADDRESS:PORT"),
            )
        })?;
        Ok(Listener { port, address })
    }
}

/// The security settings of `mosquitto.conf`, pointing at the two files, after the `listener`
/// line when `listener` is given. `use_username_as_clientid` is a setting of the listener
/// above it in Mosquitto 2.0 (before any, of a default listener on 1883, which a file read
/// through `include_dir` also starts from), so the snippet names its listener.
pub fn mosquitto_conf(passwd: &Path, acl: &Path, listener: Option<&Listener>) -> String {
    let mut out =
        String::from("# AutoCore broker security, generated by `autocore-agent broker-config`.\n");
    if let Some(listener) = listener {
        let _ = writeln!(
            out,
            "listener {}{}",
            listener.port,
            listener
                .address
                .as_ref()
                .map(|a| format!(" {a}"))
                .unwrap_or_default()
        );
    }
    let _ = write!(
        out,
        "# Every client logs in; the ACL says what each may publish and read.\n\
         allow_anonymous false\n\
         password_file {passwd}\n\
         acl_file {acl}\n\
         # The client id is the username: nobody can take over another's session or kick it off.\n\
         use_username_as_clientid true\n\
         # The protocol's payload limit (PAYLOAD_BYTES_MAX); the broker drops larger messages.\n\
         message_size_limit {limit}\n\
         # Without it a QoS 1 round trip waits ~40 ms on Nagle's algorithm.\n\
         set_tcp_nodelay true\n",
        passwd = passwd.display(),
        acl = acl.display(),
        limit = firmware_protocol::message::PAYLOAD_BYTES_MAX,
    );
    out
}

/// The paths [`write_files`] wrote.
#[derive(Debug, Clone)]
pub struct WrittenFiles {
    pub passwd: PathBuf,
    pub acl: PathBuf,
    pub conf: PathBuf,
}

/// Writes `passwd` (0600), `acl` and `autocore.conf` (0640) into `dir`, each replaced atomically
/// so that a broker reloading meanwhile reads the old file or the new one, never half of one.
pub fn write_files(
    dir: &Path,
    users: &[BrokerUser],
    listener: &Listener,
) -> Result<WrittenFiles, BrokerError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BrokerError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let dir = std::fs::canonicalize(dir).map_err(io(dir))?;
    let files = WrittenFiles {
        passwd: dir.join("passwd"),
        acl: dir.join("acl"),
        conf: dir.join("autocore.conf"),
    };
    write_atomically(&files.passwd, &password_file(users)?, 0o600)?;
    write_atomically(&files.acl, &acl_file(users)?, 0o640)?;
    write_atomically(
        &files.conf,
        &mosquitto_conf(&files.passwd, &files.acl, Some(listener)),
        0o640,
    )?;
    Ok(files)
}

/// What to do with the files once written, for a person.
pub fn install_hint(files: &WrittenFiles, users: usize) -> String {
    let dir = files
        .passwd
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    format!(
        "wrote {passwd} ({users} logins), {acl} and {conf}\n\
         next:\n  \
         chown mosquitto:mosquitto {passwd} {acl}   # Mosquitto reads them as its own user\n  \
         include {conf} in mosquitto.conf (Debian reads /etc/mosquitto/conf.d/*.conf; --out there does it)\n  \
         systemctl restart mosquitto   # the first time: a listener's settings are read only at start\n  \
         systemctl reload mosquitto    # afterwards (SIGHUP): the files are re-read, clients stay connected\n\
         after adding a [[masters]] entry, run this again and reload (files in {dir})",
        passwd = files.passwd.display(),
        acl = files.acl.display(),
        conf = files.conf.display(),
    )
}

/// Writes `text` beside `path` with `mode` and renames it over `path` (see `durable_file`).
pub fn write_atomically(path: &Path, text: &str, mode: u32) -> Result<(), BrokerError> {
    crate::durable_file::replace(path, text.as_bytes(), mode).map_err(|source| BrokerError::Io {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../agent.example.toml");

    fn config(extra: &str) -> AgentConfig {
        let text = EXAMPLE.replace("[mqtt]\n", &format!("[mqtt]\n{extra}"));
        AgentConfig::from_toml(&text, Path::new("agent.toml"), std::iter::empty()).unwrap()
    }

    fn with_credentials() -> AgentConfig {
        config("username = \"autocore\"\npassword = \"correct horse\"\n")
    }

    #[test]
    fn a_generated_hash_verifies_when_pbkdf2_is_recomputed_with_its_salt() {
        let hash = hash_password("s3cret").unwrap();
        let parts: Vec<&str> = hash.split('$').collect();
        assert_eq!(parts[..3], ["", "7", "101"]);
        let salt = BASE64.decode(parts[3]).unwrap();
        assert_eq!(salt.len(), SALT_BYTES);
        let mut expected = [0u8; HASH_BYTES];
        pbkdf2::derive(
            PBKDF2_ALG,
            NonZeroU32::new(101).unwrap(),
            &salt,
            b"s3cret",
            &mut expected,
        );
        assert_eq!(parts[4], BASE64.encode(expected));
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3creT"));
    }

    #[test]
    fn a_hash_written_by_mosquitto_passwd_verifies() {
        // `mosquitto_passwd -c -b file alice secret` (Mosquitto 2.0.11).
        let line = "$7$101$bSXrg/uvwDWh9YMj$/Nv1XgZ3+yTSR7apJhBo7ZQlq2IgFCyjHg+Dnyx9wXfq4gWS6DeZPQE8g8Y9GNRQc1tCmZ9HQvXuHWuneDtlmA==";
        assert!(verify_password(line, "secret"));
        let salt = BASE64.decode("bSXrg/uvwDWh9YMj").unwrap();
        assert_eq!(hash_with_salt("secret", &salt, 101), line);
    }

    #[test]
    fn two_hashes_of_one_password_have_different_salts() {
        assert_ne!(hash_password("x").unwrap(), hash_password("x").unwrap());
    }

    #[test]
    fn the_password_file_holds_the_agent_and_each_master_with_its_derived_password() {
        let config = with_credentials();
        let users = users_from_config(&config).unwrap();
        let file = password_file(&users).unwrap();
        let lines: Vec<(&str, &str)> = file.lines().map(|l| l.split_once(':').unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].0, "autocore");
        assert!(verify_password(lines[0].1, "correct horse"));
        assert_eq!(lines[1].0, "ESP32_HIDRO_F44738");
        let id = DeviceId::new("ESP32_HIDRO_F44738").unwrap();
        let key = MasterKey::from_hex(config.masters[0].key.expose()).unwrap();
        let derived = firmware_protocol::sign::broker_password(&key, &id);
        assert!(verify_password(lines[1].1, &derived));
    }

    #[test]
    fn the_acl_gives_each_role_exactly_its_topics() {
        let users = vec![
            BrokerUser {
                username: "autocore".into(),
                password: Secret::new("a"),
                role: Role::Agent,
            },
            BrokerUser {
                username: "ESP32_A".into(),
                password: Secret::new("b"),
                role: Role::Master {
                    device_id: "ESP32_A".into(),
                },
            },
            BrokerUser {
                username: "grafana".into(),
                password: Secret::new("c"),
                role: Role::Monitor,
            },
        ];
        let acl = acl_file(&users).unwrap();
        let block = |user: &str| -> Vec<String> {
            let start = acl.find(&format!("user {user}\n")).unwrap();
            acl[start..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with("topic "))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(block("autocore"), ["topic readwrite autocore/#"]);
        assert_eq!(block("grafana"), ["topic read autocore/#"]);
        assert_eq!(
            block("ESP32_A"),
            [
                "topic write autocore/devices/ESP32_A/announce",
                "topic write autocore/devices/ESP32_A/status",
                "topic write autocore/devices/ESP32_A/telemetry",
                "topic write autocore/devices/ESP32_A/ack",
                "topic write autocore/devices/ESP32_A/relays/state",
                "topic read autocore/devices/ESP32_A/command",
                "topic read autocore/config/devices/ESP32_A",
                "topic read autocore/emergency/stop",
                "topic read autocore/emergency/reset",
            ]
        );
        assert!(!acl.contains("pattern"), "no rule applies to every user");
    }

    #[test]
    fn missing_agent_credentials_name_the_key() {
        let err = users_from_config(&config("")).unwrap_err().to_string();
        assert!(err.starts_with("mqtt.username:"), "{err}");
        // A username without a password does not even load (config validation); one set
        // after loading, as a test or a tool might, is still refused here by name.
        let mut half = config("");
        half.mqtt.username = Some("autocore".into());
        let err = users_from_config(&half).unwrap_err().to_string();
        assert!(err.starts_with("mqtt.password:"), "{err}");
    }

    #[test]
    fn a_master_whose_id_is_the_agents_username_is_refused() {
        let config = config("username = \"ESP32_HIDRO_F44738\"\npassword = \"p\"\n");
        let err = users_from_config(&config).unwrap_err().to_string();
        assert!(err.starts_with("masters[0].device_id:"), "{err}");
    }

    #[test]
    fn a_master_id_with_a_colon_cannot_be_a_login() {
        let mut config = with_credentials();
        config.masters[0].device_id = "AA:BB".into();
        let err = users_from_config(&config).unwrap_err().to_string();
        assert!(err.starts_with("masters[0].device_id:"), "{err}");
    }

    #[test]
    fn a_monitors_password_is_made_once_and_kept_across_reruns() {
        let dir = tempfile::tempdir().unwrap();
        let names = vec!["grafana".to_string()];
        let first = monitor_users(dir.path(), &names).unwrap();
        let again = monitor_users(dir.path(), &names).unwrap();
        assert_eq!(first, again);
        assert_eq!(first[0].role, Role::Monitor);
        assert_eq!(first[0].password.expose().len(), 48);
        let mut users = users_from_config(&with_credentials()).unwrap();
        users.extend(first);
        assert!(
            acl_file(&users)
                .unwrap()
                .contains("user grafana\ntopic read autocore/#\n")
        );
        let clash = vec!["autocore".to_string()];
        users.extend(monitor_users(dir.path(), &clash).unwrap());
        assert!(
            password_file(&users).is_err(),
            "a monitor named like the agent"
        );
    }

    #[test]
    fn the_conf_snippet_locks_the_broker_and_limits_payloads() {
        let conf = mosquitto_conf(
            Path::new("/e/passwd"),
            Path::new("/e/acl"),
            Some(&"1883".parse().unwrap()),
        );
        for line in [
            "listener 1883",
            "allow_anonymous false",
            "password_file /e/passwd",
            "acl_file /e/acl",
            "use_username_as_clientid true",
            "message_size_limit 4096",
            "set_tcp_nodelay true",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing:\n{conf}");
        }
    }

    #[test]
    fn the_files_are_written_with_private_modes() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let users = users_from_config(&with_credentials()).unwrap();
        let files = write_files(dir.path(), &users, &"127.0.0.1:1883".parse().unwrap()).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&files.passwd), 0o600);
        assert_eq!(mode(&files.acl), 0o640);
        assert_eq!(mode(&files.conf), 0o640);
        let conf = std::fs::read_to_string(&files.conf).unwrap();
        assert!(conf.contains(&format!("password_file {}", files.passwd.display())));
        assert!(conf.contains("\nlistener 1883 127.0.0.1\n"), "{conf}");
    }
}
