//! The fault schedule: from a seed and a profile, the faults of one run with the moment each
//! begins and how long it lasts. Pure: the same seed and profile give the same schedule, so a
//! run that found something can be replayed.

use std::fmt;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How long and how dense a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// About 75 s of faults under load: the CI run.
    Short,
    /// About 10 minutes of faults under load.
    Long,
}

impl Profile {
    /// The time under faults (load runs through it; the drain follows).
    pub fn faulty_for(self) -> Duration {
        match self {
            Profile::Short => Duration::from_secs(75),
            Profile::Long => Duration::from_secs(600),
        }
    }

    /// Faults in a run.
    pub fn faults(self) -> usize {
        match self {
            Profile::Short => 10,
            Profile::Long => 60,
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Profile, String> {
        match s {
            "short" => Ok(Profile::Short),
            "long" => Ok(Profile::Long),
            other => Err(format!("profile {other:?}: expected short or long")),
        }
    }
}

/// One fault. Durations are how long the faulty state lasts before it heals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `kill -9` of the agent; started again on the same database after `down`.
    KillAgent { down: Duration },
    /// `kill -9` of the agent and every database write after its last fsync lost (a power
    /// cut); started again after `down`.
    PowerCut { down: Duration },
    /// `kill -9` of simulated master `master` (with its slaves), started again with its state
    /// kept after `down`.
    KillMaster { master: usize, down: Duration },
    /// PostgREST stopped with SIGSTOP for `frozen`; then resumed (SIGCONT) or, if `restart`,
    /// killed and started again.
    FreezePostgrest { frozen: Duration, restart: bool },
    /// Postgres stopped and started again after `down`.
    RestartPostgres { down: Duration },
    /// Mosquitto stopped and started again after `down` (its persistence kept).
    RestartMosquitto { down: Duration },
    /// Master `master`'s radio delays every frame by `delay_ms` and loses `loss_percent` of
    /// them for `lasting`.
    Radio {
        master: usize,
        delay_ms: u64,
        loss_percent: u8,
        lasting: Duration,
    },
}

impl Fault {
    /// How long the fault lasts.
    pub fn lasting(&self) -> Duration {
        match *self {
            Fault::KillAgent { down }
            | Fault::PowerCut { down }
            | Fault::KillMaster { down, .. }
            | Fault::RestartPostgres { down }
            | Fault::RestartMosquitto { down } => down,
            Fault::FreezePostgrest { frozen, .. } => frozen,
            Fault::Radio { lasting, .. } => lasting,
        }
    }

    /// What the fault touches; two faults on the same target never overlap.
    pub fn target(&self) -> Target {
        match *self {
            Fault::KillAgent { .. } | Fault::PowerCut { .. } => Target::Agent,
            Fault::KillMaster { master, .. } => Target::Master(master),
            Fault::Radio { master, .. } => Target::Radio(master),
            Fault::FreezePostgrest { .. } | Fault::RestartPostgres { .. } => Target::Backend,
            Fault::RestartMosquitto { .. } => Target::Broker,
        }
    }
}

/// The component a fault acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Agent,
    Master(usize),
    Radio(usize),
    Backend,
    Broker,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fault::KillAgent { down } => write!(f, "kill -9 agent, down {} ms", down.as_millis()),
            Fault::PowerCut { down } => write!(
                f,
                "power cut of the agent (unsynced writes lost), down {} ms",
                down.as_millis()
            ),
            Fault::KillMaster { master, down } => {
                write!(f, "kill -9 master {master}, down {} ms", down.as_millis())
            }
            Fault::FreezePostgrest { frozen, restart } => write!(
                f,
                "SIGSTOP PostgREST for {} ms, then {}",
                frozen.as_millis(),
                if restart { "restart it" } else { "SIGCONT" }
            ),
            Fault::RestartPostgres { down } => {
                write!(f, "restart Postgres, down {} ms", down.as_millis())
            }
            Fault::RestartMosquitto { down } => {
                write!(f, "restart Mosquitto, down {} ms", down.as_millis())
            }
            Fault::Radio {
                master,
                delay_ms,
                loss_percent,
                lasting,
            } => write!(
                f,
                "radio of master {master}: delay {delay_ms} ms, loss {loss_percent}% for {} ms",
                lasting.as_millis()
            ),
        }
    }
}

/// A fault and when it begins, from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub at: Duration,
    pub fault: Fault,
}

impl Scheduled {
    pub fn heals_at(&self) -> Duration {
        self.at + self.fault.lasting()
    }
}

/// The faults of one run, ordered by start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    pub seed: u64,
    pub profile: Profile,
    pub masters: usize,
    pub faults: Vec<Scheduled>,
}

