//! The systemd service protocol (`Type=notify`): READY, the watchdog and STOPPING, through `sd-notify`.
//!
//! Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op, so `run` behaves the same in a
//! terminal, in tests and under the unit in `packaging/`.

use std::time::Duration;

/// Sends one state line; a failure is logged, never fatal: the agent controls relays whether or
/// not a service manager listens.
fn send(state: sd_notify::NotifyState<'_>) {
    // `notify`, not `notify_and_unset_env`: the watchdog sends again and again from the same
    // environment.
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::debug!(error = %e, "could not notify the service manager");
    }
}

/// READY=1: the agent's tasks run and its local API listens.
pub fn ready() {
    send(sd_notify::NotifyState::Ready);
}

/// EXTEND_TIMEOUT_USEC: a long one-time step before READY (the history's first prune and
/// VACUUM after an upgrade) needs `by` more, so systemd does not kill the start and begin it
/// again for ever.
pub fn extend_start(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    send(sd_notify::NotifyState::ExtendTimeoutUsec(usec));
}

/// STOPPING=1: the shutdown has begun (so a slow stop is not mistaken for a hang).
pub fn stopping() {
    send(sd_notify::NotifyState::Stopping);
}

/// WATCHDOG=1: the agent is alive.
pub fn watchdog() {
    send(sd_notify::NotifyState::Watchdog);
}

/// How often to feed the watchdog: half the interval systemd gives in `WATCHDOG_USEC` (for
/// this process, per `WATCHDOG_PID`), so one late tick does not get the agent killed; `None`
/// when no watchdog is armed.
pub fn watchdog_period() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|interval| interval / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifying_without_a_service_manager_does_nothing_and_does_not_fail() {
        // NOTIFY_SOCKET is not set under `cargo test` (nor is WATCHDOG_USEC).
        if std::env::var_os("NOTIFY_SOCKET").is_some() {
            eprintln!("skipped: NOTIFY_SOCKET is set in this test's environment");
            return;
        }
        ready();
        watchdog();
        stopping();
    }
}
