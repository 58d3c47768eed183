//! Command signing: a good signature passes once; wrong key, any changed byte, a replayed or
//! older counter, another master and no signature all fail.

use firmware_protocol::sign::{
    CommandSigner, CommandVerifier, MasterKey, VerifyError, signing_bytes,
};

use crate::fixtures::{KEY_HEX, OTHER_KEY_HEX, command, key, master};

fn verifier() -> CommandVerifier {
    CommandVerifier::new(master(), key(), None)
}

#[test]
fn a_sealed_command_verifies() {
    let mut signer = CommandSigner::new(key(), 10);
    let sealed = signer.seal(command(1));
    assert_eq!(sealed.counter, 10);
    assert_eq!(signer.next_counter(), 11);
    verifier().verify(&sealed).unwrap();
}

#[test]
fn a_key_prints_nothing_secret() {
    let printed = format!("{:?}", key());
    assert!(!printed.contains("0001020304"), "{printed}");
    assert!(!printed.to_lowercase().contains(&KEY_HEX[..8]));
    let signer = format!("{:?}", CommandSigner::new(key(), 1));
    assert!(!signer.contains("0001020304"), "{signer}");
}

#[test]
fn a_command_signed_with_another_key_is_refused() {
    let mut signer = CommandSigner::new(MasterKey::from_hex(OTHER_KEY_HEX).unwrap(), 1);
    let sealed = signer.seal(command(1));
    assert_eq!(verifier().verify(&sealed), Err(VerifyError::BadSignature));
}

#[test]
fn an_unsigned_command_is_refused() {
    assert_eq!(verifier().verify(&command(1)), Err(VerifyError::Unsigned));
}

#[test]
fn changing_any_signed_field_breaks_the_signature() {
    let sealed = CommandSigner::new(key(), 5).seal(command(1));
    let mut tampered = Vec::new();
    let mut t = sealed.clone();
    t.counter += 1;
    tampered.push(("counter", t));
    let mut t = sealed.clone();
    t.command_id = firmware_protocol::CommandId::backend(2).unwrap();
    tampered.push(("command_id", t));
    let mut t = sealed.clone();
    t.expires_at_ms += 1;
    tampered.push(("expires_at_ms", t));
    let mut t = sealed.clone();
    t.slave_mac.0[5] ^= 1;
    tampered.push(("slave_mac", t));
    let mut t = sealed.clone();
    t.actions[0].duration_s += 1;
    tampered.push(("duration_s", t));
    let mut t = sealed.clone();
    t.actions[0].action = firmware_protocol::frame::SwitchAction::Off;
    tampered.push(("action", t));
    let mut t = sealed.clone();
    t.actions[0].relay = 1;
    tampered.push(("relay", t));
    let mut t = sealed.clone();
    t.master_id = firmware_protocol::DeviceId::new("OTHER").unwrap();
    tampered.push(("master_id", t));
    for (field, command) in tampered {
        assert_eq!(
            verifier().verify(&command),
            Err(VerifyError::BadSignature),
            "changing {field} went unnoticed"
        );
    }
}

#[test]
fn every_byte_of_the_signed_string_matters() {
    // Flipping any byte of the canonical string changes the MAC, so the bytes are all covered.
    let sealed = CommandSigner::new(key(), 5).seal(command(1));
    let bytes = signing_bytes(&sealed);
    let good = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hex::decode(KEY_HEX).unwrap()),
        &bytes,
    );
    assert_eq!(hex::encode(good.as_ref()), sealed.sig.clone().unwrap());
    for i in 0..bytes.len() {
        let mut changed = bytes.clone();
        changed[i] ^= 0x01;
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &hex::decode(KEY_HEX).unwrap()),
            &changed,
        );
        assert_ne!(tag.as_ref(), good.as_ref());
    }
}

#[test]
fn a_replayed_command_is_refused_the_second_time() {
    let sealed = CommandSigner::new(key(), 5).seal(command(1));
    let mut verifier = verifier();
    verifier.verify(&sealed).unwrap();
    assert_eq!(
        verifier.verify(&sealed),
        Err(VerifyError::Replayed {
            counter: 5,
            last: 5
        })
    );
}

#[test]
fn an_older_counter_is_refused() {
    let mut verifier = CommandVerifier::new(master(), key(), Some(100));
    let sealed = CommandSigner::new(key(), 99).seal(command(1));
    assert_eq!(
        verifier.verify(&sealed),
        Err(VerifyError::Replayed {
            counter: 99,
            last: 100
        })
    );
    assert_eq!(verifier.last_counter(), Some(100));
}

#[test]
fn a_forged_command_does_not_advance_the_counter() {
    let mut verifier = verifier();
    let mut forged =
        CommandSigner::new(MasterKey::from_hex(OTHER_KEY_HEX).unwrap(), 1_000).seal(command(1));
    forged.counter = 1_000;
    assert!(verifier.verify(&forged).is_err());
    assert_eq!(verifier.last_counter(), None);
}

#[test]
fn a_command_for_another_master_is_refused_even_with_the_right_key() {
    let mut cmd = command(1);
    cmd.master_id = firmware_protocol::DeviceId::new("ESP32_OTHER").unwrap();
    let sealed = CommandSigner::new(key(), 1).seal(cmd);
    assert!(matches!(
        verifier().verify(&sealed),
        Err(VerifyError::WrongMaster { .. })
    ));
}

#[test]
fn keys_of_the_wrong_length_or_not_hex_are_refused_without_echoing_them() {
    assert!(MasterKey::from_hex("0011").is_err());
    let err = MasterKey::from_hex("zz0102030405060708090a0b0c0d0e0f").unwrap_err();
    assert!(!err.to_string().contains("0102030405"));
}
