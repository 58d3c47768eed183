//! What the agent knows about its two connections, as state machines without I/O: the MQTT link
//! (connected, or why not) and the backend's answer to the agent's token. Each reports a change
//! of state once, so that the driver logs it once at WARN instead of at every retry, and a
//! refusal (a wrong password, a wrong CA, a token the backend does not take) shows in `/health`
//! as `degraded` instead of hiding at DEBUG behind "ok".

use serde::Serialize;

use crate::cloud::CloudError;

/// The MQTT link, as the last connection attempt left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MqttState {
    /// Not yet tried.
    #[default]
    Connecting,
    Connected,
    /// No broker answers at the address, or the connection dropped: an outage, retried.
    Unreachable,
    /// The broker refused the username or password (CONNACK 4).
    BadCredentials,
    /// The broker refused the agent (CONNACK 5): a wrong password (Mosquitto's answer to it),
    /// an unknown user, or not allowed to connect.
    NotAuthorized,
    /// The TLS handshake failed: a CA that does not sign the broker's certificate, a wrong host.
    #[serde(rename = "tls_error")]
    Tls,
    /// The broker refused for another reason (protocol version, client id, unavailable).
    Refused,
    /// The broker sent what the agent cannot read (a packet over the agent's bound, garbage).
    ProtocolError,
}

impl MqttState {
    pub const ALL: [MqttState; 8] = [
        MqttState::Connecting,
        MqttState::Connected,
        MqttState::Unreachable,
        MqttState::BadCredentials,
        MqttState::NotAuthorized,
        MqttState::Tls,
        MqttState::Refused,
        MqttState::ProtocolError,
    ];

    /// The state a failed connection or a lost one leaves.
    pub fn from_error(error: &rumqttc::ConnectionError) -> MqttState {
        use rumqttc::{ConnectReturnCode, ConnectionError, StateError};
        match error {
            ConnectionError::ConnectionRefused(ConnectReturnCode::BadUserNamePassword) => {
                MqttState::BadCredentials
            }
            ConnectionError::ConnectionRefused(ConnectReturnCode::NotAuthorized) => {
                MqttState::NotAuthorized
            }
            ConnectionError::ConnectionRefused(_) => MqttState::Refused,
            ConnectionError::Tls(_) => MqttState::Tls,
            ConnectionError::MqttState(StateError::Deserialization(_))
            | ConnectionError::NotConnAck(_) => MqttState::ProtocolError,
            _ => MqttState::Unreachable,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            MqttState::Connecting => "connecting",
            MqttState::Connected => "connected",
            MqttState::Unreachable => "unreachable",
            MqttState::BadCredentials => "bad_credentials",
            MqttState::NotAuthorized => "not_authorized",
            MqttState::Tls => "tls_error",
            MqttState::Refused => "refused",
            MqttState::ProtocolError => "protocol_error",
        }
    }

    /// Why this state makes the agent degraded; None when it is normal (connected, or an
    /// outage the agent rides out: offline is a normal state).
    pub fn degraded_reason(self) -> Option<&'static str> {
        match self {
            MqttState::Connecting | MqttState::Connected | MqttState::Unreachable => None,
            MqttState::BadCredentials => {
                Some("mqtt: the broker refused the agent's username or password")
            }
            // Mosquitto answers a wrong password with this code too.
            MqttState::NotAuthorized => Some(
                "mqtt: the broker does not authorise the agent (a wrong password or an unknown user)",
            ),
            MqttState::Tls => Some("mqtt: TLS failed (the CA, the certificate or the host)"),
            MqttState::Refused => Some("mqtt: the broker refused the connection"),
            MqttState::ProtocolError => Some("mqtt: the broker sent what the agent cannot read"),
        }
    }
}

/// The backend, as the last request left it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendState {
    /// No request has finished yet.
    #[default]
    Unknown,
    /// It answers and takes the agent's token.
    Reachable,
    /// No answer: an outage, ridden out with the outbox.
    Unreachable,
    /// It answers 401/403: the JWT is wrong, expired or revoked.
    Unauthorized,
    /// It answers with server errors (5xx, 408, 429).
    ServerError,
    /// The agent's token cannot be read (`cloud.jwt_file`).
    NoToken,
}

impl BackendState {
    pub const ALL: [BackendState; 6] = [
        BackendState::Unknown,
        BackendState::Reachable,
        BackendState::Unreachable,
        BackendState::Unauthorized,
        BackendState::ServerError,
        BackendState::NoToken,
    ];

