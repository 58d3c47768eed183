//! The agent under a service manager's protocol: the real binary, a `NOTIFY_SOCKET` this test
//! binds, a watchdog interval, SIGTERM, and a broker and backend that are not there.

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const EXAMPLE: &str = include_str!("../agent.example.toml");

/// The unit's `TimeoutStopSec` (packaging/autocore-agent.service): systemd SIGKILLs after it.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Waits for a datagram on `socket` whose lines include `line`, collecting every line seen.
fn wait_for(socket: &UnixDatagram, line: &str, seen: &mut Vec<String>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        socket
            .set_read_timeout(Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        let Ok(n) = socket.recv(&mut buf) else {
            continue;
        };
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        let found = text.lines().any(|l| l == line);
        seen.extend(text.lines().map(str::to_string));
        if found {
            return true;
        }
    }
    false
}

#[test]
fn the_agent_says_ready_feeds_the_watchdog_and_stops_cleanly_on_sigterm_without_broker_or_backend()
{
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    // Port 9 (discard) on loopback: nothing listens, so the broker and backend refuse at once.
    let text = EXAMPLE
        .replace(
            "/var/lib/autocore/agent.db",
            &dir.path().join("agent.db").display().to_string(),
        )
        .replace("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:9")
        .replace("http://127.0.0.1:3000", "http://127.0.0.1:9")
        .replace("127.0.0.1:8787", "127.0.0.1:0");
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, text).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let notify_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&notify_path).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_autocore-agent"))
        .args(["run", "-c", config.to_str().unwrap()])
        .env("NOTIFY_SOCKET", &notify_path)
        // One second: the agent pings every half second, so the test waits little.
        .env("WATCHDOG_USEC", "1000000")
        .env_remove("WATCHDOG_PID")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary runs");

    let mut seen = Vec::new();
    let ready = wait_for(&socket, "READY=1", &mut seen, Duration::from_secs(20));
    let fed = ready && wait_for(&socket, "WATCHDOG=1", &mut seen, Duration::from_secs(5));
    let fed_again = fed && wait_for(&socket, "WATCHDOG=1", &mut seen, Duration::from_secs(5));
    if !fed_again {
        let _ = child.kill();
        let _ = child.wait();
        panic!("READY=1 then WATCHDOG=1 twice expected; seen {seen:?}");
    }

    // The start timeout is extended while the database is opened and migrated.
    let extended = seen
        .iter()
        .position(|l| l == "EXTEND_TIMEOUT_USEC=60000000");
    let ready_at = seen.iter().position(|l| l == "READY=1");
    assert!(
        extended.is_some() && extended < ready_at,
        "EXTEND_TIMEOUT_USEC before READY=1 expected; seen {seen:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if sent.elapsed() > STOP_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running {STOP_TIMEOUT:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        wait_for(&socket, "STOPPING=1", &mut seen, Duration::from_secs(1)),
        "STOPPING=1 expected; seen {seen:?}"
    );
    eprintln!("stopped {:?} after SIGTERM", sent.elapsed());
}
