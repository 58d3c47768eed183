//! What the decision engine, the interlock arbiter and macros keep on disk: rule timers and
//! arming, the arbiter's snapshot (relays on with their off-deadline, the emergency latch), a
//! the macros mirror, and the commands the Pi itself
//! created. A firing's commands, the rule's new state and its reports go in one transaction.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};

use super::{
    CommandRecord, OutboxClass, RULE_SELECT, Result, RuleRecord, Store, insert_command,
    insert_outbox, rule_from_row,
};

/// One outbox row to queue.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxEntry {
    pub class: OutboxClass,
    pub idempotency_key: String,
    pub payload: Value,
}

/// Everything one automation step decided, written atomically before anything is sent.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AutomationWrite {
    /// Commands the Pi created (negative ids), with their cloud `client_id`.
    pub commands: Vec<(CommandRecord, String)>,
    /// Rule states to persist, by `decision_rules.id`.
    pub rule_states: Vec<(String, Value)>,
    /// What changed in the arbiter: its relays that changed, and the latch.
    pub safety: Option<crate::safety::SafetyDelta>,
    pub outbox: Vec<OutboxEntry>,
    /// Ids (of `commands`) sent right after the commit: each gets its master's next signing
    /// counter and its first attempt recorded in the same transaction.
    pub send_now: Vec<i64>,
    /// Cursors to set (name, value), e.g. when the emergency latch last changed.
    pub cursors: Vec<(String, String)>,
}

impl AutomationWrite {
    pub fn is_empty(&self) -> bool {
        self.commands.is_empty()
            && self.rule_states.is_empty()
            && self.safety.is_none()
            && self.outbox.is_empty()
            && self.cursors.is_empty()
    }
}

const EDGE_NUMBER_COUNTER: &str = "edge_command_number";

impl Store {
    /// The last number used for a command the Pi created; numbers never go back, even if the
    /// counter row were lost, because every such command is on disk with id = -number.
    pub fn last_edge_command_number(&self) -> Result<u64> {
        let counted = self.counter(EDGE_NUMBER_COUNTER)?;
        let lowest: Option<i64> =
            self.conn
                .query_row("select min(id) from commands where id < 0", [], |r| {
                    r.get(0)
                })?;
        Ok(counted.max(-lowest.unwrap_or(0)).max(0) as u64)
    }

    /// Writes one automation step in a single transaction; returns the signing counter of each
    /// command in `send_now`.
    pub fn write_automation(
        &mut self,
        w: &AutomationWrite,
        now_ms: i64,
    ) -> Result<HashMap<i64, u64>> {
        let mut counters = HashMap::new();
        if w.is_empty() {
            return Ok(counters);
        }
        let tx = self.conn.savepoint()?;
        let mut highest = 0i64;
        for (cmd, client_id) in &w.commands {
            debug_assert!(cmd.id < 0, "Pi-created commands have negative ids");
            highest = highest.max(-cmd.id);
            insert_command(&tx, cmd, Some(client_id), now_ms)?;
        }
        if highest > 0 {
            tx.prepare_cached(
                "insert into counters (name, value) values (?1, ?2)
                 on conflict (name) do update set value = max(value, excluded.value)",
            )?
            .execute(params![EDGE_NUMBER_COUNTER, highest])?;
        }
        {
            let mut stmt = tx.prepare_cached(
                "insert into rule_states (rule, state, updated_at_ms) values (?1, ?2, ?3)
                 on conflict (rule) do update set state = excluded.state, updated_at_ms = excluded.updated_at_ms",
            )?;
            for (rule, state) in &w.rule_states {
                stmt.execute(params![rule, state.to_string(), now_ms])?;
            }
        }
        if let Some(delta) = &w.safety {
            write_safety(&tx, delta, now_ms)?;
        }
        for e in &w.outbox {
            insert_outbox(&tx, e.class, &e.idempotency_key, &e.payload, now_ms)?;
        }
        for (name, value) in &w.cursors {
            tx.prepare_cached(
                "insert into cursors (name, value) values (?1, ?2)
                 on conflict (name) do update set value = excluded.value",
            )?
            .execute(params![name, value])?;
        }
        for id in &w.send_now {
            let Some((cmd, _)) = w.commands.iter().find(|(c, _)| c.id == *id) else {
                continue;
            };
            let counter: i64 = tx
                .prepare_cached(super::NEXT_SIGNING_COUNTER)?
                .query_row(params![&cmd.master_device_id, now_ms], |r| r.get(0))?;
            tx.prepare_cached(
                "update commands set state = 'sent', attempts = attempts + 1, last_sent_at_ms = ?2,
                    signing_counter = ?3 where id = ?1",
            )?
            .execute(params![id, now_ms, counter])?;
            counters.insert(*id, counter as u64);
        }
        tx.commit()?;
        Ok(counters)
    }

