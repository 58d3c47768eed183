//! The agent's command model, typed: one [`RelayAction`] per relay (relay, on/off, duration),
//! the command's type and source as enums. Parsed once where a command enters the agent (the
//! backend's row in `cloud`, the store's row in `store`); the table's parallel arrays and its
//! strings exist only on the wire and in SQL, so an impossible command cannot be represented
//! inside the agent.

use serde::{Deserialize, Serialize};

pub use firmware_protocol::frame::SwitchAction;
pub use firmware_protocol::message::RelayAction;

/// `relay_commands_slave.command_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandType {
    Manual,
    Rule,
    Peristaltic,
    Automation,
}

impl CommandType {
    pub const ALL: [CommandType; 4] = [
        CommandType::Manual,
        CommandType::Rule,
        CommandType::Peristaltic,
        CommandType::Automation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandType::Manual => "manual",
            CommandType::Rule => "rule",
            CommandType::Peristaltic => "peristaltic",
            CommandType::Automation => "automation",
        }
    }

    pub fn parse(text: &str) -> Result<CommandType, String> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == text)
            .ok_or_else(|| format!("unknown command_type {text:?}"))
    }

    /// The cloud's order among pending commands: peristaltic > rule > automation > manual.
    pub fn rank(self) -> u8 {
        match self {
            CommandType::Peristaltic => 0,
            CommandType::Rule => 1,
            CommandType::Automation => 2,
            CommandType::Manual => 3,
        }
    }
}

impl std::fmt::Display for CommandType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `relay_commands_slave.triggered_by`: who asked for the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CommandSource {
    Manual,
    Rule,
    Automation,
    Peristaltic,
    Macro,
}

impl CommandSource {
    pub const ALL: [CommandSource; 5] = [
        CommandSource::Manual,
        CommandSource::Rule,
        CommandSource::Automation,
        CommandSource::Peristaltic,
        CommandSource::Macro,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CommandSource::Manual => "manual",
            CommandSource::Rule => "rule",
            CommandSource::Automation => "automation",
            CommandSource::Peristaltic => "peristaltic",
            CommandSource::Macro => "macro",
        }
    }

    pub fn parse(text: &str) -> Result<CommandSource, String> {
        Self::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| format!("unknown triggered_by {text:?}"))
    }
}

impl std::fmt::Display for CommandSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `"on"` / `"off"`, as `relay_commands_slave.actions` spells them.
pub fn action_str(action: SwitchAction) -> &'static str {
    match action {
        SwitchAction::On => "on",
        SwitchAction::Off => "off",
    }
}

/// One action per relay from the table's three parallel arrays, or why they are not a command.
pub fn actions_from_columns(
    relay_numbers: &[i64],
    actions: &[String],
    duration_seconds: &[i64],
) -> Result<Vec<RelayAction>, String> {
    if relay_numbers.len() != actions.len() || relay_numbers.len() != duration_seconds.len() {
        return Err("relay_numbers, actions and duration_seconds differ in length".into());
    }
    relay_numbers
        .iter()
        .zip(actions)
        .zip(duration_seconds)
        .map(|((&relay, action), &duration)| {
            Ok(RelayAction {
                relay: u8::try_from(relay)
                    .map_err(|_| format!("relay number {relay} out of range"))?,
                action: match action.as_str() {
                    "on" => SwitchAction::On,
                    "off" => SwitchAction::Off,
                    other => return Err(format!("actions must be on/off, got {other:?}")),
                },
                duration_s: u32::try_from(duration)
                    .map_err(|_| format!("duration {duration} out of range"))?,
            })
        })
        .collect()
}

/// The table's three parallel arrays, for the wire and SQL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionColumns {
    pub relay_numbers: Vec<u8>,
    pub actions: Vec<&'static str>,
    pub duration_seconds: Vec<u32>,
}

pub fn actions_to_columns(actions: &[RelayAction]) -> ActionColumns {
    ActionColumns {
        relay_numbers: actions.iter().map(|a| a.relay).collect(),
        actions: actions.iter().map(|a| action_str(a.action)).collect(),
        duration_seconds: actions.iter().map(|a| a.duration_s).collect(),
    }
}

/// Whether any relay of these actions is switched on.
pub fn switches_on(actions: &[RelayAction]) -> bool {
    actions.iter().any(|a| a.action == SwitchAction::On)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tables_strings_round_trip_and_nothing_else_parses() {
        for t in CommandType::ALL {
            assert_eq!(CommandType::parse(t.as_str()), Ok(t));
            assert_eq!(serde_json::to_value(t).unwrap(), t.as_str());
        }
        for s in CommandSource::ALL {
            assert_eq!(CommandSource::parse(s.as_str()), Ok(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(CommandType::parse("Manual").is_err());
        assert!(CommandSource::parse("").is_err());
    }

    #[test]
    fn the_parallel_arrays_become_one_action_per_relay_or_a_reason() {
        let actions =
            actions_from_columns(&[0, 3], &["on".into(), "off".into()], &[60, 0]).unwrap();
        assert_eq!(
            actions,
            vec![
                RelayAction {
                    relay: 0,
                    action: SwitchAction::On,
                    duration_s: 60
                },
                RelayAction {
                    relay: 3,
                    action: SwitchAction::Off,
                    duration_s: 0
                },
            ]
        );
        let columns = actions_to_columns(&actions);
        assert_eq!(columns.relay_numbers, vec![0, 3]);
        assert_eq!(columns.actions, vec!["on", "off"]);
        assert_eq!(columns.duration_seconds, vec![60, 0]);
        assert!(switches_on(&actions));

        for (relays, acts, durations, why) in [
            (vec![0, 1], vec!["on"], vec![1, 1], "differ in length"),
            (vec![300], vec!["on"], vec![1], "relay number 300"),
            (vec![0], vec!["toggle"], vec![1], "on/off"),
            (vec![0], vec!["on"], vec![-1], "duration -1"),
        ] {
            let acts: Vec<String> = acts.into_iter().map(String::from).collect();
            let err = actions_from_columns(&relays, &acts, &durations).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
