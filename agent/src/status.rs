//! `autocore-agent status`: the agent's state as a person reads it, from the running agent's
//! `/health`, or straight from its database when the agent is not running.

use std::time::Duration;

use crate::config::AgentConfig;
use crate::shared::now_ms;
use crate::store::Store;

pub async fn report(config: &AgentConfig) -> String {
    let url = format!("http://{}/health", config.api.listen);
    let client = reqwest011::Client::builder()
        .timeout(Duration::from_secs(2))
        .build();
    if let Ok(client) = client
        && let Ok(resp) = client.get(&url).send().await
        && let Ok(body) = resp.json::<serde_json::Value>().await
    {
        let reasons = body["degraded_reasons"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        return format!(
            "agent {} (running, {url})\n  status: {}{}\n  mqtt: {}\n  backend: {}\n  backend reachable: {}\n  sync stalled: {}\n  outbox: {} rows, oldest {} ms, {} rejected\n  masters: {}",
            body["agent_id"].as_str().unwrap_or("?"),
            body["status"].as_str().unwrap_or("?"),
            if reasons.is_empty() {
                String::new()
            } else {
                format!(" ({reasons})")
            },
            body["mqtt"]["state"].as_str().unwrap_or("?"),
            body["backend"]["state"].as_str().unwrap_or("?"),
            body["backend_reachable"],
            body["sync_stalled"],
            body["outbox"]["depth"],
            body["outbox"]["oldest_age_ms"],
            body["outbox"]["rejected"],
            body["masters"]
                .as_array()
                .map(|m| m
                    .iter()
                    .map(|d| format!(
                        "{} {}",
                        d["device_id"].as_str().unwrap_or("?"),
                        if d["online"].as_bool() == Some(true) {
                            "online"
                        } else {
                            "offline"
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
        );
    }
    match Store::open_existing(&config.store.path) {
        Ok(store) => {
            let now = now_ms();
            let stats = store.outbox_stats(now).unwrap_or_default();
            let devices = store.devices().unwrap_or_default();
            format!(
                "agent {} (not running; read from {})\n  backend reachable: unknown\n  outbox: {} rows, oldest {:?} ms, {} rejected\n  masters: {}",
                config.agent.id,
                config.store.path.display(),
                stats.depth,
                stats.oldest_age_ms,
                stats.rejected,
                devices
                    .iter()
                    .map(|(id, online, _)| format!(
                        "{id} {}",
                        if *online {
                            "online (last known)"
                        } else {
                            "offline"
                        }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        }
        Err(e @ crate::store::StoreError::Missing(_)) => {
            format!("agent {}: not running, and {e}", config.agent.id)
        }
        Err(e) => format!(
            "agent {}: not running, and its database {} is unreadable: {e}",
            config.agent.id,
            config.store.path.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent configured with `db` whose broker, backend and API are port 9 (discard) on
    /// loopback: nothing of ours listens there, so it reads as not running.
    fn unreachable_agent(db: &std::path::Path) -> AgentConfig {
        let text = format!(
            "[agent]\nid = \"pi-x\"\n[store]\npath = \"{}\"\n[cloud]\nrest_url = \"http://127.0.0.1:9\"\njwt = \"t\"\n[mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n[api]\nlisten = \"127.0.0.1:9\"\n",
            db.display()
        );
        AgentConfig::from_toml(&text, std::path::Path::new("t.toml"), std::iter::empty()).unwrap()
    }

    #[tokio::test]
    async fn without_a_running_agent_status_reads_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("agent.db");
        {
            let mut store = Store::open(&db).unwrap();
            store
                .enqueue(
                    crate::store::OutboxClass::Event,
                    "e1",
                    &serde_json::json!({}),
                    now_ms(),
                )
                .unwrap();
        }
        let config = unreachable_agent(&db);
        let report = report(&config).await;
        assert!(report.contains("not running"), "{report}");
        assert!(report.contains("outbox: 1 rows"), "{report}");
    }

    #[tokio::test]
    async fn status_without_a_database_names_the_path_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("data").join("agent.db");
        let config = unreachable_agent(&db);
        let report = report(&config).await;
        assert!(report.contains(&db.display().to_string()), "{report}");
        assert!(report.contains("no database"), "{report}");
        assert!(!db.exists() && !db.parent().unwrap().exists(), "{report}");
    }
}
