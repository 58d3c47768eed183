//! The ESP-NOW frame codec: round trips, every failed check, and no panic on any input.

use firmware_protocol::frame::{
    AckCode, FRAME_LEN, Frame, FrameBody, FrameError, FrameRepr, RelayStates, ReportReason,
    SwitchAction, crc32,
};
use proptest::prelude::*;

fn command_frame() -> FrameRepr {
    FrameRepr {
        sequence: 7,
        emergency_latched: false,
        body: FrameBody::RelayCommand {
            command_id: 123,
            relay: 2,
            action: SwitchAction::On,
            duration_s: 60,
        },
    }
}

#[test]
fn crc32_matches_the_standard_check_value() {
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
}

#[test]
fn a_relay_command_round_trips_through_bytes() {
    let bytes = command_frame().to_bytes().unwrap();
    assert_eq!(bytes.len(), FRAME_LEN);
    assert_eq!(&bytes[..2], b"AC");
    assert_eq!(FrameRepr::from_bytes(&bytes).unwrap(), command_frame());
}

#[test]
fn fields_sit_at_their_documented_offsets_little_endian() {
    let bytes = command_frame().to_bytes().unwrap();
    let view = Frame::new_checked(&bytes[..]).unwrap();
    assert_eq!(view.version(), 1);
    assert_eq!(view.kind_raw(), 1);
    assert_eq!(bytes[5], 2, "relay");
    assert_eq!(bytes[6], 2, "action on");
    assert_eq!(&bytes[8..12], &7u32.to_le_bytes());
    assert_eq!(&bytes[12..20], &123u64.to_le_bytes());
    assert_eq!(&bytes[20..24], &60u32.to_le_bytes());
    assert_eq!(&bytes[32..36], &crc32(&bytes[..32]).to_le_bytes());
}

#[test]
fn a_short_buffer_asks_for_more_bytes() {
    let bytes = command_frame().to_bytes().unwrap();
    assert_eq!(
        FrameRepr::from_bytes(&bytes[..20]),
        Err(FrameError::Truncated {
            needed: FRAME_LEN,
            got: 20
        })
    );
}

#[test]
fn a_long_buffer_is_oversized() {
    let mut bytes = command_frame().to_bytes().unwrap().to_vec();
    bytes.push(0);
    assert!(matches!(
        FrameRepr::from_bytes(&bytes),
        Err(FrameError::Oversized { .. })
    ));
}

#[test]
fn a_wrong_version_is_reported_as_such() {
    let mut bytes = command_frame().to_bytes().unwrap();
    bytes[2] = 2;
    assert_eq!(
        FrameRepr::from_bytes(&bytes),
        Err(FrameError::UnsupportedVersion {
            got: 2,
            supported: 1
        })
    );
}

#[test]
fn any_flipped_bit_fails_a_check() {
    let bytes = command_frame().to_bytes().unwrap();
    for i in 0..FRAME_LEN {
        for bit in 0..8 {
            let mut tampered = bytes;
            tampered[i] ^= 1 << bit;
            assert!(
                FrameRepr::from_bytes(&tampered).is_err(),
                "flipping bit {bit} of byte {i} went unnoticed"
            );
        }
    }
}

#[test]
fn a_field_the_kind_does_not_use_must_be_zero() {
    let heartbeat = FrameRepr {
        sequence: 1,
        emergency_latched: true,
        body: FrameBody::Heartbeat,
    };
    let mut bytes = heartbeat.to_bytes().unwrap();
    bytes[5] = 3;
    let mut view = Frame::new_unchecked(&mut bytes[..]);
    view.fill_tag();
    assert_eq!(
        FrameRepr::from_bytes(&bytes),
        Err(FrameError::UnusedFieldSet("relay"))
    );
}

#[test]
fn out_of_range_fields_are_refused_on_emit_and_parse() {
    let mut repr = command_frame();
    repr.body = FrameBody::RelayCommand {
        command_id: 1,
        relay: 16,
        action: SwitchAction::Off,
        duration_s: 0,
    };
    assert!(matches!(
        repr.to_bytes(),
        Err(FrameError::RelayOutOfRange { relay: 16, .. })
    ));
    let mut bytes = command_frame().to_bytes().unwrap();
    bytes[5] = 16;
    Frame::new_unchecked(&mut bytes[..]).fill_tag();
    assert!(matches!(
        FrameRepr::from_bytes(&bytes),
        Err(FrameError::RelayOutOfRange { relay: 16, .. })
    ));
}