    pub fn from_result(result: Result<(), &CloudError>) -> BackendState {
        match result {
            // A request refused for itself (another 4xx, a body it could not read) still
            // says the backend took the token.
            Ok(()) | Err(CloudError::Rejected { .. } | CloudError::Decode(_)) => {
                BackendState::Reachable
            }
            Err(CloudError::Unreachable(_) | CloudError::NoAnswer(_)) => BackendState::Unreachable,
            Err(CloudError::Unauthorized { .. }) => BackendState::Unauthorized,
            Err(CloudError::Server { .. }) => BackendState::ServerError,
            Err(CloudError::Token(_)) => BackendState::NoToken,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            BackendState::Unknown => "unknown",
            BackendState::Reachable => "reachable",
            BackendState::Unreachable => "unreachable",
            BackendState::Unauthorized => "unauthorized",
            BackendState::ServerError => "server_error",
            BackendState::NoToken => "no_token",
        }
    }

    pub fn degraded_reason(self) -> Option<&'static str> {
        match self {
            BackendState::Unauthorized => {
                Some("backend: refuses the agent's JWT (401/403): wrong, expired or revoked")
            }
            BackendState::NoToken => {
                Some("backend: the agent's token (cloud.jwt_file) cannot be read")
            }
            BackendState::ServerError => Some("backend: answers with server errors"),
            _ => None,
        }
    }
}

/// A state with the detail of its last cause (an error message), that says when it changes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Watched<S> {
    pub state: S,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl<S: Copy + PartialEq> Watched<S> {
    pub fn new(state: S) -> Watched<S> {
        Watched {
            state,
            detail: None,
        }
    }

    /// Records the latest state; returns the previous one when it changed. The detail is kept
    /// fresh but is no change by itself: an outage's error message varies at every retry.
    pub fn set(&mut self, state: S, detail: Option<String>) -> Option<S> {
        self.detail = detail;
        let previous = self.state;
        self.state = state;
        (previous != state).then_some(previous)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::{ConnectReturnCode, ConnectionError};

    #[test]
    fn a_broker_refusal_maps_to_its_reason_and_makes_the_agent_degraded() {
        let refused = |code| MqttState::from_error(&ConnectionError::ConnectionRefused(code));
        assert_eq!(
            refused(ConnectReturnCode::BadUserNamePassword),
            MqttState::BadCredentials
        );
        assert_eq!(
            refused(ConnectReturnCode::NotAuthorized),
            MqttState::NotAuthorized
        );
        assert_eq!(
            refused(ConnectReturnCode::ServiceUnavailable),
            MqttState::Refused
        );
        for state in [
            MqttState::BadCredentials,
            MqttState::NotAuthorized,
            MqttState::Tls,
        ] {
            assert!(state.degraded_reason().is_some(), "{state:?}");
        }
    }

    #[test]
    fn a_broker_that_does_not_answer_is_an_outage_not_a_degradation() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let state = MqttState::from_error(&ConnectionError::Io(io));
        assert_eq!(state, MqttState::Unreachable);
        assert_eq!(state.degraded_reason(), None);
        assert_eq!(
            MqttState::from_error(&ConnectionError::NetworkTimeout),
            MqttState::Unreachable
        );
    }

    #[test]
    fn a_tls_failure_is_a_tls_error() {
        let tls = rumqttc::TlsError::Io(std::io::Error::other("invalid peer certificate"));
        assert_eq!(
            MqttState::from_error(&ConnectionError::Tls(tls)),
            MqttState::Tls
        );
    }

    #[test]
    fn a_backend_that_refuses_the_token_is_unauthorised_and_degraded() {
        let refused = CloudError::Unauthorized {
            status: 401,
            body: "JWSError JWSInvalidSignature".into(),
        };
        let state = BackendState::from_result(Err(&refused));
        assert_eq!(state, BackendState::Unauthorized);
        assert!(state.degraded_reason().is_some());
        let away = CloudError::Unreachable("connection refused".into());
        assert_eq!(
            BackendState::from_result(Err(&away)).degraded_reason(),
            None,
            "offline is a normal state"
        );
        assert_eq!(BackendState::from_result(Ok(())), BackendState::Reachable);
    }

    #[test]
    fn health_and_metrics_name_each_state_alike() {
        for state in MqttState::ALL {
            assert_eq!(serde_json::json!(state), state.label());
        }
        for state in BackendState::ALL {
            assert_eq!(serde_json::json!(state), state.label());
        }
    }

    #[test]
    fn a_state_reports_a_change_once_however_often_it_is_set() {
        let mut link = Watched::new(MqttState::Connecting);
        assert_eq!(
            link.set(MqttState::BadCredentials, Some("refused".into())),
            Some(MqttState::Connecting)
        );
        for _ in 0..10 {
            assert_eq!(
                link.set(MqttState::BadCredentials, Some("again".into())),
                None
            );
        }
        assert_eq!(link.detail.as_deref(), Some("again"));
        assert_eq!(
            link.set(MqttState::Connected, None),
            Some(MqttState::BadCredentials)
        );
    }
}
