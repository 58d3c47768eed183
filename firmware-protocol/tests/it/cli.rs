//! The `esp32-sim` command line: every flag documented, slaves, keys and sensors parsed into
//! the configuration, secrets kept out of `Debug`.

use clap::{CommandFactory, Parser};
use firmware_protocol::sim::cli::Args;
use firmware_protocol::sim::{SensorSource, SensorSpec};

const KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn parse(args: &[&str]) -> Args {
    Args::try_parse_from(std::iter::once("esp32-sim").chain(args.iter().copied())).unwrap()
}

#[test]
fn help_documents_every_flag() {
    let mut command = Args::command();
    let help = command.render_long_help().to_string();
    for flag in [
        "--mqtt",
        "--master",
        "--slave",
        "--key",
        "--sensor",
        "--interval-ms",
        "--state-dir",
        "--rest-url",
        "--jwt",
        "--radio-loss-percent",
        "--radio-delay-ms",
        "--relay-max-on-s",
        "--boot-on",
        "--master-silent-timeout-ms",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    for arg in command.get_arguments() {
        assert!(
            arg.get_help().is_some() || arg.get_id() == "help" || arg.get_id() == "version",
            "{} has no help text",
            arg.get_id()
        );
    }
}

#[test]
fn slaves_keys_and_sensors_become_the_configuration() {
    let config = parse(&[
        "--mqtt",
        "mqtt://127.0.0.1:1883",
        "--master",
        "M1",
        "--master",
        "M2",
        "--slave",
        "14:33:5C:38:BF:60:8",
        "--slave",
        "M2=14:33:5C:38:BF:61",
        "--key",
        KEY,
        "--sensor",
        "ph=6.8..6.0",
        "--sensor",
        "tank=40@l",
        "--boot-on",
        "14:33:5C:38:BF:60:3",
        "--ramp-steps",
        "10",
    ])
    .into_config()
    .unwrap();
    assert_eq!(config.masters.len(), 2);
    assert_eq!(config.masters[0].slaves.len(), 1);
    assert_eq!(config.masters[0].slaves[0].relays.len(), 8);
    assert!(config.masters[0].slaves[0].relays[3].boot_on);
    assert!(!config.masters[0].slaves[0].relays[2].boot_on);
    assert_eq!(config.masters[1].slaves.len(), 2);
    assert_eq!(config.masters[1].slaves[1].relays.len(), 4);
    let sensors = &config.masters[0].sensors;
    assert_eq!(
        sensors[0],
        SensorSpec {
            name: "ph".into(),
            unit: Some("pH".into()),
            source: SensorSource::Ramp {
                from: 6.8,
                to: 6.0,
                steps: 10
            }
        }
    );
    assert_eq!(sensors[1].unit.as_deref(), Some("l"));
    assert_eq!(sensors[0].value_at(5), 6.4);
    assert_eq!(sensors[0].value_at(50), 6.0);
}

#[test]
fn bad_flags_are_refused_with_a_reason() {
    assert!(Args::try_parse_from(["esp32-sim", "--master", "M", "--sensor", "ph=high"]).is_err());
    let no_key = parse(&["--mqtt", "mqtt://h:1", "--master", "M"]).into_config();
    assert!(no_key.unwrap_err().to_string().contains("no --key"));
    let bad_slave = parse(&[
        "--mqtt",
        "mqtt://h:1",
        "--master",
        "M",
        "--key",
        KEY,
        "--slave",
        "14:33:5C:38:BF:60:17",
    ])
    .into_config();
    assert!(bad_slave.unwrap_err().to_string().contains("relay count"));
    let bad_key = parse(&["--mqtt", "mqtt://h:1", "--master", "M", "--key", "abcd"]).into_config();
    assert!(!bad_key.unwrap_err().to_string().contains("abcd"));
}

#[test]
fn debug_output_never_shows_keys_or_tokens() {
    let args = parse(&[
        "--mqtt",
        "mqtt://h:1",
        "--master",
        "M",
        "--key",
        KEY,
        "--rest-url",
        "http://x",
        "--jwt",
        "secret.jwt.token",
    ]);
    let printed = format!("{args:?}");
    assert!(
        !printed.contains(KEY) && !printed.contains("secret.jwt"),
        "{printed}"
    );
    let config = args.into_config().unwrap();
    let printed = format!("{config:?}");
    assert!(
        !printed.contains(&KEY[..16]) && !printed.contains("secret.jwt"),
        "{printed}"
    );
}
