//! `bench-console`: issue 14's operator console benchmark. Starts the local stack (backend and
//! Mosquitto), the agent as its own process (`autocore-agent-under-test`, built beside this
//! binary) and `esp32-sim` (one master, one slave of 4 relays, a pH reading a second), and
//! measures:
//!
//! 1. the agent's time to render the Overview (`GET /console`, signed in, gzip), median and
//!    p95 of `AUTOCORE_BENCH_RENDERS` (default 200) sequential requests;
//! 2. the page weight: the Overview's HTML, script and stylesheet, gzipped and plain;
//! 3. time to first render (first contentful paint) of the Overview in headless Chromium,
//!    cold, at full speed and with Chrome's 4x CPU slowdown (`tests/console/bench.mjs`);
//! 4. the agent's resident memory with no console open and with 3 consoles open (each with its
//!    live view connected), averaged over 10 s each.
//!
//! It prints the figures for `BENCHMARKS.md`; it checks nothing but that the pages answer.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use autocore_stack::bench::{load_average, machine_lines, percentile, wait_for_health};
use autocore_stack::postgres::DATABASE;
use autocore_stack::process::{ManagedProcess, ProcessSpec};
use autocore_stack::{Claims, Role, Stack, StackOptions, repo_root};
use firmware_protocol::message::RelayLimits;
use firmware_protocol::sim::{
    self, MasterSpec, MasterTiming, RadioSpec, SensorSource, SensorSpec, SimConfig, SlaveSpec,
};
use firmware_protocol::{DeviceId, MasterKey};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use uuid::Uuid;

/// The world fixture's owner alice and her agent pi-alice (sql/tests/fixtures/world.sql).
const ALICE: Uuid = Uuid::from_u128(0xa0000000_0000_0000_0000_000000000001);
const MASTER: &str = "ESP32_ALICE_1";
const SLAVE: &str = "14:33:5C:38:BF:60";
const KEY_HEX: &str = "7e1e9c2a7b3d4e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
const OPERATOR: &str = "operator-token-of-the-console-bench";
const CHROMIUM: &str = "/usr/bin/chromium";

