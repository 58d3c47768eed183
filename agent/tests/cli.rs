//! The `autocore-agent` binary as an operator meets it: what a bad configuration prints, what
//! `check-config` says about one that runs but should not, and what `run` logs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const EXAMPLE: &str = include_str!("../agent.example.toml");

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_autocore-agent"))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .env_remove("RUST_LOG")
        .output()
        .expect("the binary runs")
}

/// The example configuration with `edit` applied, written to a 0600 file in `dir`.
fn config(dir: &Path, edit: impl Fn(&str) -> String) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("agent.toml");
    let text = edit(EXAMPLE).replace(
        "/var/lib/autocore/agent.db",
        &dir.join("agent.db").display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn a_config_error_is_one_clean_line_with_exit_code_2_even_with_rust_backtrace_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), |t| {
        t.replace("mqtt://127.0.0.1:1883", "mqtt://:1883")
    });
    for subcommand in ["check-config", "run"] {
        let out = agent(&[subcommand, "-c", path.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{subcommand}: {stderr}");
        assert!(!stderr.contains("Stack backtrace"), "{stderr}");
        assert!(!stderr.contains("\x1b["), "{stderr:?}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains("mqtt.url"),
            "{stderr}"
        );
    }
}

#[test]
fn a_toml_syntax_error_names_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), |t| t.replace("[mqtt]", "[mqtt"));
    let out = agent(&["check-config", "-c", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let line = EXAMPLE.lines().position(|l| l == "[mqtt]").unwrap() + 1;
    assert!(stderr.contains(&format!("line {line}, column")), "{stderr}");
}

#[test]
fn check_config_prints_warnings_naming_the_key_and_still_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let path = config(dir.path(), |t| t.replace("127.0.0.1:8787", "0.0.0.0:8787"));
    let out = agent(&["check-config", "-c", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("warning: api.listen"), "{stderr}");
    assert!(stderr.contains("warning: cloud.jwt_file"), "{stderr}");
    assert!(text(&out.stdout).contains("valid"));
}

#[test]
fn run_logs_the_configuration_warnings_at_warn_as_json_lines_without_colours() {
    let dir = tempfile::tempdir().unwrap();
    // A port taken on loopback: `run` logs its warnings, then cannot bind 0.0.0.0 and stops.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = config(dir.path(), |t| {
        t.replace("127.0.0.1:8787", &format!("0.0.0.0:{port}"))
            .replace("format = \"plain\"", "format = \"json\"")
    });
    let out = agent(&["run", "-c", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(!stdout.contains("\x1b["), "{stdout:?}");
    let warned = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .any(|v| v["level"] == "WARN" && v["fields"]["key"] == "api.listen");
    assert!(warned, "{stdout}");
}

#[test]
fn a_database_from_a_newer_agent_is_refused_in_one_line_with_exit_code_2_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listen.local_addr().unwrap().port();
    drop(listen);
    let path = config(dir.path(), |t| {
        t.replace("127.0.0.1:8787", &format!("127.0.0.1:{port}"))
    });
    let db = dir.path().join("agent.db");
    drop(autocore_agent::store::Store::open(&db).unwrap());
    let newer = autocore_agent::store::Store::schema_version() + 1;
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", newer)
        .unwrap();

    // Exit code 2, like a configuration error: the unit's RestartPreventExitStatus=2 keeps
    // systemd from restarting the agent into the same refusal every 2 s.
    let out = agent(&["run", "-c", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let expected = format!(
        "error: the agent stopped with an error: database {}: the database has schema version \
         {newer}, newer than this agent's ({}): a newer autocore-agent wrote it; install that \
         version or a later one again (an agent never downgrades its database)",
        db.display(),
        newer - 1
    );
    assert_eq!(stderr.trim_end(), expected);

    let out = agent(&["status", "-c", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("schema version {newer}, newer than this agent's")),
        "{stdout}"
    );
    let kept: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("pragma user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(kept, newer, "the database is left for the newer agent");
}
