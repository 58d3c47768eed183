//! The ESP-NOW radio between a master and its slaves, modelled as in-process channels that can
//! lose and delay frames. Frames cross it as bytes, so both ends go through the real codec.

use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;

use crate::mac::MacAddr;

/// Frames a receiver's queue holds; a full queue drops frames, as a busy radio would.
pub const RADIO_QUEUE_FRAMES_MAX: usize = 64;

/// What the radio does to frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RadioSpec {
    /// Percentage (0..=100) of frames lost.
    pub loss_percent: u8,
    /// Delay every frame by this much.
    pub delay_ms: u64,
}

/// Bytes on air, with the sender's address as ESP-NOW's receive callback provides it.
pub type Airframe = (MacAddr, Vec<u8>);

#[derive(Debug, Clone)]
pub struct Radio {
    spec: RadioSpec,
}

impl Radio {
    pub fn new(spec: RadioSpec) -> Radio {
        Radio { spec }
    }

    pub fn channel() -> (mpsc::Sender<Airframe>, mpsc::Receiver<Airframe>) {
        mpsc::channel(RADIO_QUEUE_FRAMES_MAX)
    }

    /// Sends unless the frame is lost; never waits for the receiver.
    pub fn transmit(&self, to: &mpsc::Sender<Airframe>, from: MacAddr, bytes: &[u8]) {
        if self.spec.loss_percent > 0
            && rand::thread_rng().gen_range(0..100u8) < self.spec.loss_percent
        {
            tracing::debug!(%from, "radio lost a frame");
            return;
        }
        let item = (from, bytes.to_vec());
        if self.spec.delay_ms == 0 {
            let _ = to.try_send(item);
        } else {
            let to = to.clone();
            let delay = Duration::from_millis(self.spec.delay_ms);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = to.try_send(item);
            });
        }
    }
}
