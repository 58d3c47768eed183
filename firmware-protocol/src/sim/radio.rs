//! The ESP-NOW radio between a master and its slaves, modelled as in-process channels that can
//! lose and delay frames. Frames cross it as bytes, so both ends go through the real codec.
//!
//! Like ESP-NOW between two peers, the radio may lose frames but never reorders them: a delay
//! holds every frame to one receiver on one first-in, first-out "air" queue. The master relies
//! on that: it takes a slave's relay states from the newest frame it heard from the slave, so a
//! frame overtaken by a later one would roll its view back to older states.
//!
//! A delayed frame waits in its sender's transmit queue until it lands, and can be withdrawn
//! until then ([`Link::withdraw`]), as a master withdraws what it queued when it latches a stop.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, mpsc};
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

/// Radio conditions that a test changes while the simulator runs (delay and loss faults); every
/// link made from a [`Radio::controlled`] reads them at each frame it sends.
#[derive(Debug, Clone, Default)]
pub struct RadioControl(Arc<Mutex<RadioSpec>>);

impl RadioControl {
    pub fn new(spec: RadioSpec) -> RadioControl {
        RadioControl(Arc::new(Mutex::new(spec)))
    }

    pub fn set(&self, spec: RadioSpec) {
        if let Ok(mut now) = self.0.lock() {
            *now = spec;
        }
    }

    pub fn get(&self) -> RadioSpec {
        self.0.lock().map(|s| *s).unwrap_or_default()
    }
}

#[derive(Debug, Clone)]
enum Weather {
    Fixed(RadioSpec),
    Controlled(RadioControl),
}

impl Weather {
    fn now(&self) -> RadioSpec {
        match self {
            Weather::Fixed(spec) => *spec,
            Weather::Controlled(control) => control.get(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Radio {
    spec: Weather,
}

/// The way onto one receiver's queue through the radio; clones share the same air, so frames
/// from every sender to that receiver arrive in the order they were sent.
#[derive(Debug, Clone)]
pub struct Link {
    spec: Weather,
    to: LinkTx,
}

#[derive(Debug, Clone)]
enum LinkTx {
    Direct(mpsc::Sender<Airframe>),
    /// Frames waiting to land, in order, carried by one task; `_alive` closes when the last
    /// clone of the link goes, which ends that task.
    Delayed {
        air: Arc<Air>,
        _alive: mpsc::Sender<()>,
    },
}

/// A sender's transmit queue: frames with the moment they land. Until then a frame has not
/// left the sender, so it can be withdrawn (a master that latches its emergency stop does).
#[derive(Debug, Default)]
struct Air {
    queue: Mutex<VecDeque<(Instant, Airframe)>>,
    queued: Notify,
}

impl Air {
    fn front_lands_at(&self) -> Option<Instant> {
        self.queue
            .lock()
            .ok()
            .and_then(|q| q.front().map(|(t, _)| *t))
    }

    /// The first frame, if it has landed by `now`.
    fn pop_landed(&self, now: Instant) -> Option<Airframe> {
        let mut queue = self.queue.lock().ok()?;
        if queue.front().is_some_and(|(t, _)| *t <= now) {
            queue.pop_front().map(|(_, item)| item)
        } else {
            None
        }
    }
}

impl Radio {
    pub fn new(spec: RadioSpec) -> Radio {
        Radio {
            spec: Weather::Fixed(spec),
        }
    }

    /// A radio whose delay and loss follow `control` while it runs.
    pub fn controlled(control: RadioControl) -> Radio {
        Radio {
            spec: Weather::Controlled(control),
        }
    }

    /// A receiver's queue and the link that reaches it. With a delay this spawns the task that
    /// carries frames across the air, so it must run inside a tokio runtime; that task ends when
    /// every clone of the link or the receiver is gone.
    pub fn channel(&self) -> (Link, mpsc::Receiver<Airframe>) {
        let (tx, rx) = mpsc::channel(RADIO_QUEUE_FRAMES_MAX);
        if let Weather::Fixed(RadioSpec { delay_ms: 0, .. }) = self.spec {
            let link = Link {
                spec: self.spec.clone(),
                to: LinkTx::Direct(tx),
            };
            return (link, rx);
        }
        let air = Arc::new(Air::default());
        let (alive, mut gone) = mpsc::channel::<()>(1);
        let carried = air.clone();
        tokio::spawn(async move {
            // One frame at a time, in the order sent: a frame never overtakes an earlier one.
            loop {
                match carried.front_lands_at() {
                    Some(lands_at) => tokio::select! {
                        () = tokio::time::sleep_until(lands_at) => {}
                        // A withdrawal may have emptied the queue: look again.
                        () = carried.queued.notified() => continue,
                    },
                    None => tokio::select! {
                        () = carried.queued.notified() => continue,
                        _ = gone.recv() => break,
                    },
                }
                while let Some(item) = carried.pop_landed(Instant::now()) {
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(item) {
                        return;
                    }
                }
            }
        });
        let link = Link {
            spec: self.spec.clone(),
            to: LinkTx::Delayed { air, _alive: alive },
        };
        (link, rx)
    }
}

impl Link {
    /// Sends unless the frame is lost; never waits for the receiver.
    pub fn transmit(&self, from: MacAddr, bytes: &[u8]) {
        let spec = self.spec.now();
        if spec.loss_percent > 0 && rand::thread_rng().gen_range(0..100u8) < spec.loss_percent {
            tracing::debug!(%from, "radio lost a frame");
            return;
        }
        let item = (from, bytes.to_vec());
        match &self.to {
            LinkTx::Direct(tx) => {
                let _ = tx.try_send(item);
            }
            LinkTx::Delayed { air, .. } => {
                // A frame sent under a shorter delay than the one before it still lands after
                // it: the air queue is first in, first out.
                let lands_at = Instant::now() + Duration::from_millis(spec.delay_ms);
                if let Ok(mut queue) = air.queue.lock() {
                    if queue.len() < RADIO_QUEUE_FRAMES_MAX {
                        queue.push_back((lands_at, item));
                    }
                }
                air.queued.notify_one();
            }
        }
    }

    /// Takes back every frame still waiting to leave that `which` selects, and returns them; a
    /// withdrawn frame never reaches the receiver. Frames that have landed are out of reach.
    pub fn withdraw(&self, which: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let LinkTx::Delayed { air, .. } = &self.to else {
            return Vec::new();
        };
        let Ok(mut queue) = air.queue.lock() else {
            return Vec::new();
        };
        let mut withdrawn = Vec::new();
        queue.retain(|(_, (_, bytes))| {
            if which(bytes) {
                withdrawn.push(bytes.clone());
                false
            } else {
                true
            }
        });
        drop(queue);
        air.queued.notify_one();
        withdrawn
    }
}
