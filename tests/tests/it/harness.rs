//! The harness itself: services on loopback, restartable, and gone after a panic.

use std::net::TcpStream;

use autocore_stack::{Stack, StackOptions};

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

fn answers(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn a_panicking_test_leaves_no_service_running() {
    let mut ports = Vec::new();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let stack = Stack::start(StackOptions::default()).expect("stack starts");
        ports.push(port_of(&stack.pg_url().unwrap()));
        ports.push(port_of(&stack.rest_url().unwrap()));
        ports.push(port_of(&stack.mqtt_url().unwrap()));
        for port in &ports {
            assert!(answers(*port), "port {port} answers while the stack runs");
        }
        panic!("a test fails with the stack up");
    }));
    assert!(outcome.is_err());
    assert_eq!(ports.len(), 3);
    for port in ports {
        assert!(!answers(port), "port {port} is closed after the panic");
    }
}

#[test]
fn the_stack_prints_its_urls_on_loopback_and_the_backend_comes_back_after_a_restart() {
    let mut stack = Stack::start(StackOptions::default()).expect("stack starts");
    let lines = stack.env_lines();
    for key in [
        "AUTOCORE_PG_URL=postgres://",
        "AUTOCORE_REST_URL=http://127.0.0.1:",
        "AUTOCORE_MQTT_URL=mqtt://127.0.0.1:",
        "AUTOCORE_JWT_SECRET=",
    ] {
        assert!(
            lines.iter().any(|l| l.starts_with(key)),
            "{key} missing from {lines:?}"
        );
    }
    assert!(stack.pg_url().unwrap().contains("@127.0.0.1:"));

    let pg = stack.postgres().unwrap();
    pg.psql(
        "autocore",
        &[
            "-c",
            "insert into auth.users (id) values (gen_random_uuid())",
        ],
    )
    .unwrap();
    let rest_port = port_of(&stack.rest_url().unwrap());
    stack.stop_backend();
    assert!(!answers(rest_port), "PostgREST is down during the outage");
    stack.restart_backend().expect("backend restarts");
    assert!(answers(rest_port), "PostgREST is back on the same port");
    let count = stack
        .postgres()
        .unwrap()
        .psql(
            "autocore",
            &["-t", "-A", "-c", "select count(*) from auth.users"],
        )
        .unwrap();
    assert_eq!(count.trim(), "1", "data survives the restart");
}