impl Schedule {
    /// The schedule of `seed` for `masters` simulated masters. Faults start at random moments
    /// of the faulty time; one that would overlap an earlier fault on the same target, or
    /// heal after the faulty time, is drawn again (at most a few times, then left out).
    pub fn from_seed(seed: u64, profile: Profile, masters: usize) -> Schedule {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let span = profile.faulty_for().as_millis() as u64;
        let masters = masters.max(1);
        let mut faults: Vec<Scheduled> = Vec::new();
        for _ in 0..profile.faults() {
            for _attempt in 0..8 {
                let fault = draw(&mut rng, masters);
                let at = Duration::from_millis(rng.gen_range(2_000..span));
                let candidate = Scheduled { at, fault };
                let fits = candidate.heals_at() <= profile.faulty_for()
                    && faults.iter().all(|other| !conflicts(other, &candidate));
                if fits {
                    faults.push(candidate);
                    break;
                }
            }
        }
        faults.sort_by_key(|s| s.at);
        Schedule {
            seed,
            profile,
            masters,
            faults,
        }
    }

    /// When the last fault heals (zero without faults).
    pub fn last_heal(&self) -> Duration {
        self.faults
            .iter()
            .map(Scheduled::heals_at)
            .max()
            .unwrap_or_default()
    }
}

/// Two faults on one target must not overlap (a restart of a process already stopped is not a
/// fault); faults on different targets may.
fn conflicts(a: &Scheduled, b: &Scheduled) -> bool {
    // A second of calm after each fault, so each heal is seen.
    let calm = Duration::from_secs(1);
    let overlap = a.at < b.heals_at() + calm && b.at < a.heals_at() + calm;
    overlap && a.fault.target() == b.fault.target()
}

fn ms(rng: &mut ChaCha8Rng, from: u64, to: u64) -> Duration {
    Duration::from_millis(rng.gen_range(from..=to))
}

fn draw(rng: &mut ChaCha8Rng, masters: usize) -> Fault {
    let master = rng.gen_range(0..masters);
    match rng.gen_range(0..100u32) {
        0..18 => Fault::KillAgent {
            down: ms(rng, 200, 4_000),
        },
        18..32 => Fault::PowerCut {
            down: ms(rng, 200, 4_000),
        },
        32..46 => Fault::KillMaster {
            master,
            down: ms(rng, 300, 5_000),
        },
        46..60 => Fault::FreezePostgrest {
            frozen: ms(rng, 1_000, 8_000),
            restart: rng.gen_bool(0.5),
        },
        60..70 => Fault::RestartPostgres {
            down: ms(rng, 500, 5_000),
        },
        70..82 => Fault::RestartMosquitto {
            down: ms(rng, 300, 4_000),
        },
        _ => Fault::Radio {
            master,
            delay_ms: rng.gen_range(20..=120),
            loss_percent: rng.gen_range(0..=30),
            lasting: ms(rng, 2_000, 12_000),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_schedule_and_another_seed_another() {
        let a = Schedule::from_seed(42, Profile::Short, 2);
        let b = Schedule::from_seed(42, Profile::Short, 2);
        let c = Schedule::from_seed(43, Profile::Short, 2);
        assert_eq!(a, b);
        assert_ne!(a.faults, c.faults);
        assert!(!a.faults.is_empty());
    }

    #[test]
    fn faults_heal_within_the_faulty_time_and_never_overlap_on_one_target() {
        for seed in 0..200 {
            for profile in [Profile::Short, Profile::Long] {
                let s = Schedule::from_seed(seed, profile, 2);
                assert!(s.last_heal() <= profile.faulty_for(), "seed {seed}");
                assert!(s.faults.windows(2).all(|w| w[0].at <= w[1].at));
                for (i, a) in s.faults.iter().enumerate() {
                    for b in &s.faults[i + 1..] {
                        assert!(!conflicts(a, b), "seed {seed}: {a:?} and {b:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn over_many_seeds_every_kind_of_fault_is_drawn() {
        let mut seen = [false; 7];
        for seed in 0..50 {
            for f in Schedule::from_seed(seed, Profile::Short, 2).faults {
                let kind = match f.fault {
                    Fault::KillAgent { .. } => 0,
                    Fault::PowerCut { .. } => 1,
                    Fault::KillMaster { .. } => 2,
                    Fault::FreezePostgrest { .. } => 3,
                    Fault::RestartPostgres { .. } => 4,
                    Fault::RestartMosquitto { .. } => 5,
                    Fault::Radio { .. } => 6,
                };
                seen[kind] = true;
            }
        }
        assert_eq!(seen, [true; 7]);
    }
}