fn main() -> anyhow::Result<()> {
    let renders: usize = std::env::var("AUTOCORE_BENCH_RENDERS")
        .ok()
        .map(|v| v.parse().context("AUTOCORE_BENCH_RENDERS must be a number"))
        .transpose()?
        .unwrap_or(200);
    let agent_exe = autocore_stack::bench::binary_beside_this_one(
        "autocore-agent-under-test",
        "run `cargo run --release -p autocore-stack --bin bench-console`",
    )?;
    let driver = repo_root().join("tools/node_modules/playwright-core/index.mjs");
    ensure!(
        driver.exists(),
        "{} is missing: run scripts/install-deps",
        driver.display()
    );

    let stack = Stack::start(StackOptions::default()).context("starting the stack")?;
    stack
        .postgres()?
        .psql(
            DATABASE,
            &[
                "-f",
                &repo_root()
                    .join("sql/tests/fixtures/world.sql")
                    .display()
                    .to_string(),
            ],
        )
        .context("loading the world fixture")?;
    let sim_config = SimConfig {
        mqtt_url: Some(stack.mqtt_url()?),
        masters: vec![MasterSpec {
            id: DeviceId::new(MASTER)?,
            key: MasterKey::from_hex(KEY_HEX)?,
            slaves: vec![SlaveSpec {
                mac: SLAVE.parse()?,
                relays: vec![
                    RelayLimits {
                        max_on_s: 3600,
                        boot_on: false
                    };
                    4
                ],
            }],
            sensors: vec![SensorSpec {
                name: "ph".into(),
                unit: Some("pH".into()),
                source: SensorSource::Fixed(6.8),
            }],
        }],
        timing: MasterTiming {
            telemetry_interval_ms: 1_000,
            ..MasterTiming::default()
        },
        radio: RadioSpec {
            loss_percent: 0,
            delay_ms: 1,
        },
        state_dir: None,
        actuation_log_dir: None,
        radio_control: None,
        poll: None,
    };
    stack.admit_sim(&sim_config)?;
    let login = stack.broker_login(Role::Agent, "pi-alice")?;
    let dir = tempfile::tempdir()?;
    let listen = {
        let l = std::net::TcpListener::bind("127.0.0.1:0")?;
        l.local_addr()?.to_string()
    };
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
id = "pi-alice"
[store]
path = "{db}"
[cloud]
rest_url = "{rest}"
jwt = "{jwt}"
[mqtt]
url = "{mqtt}"
username = "{user}"
password = "{password}"
[api]
listen = "{listen}"
[safety]
operator_token = "{OPERATOR}"
[[masters]]
device_id = "{MASTER}"
key = "{KEY_HEX}"
"#,
            db = dir.path().join("agent.db").display(),
            rest = stack.rest_url()?,
            jwt = stack.token(&Claims::agent(ALICE, "pi-alice")),
            mqtt = stack.mqtt_url()?,
            user = login.username,
            password = login.password,
        ),
    )?;
    let mut agent = ManagedProcess::spawn(ProcessSpec {
        name: "autocore-agent-under-test",
        program: agent_exe,
        args: vec!["run".into(), "-c".into(), config.display().to_string()],
        env: vec![("RUST_LOG".into(), "warn".into())],
        run_as: None,
        log_path: dir.path().join("agent.log"),
        stop_signal: nix::sys::signal::Signal::SIGTERM,
    })?;
    let pid = agent.pid().context("the agent has no pid")?;
    let api = format!("http://{listen}");
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(async {
        let (sim_stop, sim_stopped) = tokio::sync::oneshot::channel::<()>();
        let sim_task = tokio::spawn(sim::run(sim_config, async move {
            let _ = sim_stopped.await;
        }));
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        wait_for_health(&http, &api).await?;
        // The slave's relays reach the agent, and the Pi's history has a few readings.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let cookie = sign_in(&http, &api).await?;

        let rss_none = rss_average_kb(pid, Duration::from_secs(10)).await?;
        let (render, html_gzip, html_plain) = render_times(&http, &api, &cookie, renders).await?;
        let mut assets = Vec::new();
        for name in ["console.js", "console.css"] {
            let url = format!("{api}/console/assets/{name}");
            let gz = get_len(&http, &url, &cookie, true).await?;
            let plain = get_len(&http, &url, &cookie, false).await?;
            assets.push((name, gz, plain));
        }
        let (browser, rss_three) = browser_half(&driver, &api, pid).await?;
        let _ = sim_stop.send(());
        let _ = sim_task.await;
        anyhow::Ok((
            rss_none, render, html_gzip, html_plain, assets, browser, rss_three,
        ))
    });
    agent.ensure_running().ok();
    let (rss_none, render, html_gzip, html_plain, assets, browser, rss_three) = result?;

    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "bench-console ({renders} renders)\n{}\n- load average: {}",
        machine_lines(),
        load_average()
    );
    println!(
        "overview render by the agent (GET /console, gzip): median {:.2} ms, p95 {:.2} ms",
        ms(percentile(&render, 0.5).unwrap_or(0)),
        ms(percentile(&render, 0.95).unwrap_or(0))
    );
    let total_gz = html_gzip + assets.iter().map(|a| a.1).sum::<usize>();
    let total_plain = html_plain + assets.iter().map(|a| a.2).sum::<usize>();
    println!("page weight: overview HTML {html_gzip} B gzipped ({html_plain} B plain)");
    for (name, gz, plain) in &assets {
        println!("             {name} {gz} B gzipped ({plain} B plain)");
    }
    println!("             total {total_gz} B gzipped ({total_plain} B plain)");
    for (label, key) in [("full speed", "plain"), ("4x CPU slowdown", "slow")] {
        let runs = browser[key].as_array().context("browser results")?;
        let fcp: Vec<u64> = runs
            .iter()
            .filter_map(|r| r["fcp"].as_f64().map(|v| (v * 1000.0) as u64))
            .collect();
        let bytes = runs.first().and_then(|r| r["bytes"].as_u64()).unwrap_or(0);
        println!(
            "first contentful paint, cold, {label}: median {:.0} ms, p95 {:.0} ms over {} loads ({bytes} B transferred)",
            ms(percentile(&fcp, 0.5).unwrap_or(0)),
            ms(percentile(&fcp, 0.95).unwrap_or(0)),
            fcp.len()
        );
    }
    println!(
        "agent VmRSS: {:.1} MB with no console, {:.1} MB with 3 consoles live ({:+.2} MB)",
        rss_none as f64 / 1024.0,
        rss_three as f64 / 1024.0,
        (rss_three as f64 - rss_none as f64) / 1024.0
    );
    drop(stack);
    Ok(())
}