    pub fn rule_states(&self) -> Result<HashMap<String, Value>> {
        let mut stmt = self
            .conn
            .prepare_cached("select rule, state from rule_states")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
        let mut states = HashMap::new();
        for row in rows {
            let (rule, text) = row?;
            // A state this agent cannot read starts afresh rather than stopping the engine.
            if let Ok(value) = serde_json::from_str(&text) {
                states.insert(rule, value);
            }
        }
        Ok(states)
    }

    /// The arbiter's state as a whole (`SafetySnapshot`'s JSON): the latch's row and a row per
    /// relay. `None` when nothing was ever written.
    pub fn safety_snapshot(&self) -> Result<Option<Value>> {
        let latch: Option<String> = self
            .conn
            .query_row("select snapshot from safety_state where id = 1", [], |r| {
                r.get(0)
            })
            .optional()?;
        let relays = self
            .conn
            .prepare_cached("select entry from safety_relays order by relay")?
            .query_map([], |r| r.get::<_, String>(0))?
            .map(|text| Ok(serde_json::from_str::<Value>(&text?)?))
            .collect::<Result<Vec<Value>>>()?;
        if latch.is_none() && relays.is_empty() {
            return Ok(None);
        }
        let mut snapshot = match latch {
            Some(text) => serde_json::from_str::<Value>(&text)?,
            None => Value::Object(Default::default()),
        };
        if let Some(object) = snapshot.as_object_mut() {
            object.insert("relays".into(), Value::Array(relays));
        }
        Ok(Some(snapshot))
    }

