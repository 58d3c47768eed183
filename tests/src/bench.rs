//! What the benchmark binaries share: the machine they ran on (read from /proc), percentiles,
//! settings from the environment, and an agent running in process.

/// `- CPUs (nproc): …`, `- model name: …`, `- memory: …`, `- kernel: Linux …` lines.
pub fn machine_lines() -> String {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get().to_string())
        .unwrap_or_else(|_| "?".into());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']))
        })
        .unwrap_or("unknown")
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let memory = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!(
        "- CPUs (nproc): {cpus}\n- model name: {model}\n- memory: {memory}\n- kernel: Linux {kernel}"
    )
}

/// The 1, 5 and 15 minute load averages: how busy the shared machine was around a run.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// The temp folder, where the benchmarks keep SQLite and Postgres data, and its filesystem and
/// device (so that fsync costs can be judged).
pub fn data_folder() -> String {
    let tmp = std::env::temp_dir();
    let fs = std::process::Command::new("df")
        .args(["--output=fstype,source"])
        .arg(&tmp)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8(o.stdout)
                .ok()?
                .lines()
                .nth(1)
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" on "))
        })
        .unwrap_or_else(|| "unknown".into());
    format!("{} ({fs})", tmp.display())
}

/// The value at quantile `p` (0..=1) of `values`, nearest rank.
pub fn percentile(values: &[u64], p: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(rank).copied()
}

/// A setting from the environment, at least 1; `what` names it in the error ("a whole number").
pub fn env_number(name: &str, default: u64, what: &str) -> anyhow::Result<u64> {
    use anyhow::Context as _;
    match std::env::var(name) {
        Ok(v) => {
            let n: u64 = v
                .trim()
                .parse()
                .with_context(|| format!("{name} must be {what}, got {v:?}"))?;
            anyhow::ensure!(n >= 1, "{name} must be at least 1");
            Ok(n)
        }
        Err(_) => Ok(default),
    }
}

/// The agent running inside the benchmark's process, stopped with [`InProcessAgent::stop`].
#[derive(Debug)]
pub struct InProcessAgent {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), autocore_agent::runtime::RuntimeError>>,
    /// The local API's base URL.
    pub api: String,
}

impl InProcessAgent {
    /// Starts the agent with `config` (its API on a free loopback port) and waits for /health.
    pub async fn start(
        config: autocore_agent::config::AgentConfig,
        http: &reqwest::Client,
    ) -> anyhow::Result<InProcessAgent> {
        use anyhow::Context as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the agent's API listener")?;
        let api = format!(
            "http://{}",
            listener.local_addr().context("the API's address")?
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(autocore_agent::run(config, listener, async move {
            let _ = stopped.await;
        }));
        let agent = InProcessAgent { stop, task, api };
        wait_for_health(http, &agent.api).await?;
        Ok(agent)
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let _ = self.stop.send(());
        self.task
            .await
            .context("the agent task panicked")?
            .context("the agent stopped with an error")
    }
}

/// Waits up to 30 s for an agent's /health to answer.
pub async fn wait_for_health(
    http: &reqwest::Client,
    api: &str,
) -> anyhow::Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(h) = health(http, api).await {
            return Ok(h);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the agent's /health at {api} did not answer in 30 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// An agent's GET /health.
pub async fn health(http: &reqwest::Client, api: &str) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context as _;
    http.get(format!("{api}/health"))
        .send()
        .await
        .context("GET /health")?
        .json()
        .await
        .context("reading /health")
}

/// The broker logins of a benchmark: its agent's, its masters' and one per tool client. The
/// tools get the agent's rights: each plays many masters at once, or the agent.
#[derive(Debug, Clone)]
pub struct BenchLogins {
    pub agent: crate::Login,
    tools: Vec<crate::Login>,
}

/// Creates the logins on `stack`'s broker in one reload: `agent_username` for the agent, each of
/// `masters` with the password derived from `key_hex`, and `tools` (their client ids).
pub fn bench_logins(
    stack: &crate::Stack,
    agent_username: &str,
    masters: &[String],
    key_hex: &str,
    tools: &[&str],
) -> anyhow::Result<BenchLogins> {
    use anyhow::Context as _;
    use autocore_agent::broker::{BrokerUser, Role};
    use autocore_agent::config::Secret;
    let login = |username: &str| crate::Login {
        username: username.to_string(),
        password: crate::random_secret(16),
    };
    let agent = login(agent_username);
    let tools: Vec<crate::Login> = tools.iter().map(|t| login(t)).collect();
    let key = firmware_protocol::MasterKey::from_hex(key_hex).context("the masters' key")?;
    let mut users = Vec::new();
    for l in std::iter::once(&agent).chain(&tools) {
        users.push(BrokerUser {
            username: l.username.clone(),
            password: Secret::new(l.password.clone()),
            role: Role::Agent,
        });
    }
    for m in masters {
        let id = firmware_protocol::DeviceId::new(m.as_str()).context("a master's id")?;
        users.push(BrokerUser::master(&id, &key));
    }
    stack
        .mosquitto()?
        .add_users(&users)
        .context("adding the benchmark's broker logins")?;
    Ok(BenchLogins { agent, tools })
}

impl BenchLogins {
    /// The simulator's client options for tool `id`, logged in.
    pub fn tool_options(
        &self,
        mqtt_url: &str,
        id: &str,
    ) -> anyhow::Result<firmware_protocol::sim::rumqttc::MqttOptions> {
        use anyhow::Context as _;
        let login = self
            .tools
            .iter()
            .find(|l| l.username == id)
            .with_context(|| format!("no broker login for the tool {id}"))?;
        let mut options =
            firmware_protocol::sim::mqtt_options(mqtt_url, id).context("MQTT options")?;
        options.set_credentials(login.username.as_str(), login.password.as_str());
        Ok(options)
    }

    /// Tool `id`'s broker login, for a client that is not the simulator's (a benchmark peer).
    pub fn tool_login(&self, id: &str) -> Option<&crate::Login> {
        self.tools.iter().find(|l| l.username == id)
    }

    /// The agent's `username` and `password` lines for its `[mqtt]` section.
    pub fn agent_toml(&self) -> String {
        format!(
            "username = \"{}\"\npassword = \"{}\"\n",
            self.agent.username, self.agent.password
        )
    }
}

// ------------------------------------------------------------------ processes seen from /proc

use anyhow::Context as _;

/// VmRSS and VmHWM of `pid`, in kB.
pub fn memory_kb(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// utime + stime of `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc/<pid>/stat")?;
    // Fields after the name start at field 3 (state); utime and stime are fields 14 and 15.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields
        .get(11)
        .context("no utime")?
        .parse()
        .context("utime")?;
    let stime: u64 = fields
        .get(12)
        .context("no stime")?
        .parse()
        .context("stime")?;
    Ok(utime + stime)
}

pub fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr().context("the free port")?.port())
}

/// The binary `name` built by Cargo beside the running one (same profile, same target folder);
/// if it is missing, the error says so and how to build it (`hint`).
pub fn binary_beside_this_one(name: &str, hint: &str) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::current_exe()
        .context("locating this binary")?
        .with_file_name(name);
    anyhow::ensure!(path.exists(), "{} is missing: {hint}", path.display());
    Ok(path)
}
