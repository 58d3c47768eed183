//! The reads the operator console needs beyond what `/health` reads: slaves' relay states,
//! devices with their firmware, the sensors with history, and why the engine skips a rule.

use std::collections::HashMap;

use rusqlite::params;

use super::{Result, Store};

/// A slave's relays as its master last reported them.
#[derive(Debug, Clone, PartialEq)]
pub struct SlaveRelays {
    pub master: String,
    pub slave_mac: String,
    pub states: Vec<bool>,
    pub updated_at_ms: i64,
}

/// A master as the console lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceRow {
    pub device_id: String,
    pub online: bool,
    pub last_seen_ms: Option<i64>,
    pub firmware_version: Option<String>,
}

impl Store {
    /// Every slave's last reported relay states, by master and slave.
    pub fn slave_relays(&self) -> Result<Vec<SlaveRelays>> {
        let mut stmt = self.conn.prepare_cached(
            "select master_device_id, slave_mac_address, states, updated_at_ms from relay_states
             order by master_device_id, slave_mac_address",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (master, slave_mac, states, updated_at_ms) = row?;
            out.push(SlaveRelays {
                master,
                slave_mac: slave_mac.to_ascii_uppercase(),
                states: serde_json::from_str(&states)?,
                updated_at_ms,
            });
        }
        Ok(out)
    }

    pub fn device_rows(&self) -> Result<Vec<DeviceRow>> {
        let mut stmt = self.conn.prepare_cached(
            "select device_id, online, last_seen_ms, firmware_version from devices
             order by device_id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(DeviceRow {
                device_id: r.get(0)?,
                online: r.get(1)?,
                last_seen_ms: r.get(2)?,
                firmware_version: r.get(3)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// (device, sensor) pairs with a rollup since `since_ms`, sorted.
    pub fn sensors_since(&self, since_ms: i64) -> Result<Vec<(String, String)>> {
        let mut stmt = self.conn.prepare_cached(
            "select distinct device_id, sensor_key from readings_rollup where minute_ms >= ?1
             order by device_id, sensor_key",
        )?;
        let rows = stmt.query_map(params![since_ms], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Why the engine cannot run a rule, by `decision_rules.id` (rules it runs are absent).
    pub fn rule_errors(&self) -> Result<HashMap<String, String>> {
        let mut stmt = self
            .conn
            .prepare_cached("select rule, reason from rule_problems where reason is not null")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slave_relays_and_rule_errors_read_back() {
        let mut store = Store::open_in_memory().unwrap();
        store
            .record_relay_report(
                "M1",
                &[("14:33:5c:38:bf:60".into(), vec![true, false])],
                &serde_json::json!({}),
                5,
            )
            .unwrap();
        let relays = store.slave_relays().unwrap();
        assert_eq!(relays.len(), 1);
        assert_eq!(relays[0].slave_mac, "14:33:5C:38:BF:60");
        assert_eq!(relays[0].states, vec![true, false]);
        store.note_rule_problem("r1", 1, Some("bad"), 1).unwrap();
        assert_eq!(store.rule_errors().unwrap().get("r1").unwrap(), "bad");
        assert!(store.sensors_since(0).unwrap().is_empty());
    }
}
