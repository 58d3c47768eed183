//! Commands of masters that poll the agent's local API instead of taking MQTT: handing them out
//! with a lock, as the backend's `get_and_lock_slave_commands` does, and ending them for the
//! master that holds them. The lock lives in the commands table itself: a handed-out command is
//! `sent` with `polled_by` and `last_sent_at_ms`, so it survives a restart like any other state.

use rusqlite::{OptionalExtension, params};

use super::{
    COMMAND_SELECT, CommandOutcome, CommandRecord, CommandState, Result, Store, command_from_row,
};

/// A command as the local API shows it to the master that polls it: the command, plus the
/// columns of `relay_commands_slave` the Pi keeps (when it was accepted, how it ended).
#[derive(Debug, Clone, PartialEq)]
pub struct PolledCommand {
    pub command: CommandRecord,
    pub accepted_at_ms: i64,
    pub finished_at_ms: Option<i64>,
    pub execution_time_ms: Option<i64>,
    pub error_message: Option<String>,
}

/// What one poll got: the commands now locked for the master, and how many of its commands
/// were ended as expired on the way (for the metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct HandOut {
    pub commands: Vec<PolledCommand>,
    pub expired: usize,
}

/// How `finish_polled_command` went.
#[derive(Debug, Clone, PartialEq)]
pub enum PolledFinish {
    /// No command with this id belongs to this master: the caller learns nothing about it.
    NotFound,
    /// The command as it is now; `changed` is false when it had already ended (a duplicate
    /// completion, or a command that expired first), which then stays as it was.
    Found {
        command: Box<PolledCommand>,
        changed: bool,
    },
}

// The cloud's order: peristaltic > rule > automation > manual, then priority, then the order
// the commands arrived in (the Pi accepts them in the cloud's created_at order, per master).
const HAND_OUT_ORDER: &str =
    "order by case command_type when 'peristaltic' then 0 when 'rule' then 1
    when 'automation' then 2 else 3 end, priority desc, accepted_at_ms, id";

// A command is free to hand out if it was never handed out, or if its lock is older than the
// timeout (the master that took it went quiet). `?2` is the oldest lock time still held.
const FREE: &str = "(state = 'accepted' or coalesce(last_sent_at_ms, 0) < ?2)";

impl Store {
    /// Locks up to `limit` open, unexpired commands of `master` for `lock_timeout_ms`, in the
    /// cloud's order, and returns them. A command whose lock is older than the timeout is handed
    /// out again (`attempts` counts the hand-outs). Commands past their expiry that no master
    /// holds are ended as expired first, with their report to the cloud queued, and never
    /// handed out.
    pub fn lock_polled_commands(
        &mut self,
        master: &str,
        limit: usize,
        lock_timeout_ms: i64,
        now_ms: i64,
    ) -> Result<HandOut> {
        let held_since = now_ms - lock_timeout_ms;
        let expired: Vec<i64> = {
            let mut stmt = self.conn.prepare_cached(&format!(
                "select id from commands
                  where master_device_id = ?1 and state in ('accepted', 'sent')
                    and expires_at_ms <= ?3 and {FREE}
                  order by id"
            ))?;
            stmt.query_map(params![master, held_since, now_ms], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?
        };
        let mut ended = 0;
        for id in expired {
            ended += usize::from(self.finish_command(id, &CommandOutcome::Expired, now_ms)?);
        }

        let tx = self.conn.savepoint()?;
        let ids: Vec<i64> = {
            let mut stmt = tx.prepare_cached(&format!(
                "select id from commands
                  where master_device_id = ?1 and state in ('accepted', 'sent')
                    and expires_at_ms > ?3 and {FREE}
                  {HAND_OUT_ORDER} limit ?4"
            ))?;
            stmt.query_map(params![master, held_since, now_ms, limit as i64], |r| {
                r.get(0)
            })?
            .collect::<rusqlite::Result<_>>()?
        };
        {
            let mut lock = tx.prepare_cached(
                "update commands set state = 'sent', attempts = attempts + 1, last_sent_at_ms = ?2,
                    polled_by = ?3
                  where id = ?1",
            )?;
            for id in &ids {
                lock.execute(params![id, now_ms, master])?;
            }
        }
        let mut locked = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(command) = polled_command(&tx, id)? {
                locked.push(command);
            }
        }
        tx.commit()?;
        Ok(HandOut {
            commands: locked,
            expired: ended,
        })
    }

    /// One command of `master`, or None if there is none with this id for this master.
    pub fn polled_command(&self, master: &str, id: i64) -> Result<Option<PolledCommand>> {
        Ok(polled_command(&self.conn, id)?.filter(|c| c.command.master_device_id == master))
    }