#[test]
fn states_beyond_the_relay_count_are_refused() {
    let repr = FrameRepr {
        sequence: 1,
        emergency_latched: false,
        body: FrameBody::StateReport {
            reason: ReportReason::Heartbeat,
            states: RelayStates {
                bits: 0b1_0000,
                count: 4,
            },
        },
    };
    assert!(matches!(
        repr.to_bytes(),
        Err(FrameError::StatesBeyondCount { .. })
    ));
}

#[test]
fn emit_refuses_a_short_buffer() {
    let mut buffer = [0u8; 10];
    assert!(matches!(
        command_frame().emit(&mut buffer),
        Err(FrameError::BufferTooSmall { .. })
    ));
}

fn arb_states() -> impl Strategy<Value = RelayStates> {
    (0u8..=16).prop_flat_map(|count| {
        let max = if count == 16 {
            u16::MAX
        } else {
            (1u16 << count) - 1
        };
        (0..=max).prop_map(move |bits| RelayStates { bits, count })
    })
}

fn arb_body() -> impl Strategy<Value = FrameBody> {
    let action = prop_oneof![Just(SwitchAction::On), Just(SwitchAction::Off)];
    let code = prop_oneof![
        Just(AckCode::Applied),
        Just(AckCode::Duplicate),
        Just(AckCode::EmergencyLatched),
        Just(AckCode::NoSuchRelay)
    ];
    let reason = prop_oneof![
        Just(ReportReason::Heartbeat),
        Just(ReportReason::Boot),
        Just(ReportReason::MasterSilent),
        Just(ReportReason::MaxOnTime),
        Just(ReportReason::DurationEnded),
        Just(ReportReason::EmergencyStop)
    ];
    prop_oneof![
        (1u64.., 0u8..16, action, 0u32..=86_400).prop_map(
            |(command_id, relay, action, duration_s)| FrameBody::RelayCommand {
                command_id,
                relay,
                action,
                duration_s
            }
        ),
        (1u64.., 0u8..16, code, arb_states(), any::<u32>()).prop_map(
            |(command_id, relay, code, states, elapsed_ms)| FrameBody::Ack {
                command_id,
                relay,
                code,
                states,
                elapsed_ms
            }
        ),
        (reason, arb_states())
            .prop_map(|(reason, states)| FrameBody::StateReport { reason, states }),
        Just(FrameBody::Heartbeat),
        (0u8..=16).prop_map(|relay_count| FrameBody::PairingRequest { relay_count }),
        Just(FrameBody::PairingAccept),
        Just(FrameBody::EmergencyStop),
        Just(FrameBody::EmergencyReset),
    ]
}

proptest! {
    #[test]
    fn every_valid_frame_round_trips(sequence in any::<u32>(), emergency_latched in any::<bool>(), body in arb_body()) {
        let repr = FrameRepr { sequence, emergency_latched, body };
        let bytes = repr.to_bytes().unwrap();
        prop_assert_eq!(FrameRepr::from_bytes(&bytes), Ok(repr));
    }

    #[test]
    fn arbitrary_bytes_parse_or_give_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        // Ok or Err, never a panic; an Ok must re-emit to the same bytes.
        if let Ok(repr) = FrameRepr::from_bytes(&bytes) {
            prop_assert_eq!(&repr.to_bytes().unwrap()[..], &bytes[..]);
        }
    }

    #[test]
    fn frames_with_a_valid_header_and_tag_but_random_fields_never_panic(mut bytes in proptest::array::uniform32(any::<u8>())) {
        // Random bytes almost never pass the tag; fix header and tag so the field checks run.
        let mut frame = [0u8; FRAME_LEN];
        bytes[0] = b'A';
        bytes[1] = b'C';
        bytes[2] = 1;
        bytes[3] %= 10;
        frame[..32].copy_from_slice(&bytes);
        Frame::new_unchecked(&mut frame[..]).fill_tag();
        if let Ok(repr) = FrameRepr::from_bytes(&frame) {
            prop_assert_eq!(repr.to_bytes().unwrap(), frame);
        }
    }
}
