//! Authentication of what masters report, without I/O: an ack or a relay state report is
//! believed only with a valid signature under its master's key (for the master of the topic it
//! came on) and a counter that its anti-replay window has not seen. What the cloud records about
//! a command, and what the interlocks think the relays are, comes only from reports that pass.
//!
//! Telemetry, announcements and status are not signed: the broker's ACL (only a master's own
//! login may publish under its topics) protects them. Why: `docs/decisions/0009-signed-reports.md`.

use std::collections::{BTreeSet, HashMap};

use firmware_protocol::{DeviceId, MasterKey, ReplayWindow, ReportVerifier, VerifyError};

use crate::bridge::Inbound;

/// A report refused: which master, which kind, which check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} from {master} refused: {error}")]
pub struct ReportRefusal {
    pub master: String,
    pub kind: &'static str,
    pub error: VerifyError,
}

impl ReportRefusal {
    /// The label of the `bad_messages` and `reports_refused` metrics.
    pub fn check_name(&self) -> &'static str {
        self.error.check_name()
    }
}

/// One verifier per served master, and which windows moved since they were last saved.
#[derive(Debug)]
pub struct ReportGate {
    verifiers: HashMap<String, ReportVerifier>,
    moved: BTreeSet<String>,
}

impl ReportGate {
    /// `windows` are those saved before (master, highest counter, seen bitmap); a master with
    /// none starts with an empty window.
    pub fn new(
        keys: impl IntoIterator<Item = (String, MasterKey)>,
        windows: &[(String, u64, u64)],
    ) -> ReportGate {
        let saved: HashMap<&str, ReplayWindow> = windows
            .iter()
            .map(|(m, highest, seen)| (m.as_str(), ReplayWindow::from_parts(Some(*highest), *seen)))
            .collect();
        let verifiers = keys
            .into_iter()
            .filter_map(|(master, key)| {
                let id = DeviceId::new(master.as_str()).ok()?;
                let window = saved.get(master.as_str()).copied().unwrap_or_default();
                Some((master, ReportVerifier::new(id, key, window)))
            })
            .collect();
        ReportGate {
            verifiers,
            moved: BTreeSet::new(),
        }
    }

    /// Passes everything that is not an ack or a relay state report; checks those.
    pub fn admit(&mut self, inbound: &Inbound) -> Result<(), ReportRefusal> {
        let (master, kind, result) = match inbound {
            Inbound::Ack(master, ack) => {
                let result = self.verifier(master, "ack")?.verify_ack(ack);
                (master, "ack", result)
            }
            Inbound::RelayState(master, report) => {
                let result = self
                    .verifier(master, "relay state report")?
                    .verify_relay_states(report);
                (master, "relay state report", result)
            }
            _ => return Ok(()),
        };
        match result {
            Ok(()) => {
                self.moved.insert(master.to_string());
                Ok(())
            }
            Err(error) => Err(ReportRefusal {
                master: master.to_string(),
                kind,
                error,
            }),
        }
    }

    fn verifier(
        &mut self,
        master: &DeviceId,
        kind: &'static str,
    ) -> Result<&mut ReportVerifier, ReportRefusal> {
        // Decoding already refused devices we do not serve; a served master without a key
        // cannot be checked, so nothing it reports is believed.
        self.verifiers
            .get_mut(master.as_str())
            .ok_or_else(|| ReportRefusal {
                master: master.to_string(),
                kind,
                error: VerifyError::Unsigned,
            })
    }

    /// The windows that moved since the last call, to save: (master, highest, seen bitmap).
    pub fn take_moved(&mut self) -> Vec<(String, u64, u64)> {
        std::mem::take(&mut self.moved)
            .into_iter()
            .filter_map(|master| {
                let window = self.verifiers.get(&master)?.window();
                Some((master, window.highest()?, window.seen_bits()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use firmware_protocol::message::{AckResult, CommandAck, RelayStateReport};
    use firmware_protocol::{CommandId, ReportSigner};

    use super::*;

    const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn key(hex: &str) -> MasterKey {
        MasterKey::from_hex(hex).unwrap()
    }

    fn master() -> DeviceId {
        DeviceId::new("ESP32_A").unwrap()
    }

    fn gate(windows: &[(String, u64, u64)]) -> ReportGate {
        ReportGate::new([("ESP32_A".to_string(), key(KEY))], windows)
    }

    fn ack() -> CommandAck {
        CommandAck {
            v: 1,
            command_id: Some(CommandId::backend(7).unwrap()),
            result: AckResult::Completed,
            error: None,
            slave_mac: Some("14:33:5C:38:BF:60".parse().unwrap()),
            relay_states: vec![true, true, true, true],
            execution_time_ms: 0,
            counter: None,
            sig: None,
        }
    }

    #[test]
    fn a_signed_ack_passes_and_a_forged_one_is_refused_with_its_check() {
        let mut gate = gate(&[]);
        let good = ReportSigner::new(master(), key(KEY), 100).seal_ack(ack());
        gate.admit(&Inbound::Ack(master(), good.clone())).unwrap();

        let forged = ReportSigner::new(master(), key(OTHER_KEY), 101).seal_ack(ack());
        let refusal = gate.admit(&Inbound::Ack(master(), forged)).unwrap_err();
        assert_eq!(refusal.check_name(), "bad_signature");

        let refusal = gate.admit(&Inbound::Ack(master(), ack())).unwrap_err();
        assert_eq!(refusal.check_name(), "unsigned");

        let refusal = gate.admit(&Inbound::Ack(master(), good)).unwrap_err();
        assert_eq!(refusal.check_name(), "replayed");
    }

    #[test]
    fn a_relay_state_report_is_checked_like_an_ack() {
        let mut gate = gate(&[]);
        let report = RelayStateReport {
            v: 1,
            slaves: vec![],
            counter: None,
            sig: None,
        };
        assert_eq!(
            gate.admit(&Inbound::RelayState(master(), report.clone()))
                .unwrap_err()
                .check_name(),
            "unsigned"
        );
        let sealed = ReportSigner::new(master(), key(KEY), 5).seal_relay_states(report);
        gate.admit(&Inbound::RelayState(master(), sealed)).unwrap();
    }

    #[test]
    fn a_report_replayed_after_a_restart_is_refused_from_the_saved_window() {
        let mut first = gate(&[]);
        let sealed = ReportSigner::new(master(), key(KEY), 1_000).seal_ack(ack());
        first
            .admit(&Inbound::Ack(master(), sealed.clone()))
            .unwrap();
        let saved = first.take_moved();
        assert_eq!(saved, vec![("ESP32_A".to_string(), 1_000, 1)]);
        assert!(first.take_moved().is_empty(), "saved once");

        let mut restarted = gate(&saved);
        assert_eq!(
            restarted
                .admit(&Inbound::Ack(master(), sealed))
                .unwrap_err()
                .check_name(),
            "replayed"
        );
    }

    #[test]
    fn a_master_without_a_key_has_nothing_believed_and_other_messages_pass() {
        let mut gate = ReportGate::new(Vec::<(String, MasterKey)>::new(), &[]);
        let sealed = ReportSigner::new(master(), key(KEY), 1).seal_ack(ack());
        assert!(gate.admit(&Inbound::Ack(master(), sealed)).is_err());
        gate.admit(&Inbound::Ignored).unwrap();
    }
}