    /// Ends a command of `master` through `finish_command` (so its report to the cloud is
    /// queued with the change) and returns it as it is afterwards. Ending a command twice
    /// changes nothing; a command of another master is `NotFound`, exactly like a missing one.
    pub fn finish_polled_command(
        &mut self,
        master: &str,
        id: i64,
        outcome: &CommandOutcome,
        now_ms: i64,
    ) -> Result<PolledFinish> {
        if self.polled_command(master, id)?.is_none() {
            return Ok(PolledFinish::NotFound);
        }
        let changed = self.finish_command(id, outcome, now_ms)?;
        Ok(match self.polled_command(master, id)? {
            Some(command) => PolledFinish::Found {
                command: Box::new(command),
                changed,
            },
            None => PolledFinish::NotFound,
        })
    }
}

fn polled_command(conn: &rusqlite::Connection, id: i64) -> Result<Option<PolledCommand>> {
    // COMMAND_SELECT's columns first, in its order, so `command_from_row` reads them.
    let sql = format!(
        "select c.*, x.accepted_at_ms, x.finished_at_ms, x.execution_time_ms, x.error_message
           from ({COMMAND_SELECT} where id = ?1) c join commands x on x.id = c.id"
    );
    let mut stmt = conn.prepare_cached(&sql)?;
    let row = stmt
        .query_row([id], |r| {
            Ok(PolledCommand {
                command: command_from_row(r)?,
                accepted_at_ms: r.get(17)?,
                finished_at_ms: r.get(18)?,
                execution_time_ms: r.get(19)?,
                error_message: r.get(20)?,
            })
        })
        .optional()?;
    Ok(row)
}