async fn sign_in(http: &reqwest::Client, api: &str) -> anyhow::Result<String> {
    let response = http
        .post(format!("{api}/console/signin"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={OPERATOR}"))
        .send()
        .await?;
    ensure!(
        response.status() == 303,
        "sign-in answered {}",
        response.status()
    );
    let cookie = response
        .headers()
        .get("set-cookie")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .context("no session cookie")?;
    Ok(cookie.to_string())
}

async fn get_len(
    http: &reqwest::Client,
    url: &str,
    cookie: &str,
    gzip: bool,
) -> anyhow::Result<usize> {
    let mut request = http.get(url).header("cookie", cookie);
    if gzip {
        request = request.header("accept-encoding", "gzip");
    }
    let response = request.send().await?;
    ensure!(
        response.status() == 200,
        "{url} answered {}",
        response.status()
    );
    ensure!(
        gzip == (response
            .headers()
            .get("content-encoding")
            .map(|v| v.as_bytes())
            == Some(b"gzip")),
        "{url}: gzip {gzip} not honoured"
    );
    Ok(response.bytes().await?.len())
}

/// Microseconds per Overview render, and its size gzipped and plain.
async fn render_times(
    http: &reqwest::Client,
    api: &str,
    cookie: &str,
    n: usize,
) -> anyhow::Result<(Vec<u64>, usize, usize)> {
    let url = format!("{api}/console");
    let mut times = Vec::with_capacity(n);
    let mut size = 0;
    for _ in 0..n {
        let started = Instant::now();
        size = get_len(http, &url, cookie, true).await?;
        times.push(started.elapsed().as_micros() as u64);
    }
    let plain = get_len(http, &url, cookie, false).await?;
    Ok((times, size, plain))
}

async fn rss_average_kb(pid: u32, over: Duration) -> anyhow::Result<u64> {
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < over {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .context("no VmRSS")?;
        samples.push(kb);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(samples.iter().sum::<u64>() / samples.len().max(1) as u64)
}

/// Runs tests/console/bench.mjs: its first-render figures, and the agent's RSS while it holds
/// 3 consoles open.
async fn browser_half(driver: &PathBuf, api: &str, pid: u32) -> anyhow::Result<(Value, u64)> {
    let mut node = tokio::process::Command::new("node")
        .arg(repo_root().join("tests/console/bench.mjs"))
        .env("CONSOLE_URL", api)
        .env("OPERATOR_TOKEN", OPERATOR)
        .env("PLAYWRIGHT_CORE", driver)
        .env("CHROMIUM", CHROMIUM)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("running node")?;
    let mut stdin = node.stdin.take().context("node's stdin")?;
    let mut lines = BufReader::new(node.stdout.take().context("node's stdout")?).lines();
    let mut result = Value::Null;
    let mut rss = None;
    while let Some(line) = lines.next_line().await? {
        if let Some(json) = line.strip_prefix("RESULT ") {
            result = serde_json::from_str(json)?;
        } else if line == "OPEN 3" {
            // Settled: the pages loaded, their live views connected.
            tokio::time::sleep(Duration::from_secs(3)).await;
            rss = Some(rss_average_kb(pid, Duration::from_secs(10)).await?);
            stdin.write_all(b"done\n").await?;
        }
    }
    let status = node.wait().await?;
    if !status.success() {
        bail!("the browser half failed: {status}");
    }
    Ok((result, rss.context("the consoles never opened")?))
}