    /// Every rule the mirror holds, enabled or not (the engine skips what it must).
    pub fn all_rules(&self) -> Result<Vec<RuleRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RULE_SELECT} where not deleted order by device_id, priority desc, rule_id"
        ))?;
        let rows = stmt.query_map([], rule_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Rules matching `rule_id` (the dashboard's name for it) or the uuid.
    pub fn rules_named(&self, name: &str) -> Result<Vec<RuleRecord>> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RULE_SELECT} where (rule_id = ?1 or id = ?1) and not deleted order by device_id"
        ))?;
        let rows = stmt.query_map([name], rule_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// A master's relay state report: each slave's states kept locally (the engine checks rules'
    /// relay numbers against them) and the report queued for `relay_slaves`, in one transaction.
    pub fn record_relay_report(
        &mut self,
        master: &str,
        slaves: &[(String, Vec<bool>)],
        report: &Value,
        now_ms: i64,
    ) -> Result<()> {
        let tx = self.conn.savepoint()?;
        for (slave, states) in slaves {
            super::upsert_relay_states(&tx, master, slave, states, now_ms)?;
        }
        insert_outbox(
            &tx,
            OutboxClass::RelayState,
            &super::event_key("relays", master, now_ms),
            report,
            now_ms,
        )?;
        tx.commit()?;
        Ok(())
    }

    /// How many relays each slave has, as its last report showed.
    pub fn relay_counts(&self) -> Result<HashMap<(String, String), u8>> {
        let mut stmt = self.conn.prepare_cached(
            "select master_device_id, slave_mac_address, states from relay_states",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut counts = HashMap::new();
        for row in rows {
            let (master, slave, states) = row?;
            let n = serde_json::from_str::<Vec<bool>>(&states)
                .map(|s| s.len())
                .unwrap_or(0);
            if (1..=16).contains(&n) {
                counts.insert((master, slave.to_ascii_uppercase()), n as u8);
            }
        }
        Ok(counts)
    }

    /// Replaces the macros mirror with what the cloud holds now: `(id, revision, definition)`.
    pub fn replace_macros(&mut self, macros: &[(String, i64, Value)]) -> Result<()> {
        let tx = self.conn.savepoint()?;
        tx.prepare_cached("delete from macros")?.execute([])?;
        for (id, revision, def) in macros {
            tx.prepare_cached("insert into macros (id, definition, revision) values (?1, ?2, ?3)")?
                .execute(params![id, def.to_string(), revision])?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn macros(&self) -> Result<Vec<Value>> {
        let mut stmt = self
            .conn
            .prepare_cached("select definition from macros order by id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        let mut out = Vec::new();
        for text in rows {
            out.push(serde_json::from_str(&text?)?);
        }
        Ok(out)
    }

    /// Records what the engine thinks of a rule (`None`: it runs) and queues the report for the
    /// cloud when that changed. Returns true if a report was queued.
    pub fn note_rule_problem(
        &mut self,
        rule: &str,
        revision: i64,
        reason: Option<&str>,
        now_ms: i64,
    ) -> Result<bool> {
        let tx = self.conn.savepoint()?;
        let last: Option<(i64, Option<String>)> = tx
            .query_row(
                "select revision, reason from rule_problems where rule = ?1",
                [rule],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let unchanged = match &last {
            Some((rev, last_reason)) => *rev == revision && last_reason.as_deref() == reason,
            // A rule never reported and running fine needs no report.
            None => reason.is_none(),
        };
        if unchanged {
            return Ok(false);
        }
        tx.prepare_cached("insert into rule_problems (rule, revision, reason) values (?1, ?2, ?3)
             on conflict (rule) do update set revision = excluded.revision, reason = excluded.reason")?.execute(params![rule, revision, reason])?;
        let payload =
            json!({"kind": "rule_error", "id": rule, "revision": revision, "error": reason});
        let key = format!("rule-error:{rule}:{revision}:{now_ms}");
        insert_outbox(&tx, OutboxClass::RuleFeedback, &key, &payload, now_ms)?;
        tx.commit()?;
        Ok(true)
    }
}

/// The `relay_commands_slave` row that tells the cloud what a Pi-created command did, queued
/// when the command ends (so a master polling the cloud never sees it pending and runs it).
pub(super) fn edge_command_report(
    tx: &rusqlite::Connection,
    id: i64,
    status: &str,
    execution_time_ms: Option<u32>,
    error: Option<&str>,
    now_ms: i64,
) -> Result<()> {
    let row: Option<(CommandRecord, Option<String>, i64, Option<i64>)> = tx
        .prepare_cached(concat!(
            super::command_columns!(),
            ", client_id, accepted_at_ms, last_sent_at_ms from commands where id = ?1"
        ))?
        .query_row([id], |r| {
            Ok((
                super::command_from_row(r)?,
                r.get(17)?,
                r.get(18)?,
                r.get(19)?,
            ))
        })
        .optional()?;
    let Some((cmd, Some(client_id), accepted_at_ms, sent_at_ms)) = row else {
        return Ok(());
    };
    let iso = |ms: i64| {
        jiff::Timestamp::from_millisecond(ms)
            .map(|t| t.to_string())
            .unwrap_or_default()
    };
    // The cloud refuses an expiry at or before creation; a command is always created before it
    // expires, but keep the row valid whatever the clocks did.
    let expires_at_ms = cmd.expires_at_ms.max(accepted_at_ms + 1);
    let columns = crate::command::actions_to_columns(&cmd.actions);
    let payload = json!({
        "client_id": client_id,
        "master_device_id": cmd.master_device_id,
        "slave_mac_address": cmd.slave_mac_address,
        "slave_device_id": cmd.slave_device_id,
        "relay_numbers": columns.relay_numbers,
        "actions": columns.actions,
        "duration_seconds": columns.duration_seconds,
        "command_type": cmd.command_type,
        "triggered_by": cmd.triggered_by,
        "priority": cmd.priority,
        "rule_id": cmd.rule_id,
        "rule_name": cmd.rule_name,
        "status": status,
        "created_at": iso(accepted_at_ms),
        "expires_at": iso(expires_at_ms),
        "sent_at": sent_at_ms.map(iso),
        "completed_at": iso(now_ms.max(accepted_at_ms)),
        "execution_time_ms": execution_time_ms,
        "error_message": error,
        "delivery_count": cmd.attempts,
    });
    insert_outbox(
        tx,
        OutboxClass::RuleCommand,
        &format!("edge-command:{client_id}"),
        &payload,
        now_ms,
    )?;
    Ok(())
}

/// The key of a relay's row in `safety_relays` (as schema 8 builds it from older snapshots).
fn relay_key(relay: &crate::safety::RelayRef) -> String {
    format!(
        "{}|{}|{}",
        relay.master,
        relay.slave_mac.to_ascii_uppercase(),
        relay.relay
    )
}

/// Applies the arbiter's change: the relays that changed, the ones it dropped, and the latch.
fn write_safety(tx: &Connection, delta: &crate::safety::SafetyDelta, now_ms: i64) -> Result<()> {
    if delta.replace_all {
        tx.prepare_cached("delete from safety_relays")?
            .execute([])?;
    }
    let mut remove = tx.prepare_cached("delete from safety_relays where relay = ?1")?;
    for relay in &delta.removed {
        remove.execute([relay_key(relay)])?;
    }
    let mut upsert = tx.prepare_cached(
        "insert into safety_relays (relay, entry) values (?1, ?2)
         on conflict (relay) do update set entry = excluded.entry",
    )?;
    for entry in &delta.changed {
        upsert.execute(params![
            relay_key(&entry.relay),
            serde_json::to_string(entry)?
        ])?;
    }
    let latch = serde_json::to_string(&json!({ "emergency": delta.emergency }))?;
    tx.prepare_cached(
        "insert into safety_state (id, snapshot, updated_at_ms) values (1, ?1, ?2)
         on conflict (id) do update set snapshot = excluded.snapshot, updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![latch, now_ms])?;
    Ok(())
}