impl PolledCommand {
    /// The status the cloud would show for this command: a handed-out command is `processing`
    /// there too, one not yet handed out is `pending`.
    pub fn cloud_status(&self) -> &'static str {
        match self.command.state {
            CommandState::Accepted => "pending",
            CommandState::Sent => "processing",
            CommandState::Completed => "completed",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{CommandState, OutboxClass};
    use super::*;

    const MASTER: &str = "ESP32_POLL";
    const TIMEOUT_MS: i64 = 30_000;

    fn command(id: i64, command_type: &str, priority: i32) -> CommandRecord {
        CommandRecord {
            id,
            master_device_id: MASTER.into(),
            slave_mac_address: "14:33:5C:38:BF:60".into(),
            slave_device_id: None,
            actions: crate::command::actions_from_columns(&[0], &["on".into()], &[60]).unwrap(),
            command_type: crate::command::CommandType::parse(command_type).unwrap(),
            triggered_by: crate::command::CommandSource::Manual,
            priority,
            rule_id: None,
            rule_name: None,
            expires_at_ms: 1_000_000,
            state: CommandState::Accepted,
            attempts: 0,
            last_sent_at_ms: None,
            polled_by: None,
        }
    }

    fn poll(store: &mut Store, now_ms: i64) -> Vec<PolledCommand> {
        store
            .lock_polled_commands(MASTER, 5, TIMEOUT_MS, now_ms)
            .unwrap()
            .commands
    }

    fn ids(commands: &[PolledCommand]) -> Vec<i64> {
        commands.iter().map(|c| c.command.id).collect()
    }

    fn completed() -> CommandOutcome {
        CommandOutcome::Completed {
            execution_time_ms: 150,
            relay_states: Some(vec![true]),
        }
    }

    #[test]
    fn commands_are_handed_out_peristaltic_then_rule_then_automation_then_manual_by_priority() {
        let mut store = Store::open_in_memory().unwrap();
        let accepted = [
            (1, "manual", 90),
            (2, "automation", 10),
            (3, "rule", 10),
            (4, "peristaltic", 0),
            (5, "manual", 10),
            (6, "rule", 50),
            (7, "manual", 10),
        ];
        for (i, (id, kind, priority)) in accepted.into_iter().enumerate() {
            store
                .accept_command(&command(id, kind, priority), i as i64)
                .unwrap();
        }
        let first = poll(&mut store, 100);
        assert_eq!(ids(&first), vec![4, 6, 3, 2, 1]);
        let rest = poll(&mut store, 101);
        assert_eq!(ids(&rest), vec![5, 7], "equal priority: accepted order");
        assert!(poll(&mut store, 102).is_empty());
    }

    #[test]
    fn a_locked_command_is_handed_out_again_only_after_the_timeout() {
        let mut store = Store::open_in_memory().unwrap();
        store.accept_command(&command(1, "manual", 10), 0).unwrap();
        let first = poll(&mut store, 1_000);
        assert_eq!(first[0].command.state, CommandState::Sent);
        assert_eq!(first[0].command.attempts, 1);
        assert_eq!(first[0].command.polled_by.as_deref(), Some(MASTER));
        assert_eq!(first[0].cloud_status(), "processing");
        assert!(
            poll(&mut store, 1_000 + TIMEOUT_MS).is_empty(),
            "a lock exactly as old as the timeout still holds"
        );
        let again = poll(&mut store, 1_001 + TIMEOUT_MS);
        assert_eq!(ids(&again), vec![1]);
        assert_eq!(again[0].command.attempts, 2, "delivery count");
    }

    #[test]
    fn an_expired_command_is_never_handed_out_and_its_expiry_is_queued_for_the_cloud() {
        let mut store = Store::open_in_memory().unwrap();
        let mut stale = command(1, "manual", 10);
        stale.expires_at_ms = 500;
        store.accept_command(&stale, 0).unwrap();
        store.accept_command(&command(2, "manual", 10), 0).unwrap();
        let handed = store
            .lock_polled_commands(MASTER, 5, TIMEOUT_MS, 500)
            .unwrap();
        assert_eq!(ids(&handed.commands), vec![2]);
        assert_eq!(handed.expired, 1);
        assert_eq!(
            store.command(1).unwrap().unwrap().state,
            CommandState::Expired
        );
        let due = store.outbox_due(1_000, 10).unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].class, OutboxClass::Completion);
        assert_eq!(due[0].payload["command_id"], 1);
        assert_eq!(due[0].payload["status"], "expired");
    }

    #[test]
    fn a_command_held_by_its_master_does_not_expire_under_it_until_the_lock_times_out() {
        let mut store = Store::open_in_memory().unwrap();
        let mut short = command(1, "manual", 10);
        short.expires_at_ms = 2_000;
        store.accept_command(&short, 0).unwrap();
        assert_eq!(poll(&mut store, 1_000).len(), 1);
        // The master may be running it right now: its completion must still count.
        poll(&mut store, 3_000);
        assert_eq!(store.command(1).unwrap().unwrap().state, CommandState::Sent);
        poll(&mut store, 1_001 + TIMEOUT_MS);
        assert_eq!(
            store.command(1).unwrap().unwrap().state,
            CommandState::Expired
        );
    }

    #[test]
    fn a_master_gets_only_its_own_commands() {
        let mut store = Store::open_in_memory().unwrap();
        let mut other = command(1, "manual", 10);
        other.master_device_id = "ESP32_OTHER".into();
        store.accept_command(&other, 0).unwrap();
        assert!(poll(&mut store, 1).is_empty());
        assert_eq!(store.polled_command(MASTER, 1).unwrap(), None);
        assert_eq!(
            store
                .finish_polled_command(MASTER, 1, &completed(), 2)
                .unwrap(),
            PolledFinish::NotFound
        );
        assert_eq!(
            store.command(1).unwrap().unwrap().state,
            CommandState::Accepted,
            "another master's completion changes nothing"
        );
    }

    #[test]
    fn finishing_a_polled_command_twice_queues_one_completion_and_keeps_the_first_outcome() {
        let mut store = Store::open_in_memory().unwrap();
        store.accept_command(&command(1, "manual", 10), 0).unwrap();
        poll(&mut store, 10);
        let PolledFinish::Found { command, changed } = store
            .finish_polled_command(MASTER, 1, &completed(), 20)
            .unwrap()
        else {
            panic!("the master's own command is found");
        };
        assert!(changed);
        assert_eq!(command.cloud_status(), "completed");
        assert_eq!(command.execution_time_ms, Some(150));
        assert_eq!(command.finished_at_ms, Some(20));
        let failed = CommandOutcome::Failed {
            reason: "late".into(),
            execution_time_ms: None,
        };
        let PolledFinish::Found { command, changed } =
            store.finish_polled_command(MASTER, 1, &failed, 30).unwrap()
        else {
            panic!("still found");
        };
        assert!(!changed, "a second completion changes nothing");
        assert_eq!(command.cloud_status(), "completed");
        assert_eq!(command.error_message, None);
        assert_eq!(store.outbox_due(100, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_lock_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.db");
        {
            let mut store = Store::open(&path).unwrap();
            store.accept_command(&command(1, "manual", 10), 0).unwrap();
            poll(&mut store, 10);
        }
        let mut store = Store::open(&path).unwrap();
        assert!(
            poll(&mut store, 20).is_empty(),
            "still locked after a restart"
        );
        assert_eq!(
            store
                .polled_command(MASTER, 1)
                .unwrap()
                .unwrap()
                .accepted_at_ms,
            0
        );
    }
}
