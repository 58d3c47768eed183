//! Builders for commands, keys and frames the tests share.

use firmware_protocol::frame::SwitchAction;
use firmware_protocol::message::{RelayAction, RelayCommand};
use firmware_protocol::{CommandId, DeviceId, MacAddr, MasterKey};

pub const KEY_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";
pub const OTHER_KEY_HEX: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

pub fn key() -> MasterKey {
    MasterKey::from_hex(KEY_HEX).unwrap()
}

pub fn master() -> DeviceId {
    DeviceId::new("ESP32_HIDRO_F44738").unwrap()
}

pub fn slave_mac() -> MacAddr {
    "14:33:5C:38:BF:60".parse().unwrap()
}

pub fn relay_on(relay: u8, duration_s: u32) -> RelayAction {
    RelayAction {
        relay,
        action: SwitchAction::On,
        duration_s,
    }
}

pub fn command(id: i64) -> RelayCommand {
    RelayCommand::unsigned(
        CommandId::backend(id).unwrap(),
        master(),
        slave_mac(),
        vec![relay_on(0, 60)],
        1_900_000_000_000,
    )
}
