//! The ESP-NOW radio between a master and its slaves, modelled as in-process channels that can
//! lose and delay frames. Frames cross it as bytes, so both ends go through the real codec.
//!
//! Like ESP-NOW between two peers, the radio may lose frames but never reorders them: a delay
//! holds every frame to one receiver on one first-in, first-out "air" queue. The master relies
//! on that: it takes a slave's relay states from the newest frame it heard from the slave, so a
//! frame overtaken by a later one would roll its view back to older states.

use std::time::Duration;

use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::mac::MacAddr;

/// Frames a receiver's queue holds, and frames on the air towards one receiver; a full queue
/// drops frames, as a busy radio would.
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

/// The way onto one receiver's queue through the radio; clones share the same air, so frames
/// from every sender to that receiver arrive in the order they were sent.
#[derive(Debug, Clone)]
pub struct Link {
    spec: RadioSpec,
    to: LinkTx,
}

#[derive(Debug, Clone)]
enum LinkTx {
    Direct(mpsc::Sender<Airframe>),
    /// Frames with the moment they land, drained in order by one task.
    Delayed(mpsc::Sender<(Instant, Airframe)>),
}

impl Radio {
    pub fn new(spec: RadioSpec) -> Radio {
        Radio { spec }
    }

    /// A receiver's queue and the link that reaches it. With a delay this spawns the task that
    /// carries frames across the air, so it must run inside a tokio runtime; that task ends when
    /// every clone of the link or the receiver is gone.
    pub fn channel(&self) -> (Link, mpsc::Receiver<Airframe>) {
        let (tx, rx) = mpsc::channel(RADIO_QUEUE_FRAMES_MAX);
        if self.spec.delay_ms == 0 {
            let link = Link {
                spec: self.spec,
                to: LinkTx::Direct(tx),
            };
            return (link, rx);
        }
        let (air_tx, mut air_rx) = mpsc::channel::<(Instant, Airframe)>(RADIO_QUEUE_FRAMES_MAX);
        tokio::spawn(async move {
            // One frame at a time, in the order sent: a frame never overtakes an earlier one.
            while let Some((lands_at, item)) = air_rx.recv().await {
                tokio::time::sleep_until(lands_at).await;
                if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(item) {
                    break;
                }
            }
        });
        let link = Link {
            spec: self.spec,
            to: LinkTx::Delayed(air_tx),
        };
        (link, rx)
    }
}

impl Link {
    /// Sends unless the frame is lost; never waits for the receiver.
    pub fn transmit(&self, from: MacAddr, bytes: &[u8]) {
        if self.spec.loss_percent > 0
            && rand::thread_rng().gen_range(0..100u8) < self.spec.loss_percent
        {
            tracing::debug!(%from, "radio lost a frame");
            return;
        }
        let item = (from, bytes.to_vec());
        match &self.to {
            LinkTx::Direct(tx) => {
                let _ = tx.try_send(item);
            }
            LinkTx::Delayed(air) => {
                let lands_at = Instant::now() + Duration::from_millis(self.spec.delay_ms);
                let _ = air.try_send((lands_at, item));
            }
        }
    }
}
