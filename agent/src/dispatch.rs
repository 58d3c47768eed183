//! The delivery task: drives the `delivery` state machine, signs and publishes what it asks
//! for, and ends commands in the store.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::QoS;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::automation::task::AutomationInput;
use crate::bridge::{self};
use crate::delivery::{Delivery, DeliveryAction, DeliveryLimits};
use crate::metrics::label;
use crate::shared::{DeliveryInput, Shared, now_ms};
use crate::store::CommandOutcome;

pub(crate) async fn delivery_loop(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<DeliveryInput>,
    cancel: CancellationToken,
) {
    let mut delivery = Delivery::new(DeliveryLimits {
        ack_timeout_ms: shared.config.mqtt.ack_timeout_ms as i64,
        attempts_max: shared.config.mqtt.command_attempts_max,
        send_margin_ms: shared.config.mqtt.send_margin_ms as i64,
        in_flight_per_master: shared.config.mqtt.in_flight_per_master as usize,
    });
    loop {
        let wait = delivery
            .next_deadline_ms()
            .map(|d| Duration::from_millis((d - now_ms()).clamp(1, 1_000) as u64))
            .unwrap_or(Duration::from_secs(1));
        let actions = tokio::select! {
            _ = cancel.cancelled() => return,
            input = rx.recv() => match input {
                Some(DeliveryInput::Admit(command)) => delivery.admit(*command, now_ms()),
                Some(DeliveryInput::Ack(ack)) => delivery.on_ack(&ack, now_ms()),
                Some(DeliveryInput::Track(command, sent_at)) => {
                    delivery.track(*command, sent_at);
                    vec![]
                }
                Some(DeliveryInput::CancelSwitchingOn(reason)) => delivery.cancel_switching_on(&reason),
                None => return,
            },
            _ = tokio::time::sleep(wait) => {
                if shared.mqtt_connected.load(std::sync::atomic::Ordering::SeqCst) {
                    delivery.on_tick(now_ms())
                } else {
                    delivery.on_tick_disconnected(now_ms())
                }
            }
        };
        for action in actions {
            perform(&shared, action).await;
        }
    }
}

pub(crate) async fn perform(shared: &Arc<Shared>, action: DeliveryAction) {
    match action {
        DeliveryAction::Send { command, attempt } => {
            let Some(key) = shared.keys.get(&command.master_device_id).cloned() else {
                finish(
                    shared,
                    command.id,
                    CommandOutcome::Failed {
                        reason: format!(
                            "no signing key configured for master {}",
                            command.master_device_id
                        ),
                        execution_time_ms: None,
                    },
                )
                .await;
                return;
            };
            let id = command.id;
            let master = command.master_device_id.clone();
            let _in_counter_order = shared.command_order.lock().await;
            // The counter and the attempt are on disk before the command leaves.
            let counter = shared
                .store
                .call_urgent(move |s| {
                    let now = now_ms();
                    let counter = s.next_signing_counter(&master, now)?;
                    s.mark_sent(id, Some(counter), None, now)?;
                    Ok(counter)
                })
                .await;
            let counter = match counter {
                Ok(c) => c,
                Err(e) => {
                    error!(error = %e, command = id, "could not record the delivery; not sending");
                    return;
                }
            };
            match bridge::signed_command(&command, &key, counter) {
                Ok((topic, bytes)) => {
                    debug!(command = id, attempt, counter, "sending command");
                    if let Err(e) = shared
                        .mqtt
                        .publish(topic, QoS::AtLeastOnce, false, bytes)
                        .await
                    {
                        warn!(command = id, error = %e, "publish failed; the ack timeout will resend");
                    } else {
                        shared
                            .metrics
                            .mqtt_messages_out
                            .get_or_create(&label("kind", "command"))
                            .inc();
                    }
                }
                Err(reason) => {
                    finish(
                        shared,
                        id,
                        CommandOutcome::Failed {
                            reason: format!("cannot encode the command: {reason}"),
                            execution_time_ms: None,
                        },
                    )
                    .await
                }
            }
        }
        DeliveryAction::Finish { id, outcome } => finish(shared, id, outcome).await,
    }
}

pub(crate) async fn finish(shared: &Arc<Shared>, id: i64, outcome: CommandOutcome) {
    let label_value = match &outcome {
        CommandOutcome::Completed { .. } => "completed",
        CommandOutcome::Failed { .. } => "failed",
        CommandOutcome::Expired => "expired",
    };
    let failure_reason = match &outcome {
        CommandOutcome::Failed { reason, .. } => Some(reason.clone()),
        CommandOutcome::Expired => Some("expired".to_string()),
        CommandOutcome::Completed { .. } => None,
    };
    if let CommandOutcome::Failed { reason, .. } = &outcome {
        warn!(command = id, reason, "command failed");
    } else {
        info!(command = id, outcome = label_value, "command ended");
    }
    match shared
        .store
        .call(move |s| s.finish_command(id, &outcome, now_ms()))
        .await
    {
        Ok(true) => {
            if id < 0 {
                let _ = shared.automation.try_send(AutomationInput::CommandEnded {
                    id,
                    failure: failure_reason,
                });
            }
            shared
                .metrics
                .commands_finished
                .get_or_create(&label("outcome", label_value))
                .inc();
            shared.notify_outbox();
        }
        Ok(false) => {}
        Err(e) => error!(error = %e, command = id, "could not record the command's end"),
    }
}
