//! The notifications' two tables: `notify_inbox` (filled by triggers in the transaction that
//! records the cause) and `notifications` (one row per target until it is delivered).

use rusqlite::params;

use super::{Result, Store};
use crate::notify::{AgentEvent, Delivery};

/// One delivery waiting for its target.
#[derive(Debug, Clone, PartialEq)]
pub struct NotificationRow {
    pub seq: i64,
    pub target: String,
    pub kind: String,
    pub delivery_id: String,
    pub text: String,
    pub body: String,
    pub created_at_ms: i64,
    pub attempts: u32,
}

impl Store {
    /// Up to `limit` recorded events not yet turned into deliveries, oldest first.
    pub fn notify_inbox(&self, limit: usize) -> Result<Vec<AgentEvent>> {
        let mut stmt = self.conn.prepare_cached(
            "select seq, event_type, severity, message, payload, occurred_at_ms from notify_inbox
             order by seq limit ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, event_type, severity, message, payload, occurred_at_ms) = row?;
            out.push(AgentEvent {
                seq,
                event_type,
                severity,
                message,
                // A payload that is not JSON still notifies, with its text.
                payload: serde_json::from_str(&payload).unwrap_or(payload.into()),
                occurred_at_ms,
            });
        }
        Ok(out)
    }

    /// Replaces the inbox rows up to `through_seq` by `deliveries`, in one transaction, then
    /// keeps at most `rows_max` deliveries by dropping the oldest; returns the dropped ones'
    /// (target, kind).
    pub fn notify_route(
        &mut self,
        through_seq: i64,
        deliveries: &[Delivery],
        rows_max: u64,
        now_ms: i64,
    ) -> Result<Vec<(String, String)>> {
        let tx = self.conn.savepoint()?;
        tx.prepare_cached("delete from notify_inbox where seq <= ?1")?
            .execute([through_seq])?;
        {
            let mut stmt = tx.prepare_cached(
                "insert into notifications (target, kind, delivery_id, text, body, created_at_ms)
                 values (?1, ?2, ?3, ?4, ?5, ?6) on conflict (target, delivery_id) do nothing",
            )?;
            for d in deliveries {
                stmt.execute(params![
                    d.target,
                    d.kind.as_str(),
                    d.delivery_id,
                    d.text,
                    d.body.to_string(),
                    now_ms
                ])?;
            }
        }
        let dropped: Vec<(String, String)> = {
            let mut stmt = tx.prepare_cached(
                "delete from notifications where seq in (
                   select seq from notifications order by seq
                   limit max(0, (select count(*) from notifications) - ?1))
                 returning target, kind",
            )?;
            stmt.query_map([rows_max as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?
        };
        tx.commit()?;
        Ok(dropped)
    }

    /// Up to `limit` deliveries due at `now_ms`, oldest first.
    pub fn notifications_due(&self, now_ms: i64, limit: usize) -> Result<Vec<NotificationRow>> {
        let mut stmt = self.conn.prepare_cached(
            "select seq, target, kind, delivery_id, text, body, created_at_ms, attempts
             from notifications where next_attempt_at_ms <= ?1 order by seq limit ?2",
        )?;
        let rows = stmt.query_map(params![now_ms, limit as i64], |r| {
            Ok(NotificationRow {
                seq: r.get(0)?,
                target: r.get(1)?,
                kind: r.get(2)?,
                delivery_id: r.get(3)?,
                text: r.get(4)?,
                body: r.get(5)?,
                created_at_ms: r.get(6)?,
                attempts: r.get::<_, i64>(7)? as u32,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// When the next delivery is due, if any waits.
    pub fn notifications_next_due(&self) -> Result<Option<i64>> {
        Ok(self.conn.query_row(
            "select min(next_attempt_at_ms) from notifications",
            [],
            |r| r.get(0),
        )?)
    }

    /// Delivered, or given up for good: the row goes.
    pub fn notification_done(&mut self, seq: i64) -> Result<()> {
        self.conn
            .execute("delete from notifications where seq = ?1", [seq])?;
        Ok(())
    }

    /// A transient failure: try again from `next_attempt_at_ms`.
    pub fn notification_retry_later(
        &mut self,
        seq: i64,
        error: &str,
        next_attempt_at_ms: i64,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "update notifications set attempts = attempts + 1, last_error = ?2,
               next_attempt_at_ms = ?3 where seq = ?1",
            )?
            .execute(params![seq, error, next_attempt_at_ms])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::store::{CommandOutcome, CommandRecord, OutboxClass};

    fn types(store: &Store) -> Vec<String> {
        store
            .notify_inbox(100)
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect()
    }

    #[test]
    fn an_event_queued_for_the_cloud_lands_in_the_notify_inbox_in_the_same_commit() {
        let mut store = Store::open_in_memory().unwrap();
        let payload = json!({"event_type": "emergency_stop", "severity": "critical",
                             "message": "stop", "payload": {"by": "test"}});
        store
            .enqueue(OutboxClass::Event, "e1", &payload, 5)
            .unwrap();
        store
            .enqueue(OutboxClass::DeviceStatus, "d1", &json!({}), 5)
            .unwrap();
        let inbox = store.notify_inbox(100).unwrap();
        assert_eq!(inbox.len(), 1);
        assert_eq!(inbox[0].event_type, "emergency_stop");
        assert_eq!(inbox[0].payload, json!({"by": "test"}));
        assert_eq!(inbox[0].occurred_at_ms, 5);
    }

    #[test]
    fn a_master_going_offline_and_online_again_is_noted_once_each() {
        let mut store = Store::open_in_memory().unwrap();
        store.record_presence("M1", true, None, None, 1).unwrap();
        store.record_presence("M1", true, None, None, 2).unwrap();
        store.record_presence("M1", false, None, None, 3).unwrap();
        store.record_presence("M1", true, None, None, 4).unwrap();
        assert_eq!(types(&store), ["master_offline", "master_online"]);
    }

    #[test]
    fn a_rule_error_and_an_interlock_refusal_are_noted() {
        let mut store = Store::open_in_memory().unwrap();
        store.note_rule_problem("r1", 1, Some("bad"), 1).unwrap();
        store.note_rule_problem("r1", 1, None, 2).unwrap();
        let cmd = CommandRecord {
            master_device_id: "M1".into(),
            slave_mac_address: "AA".into(),
            priority: 1,
            ..crate::store::tests::command(7)
        };
        store.accept_command(&cmd, 3).unwrap();
        let reason = "refused by the Pi's interlocks: min off-time".to_string();
        let failed = CommandOutcome::Failed {
            reason,
            execution_time_ms: None,
        };
        store.finish_command(7, &failed, 4).unwrap();
        assert_eq!(types(&store), ["rule_error", "command_refused"]);
    }

    #[test]
    fn routing_replaces_the_inbox_by_deliveries_and_keeps_the_bound() {
        let mut store = Store::open_in_memory().unwrap();
        store.record_presence("M1", true, None, None, 1).unwrap();
        store.record_presence("M1", false, None, None, 2).unwrap();
        let inbox = store.notify_inbox(100).unwrap();
        let delivery = |id: &str| Delivery {
            target: "webhook:a".into(),
            kind: crate::notify::Kind::MasterOffline,
            delivery_id: id.into(),
            text: "t".into(),
            body: json!({}),
        };
        let dropped = store
            .notify_route(inbox[0].seq, &[delivery("1"), delivery("2")], 1, 10)
            .unwrap();
        assert_eq!(
            dropped,
            [("webhook:a".to_string(), "master_offline".to_string())]
        );
        assert!(store.notify_inbox(100).unwrap().is_empty());
        let due = store.notifications_due(10, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].delivery_id, "2");
        store
            .notification_retry_later(due[0].seq, "down", 500)
            .unwrap();
        assert!(store.notifications_due(499, 10).unwrap().is_empty());
        assert_eq!(store.notifications_next_due().unwrap(), Some(500));
        store.notification_done(due[0].seq).unwrap();
        assert_eq!(store.notifications_next_due().unwrap(), None);
    }
}
