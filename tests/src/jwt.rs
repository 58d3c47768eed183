//! HS256 tokens as Supabase issues them, for the callers contract 1 knows: a dashboard user, an
//! edge agent, an ESP32 master, service_role and anon.

use serde::Serialize;
use uuid::Uuid;

/// The claims PostgREST and our policies read. `sub` is always the owner's user id.
#[derive(Debug, Clone, Serialize)]
pub struct Claims {
    pub role: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sub: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    pub exp: u64,
}

impl Claims {
    fn new(role: &str) -> Claims {
        Claims {
            role: role.to_string(),
            sub: None,
            agent_id: None,
            device_id: None,
            exp: now_secs() + 3600,
        }
    }

    /// A person using the dashboard.
    pub fn user(owner: Uuid) -> Claims {
        Claims {
            sub: Some(owner),
            ..Claims::new("authenticated")
        }
    }

    /// The edge agent `agent_id`, belonging to `owner`.
    pub fn agent(owner: Uuid, agent_id: &str) -> Claims {
        Claims {
            agent_id: Some(agent_id.to_string()),
            ..Claims::user(owner)
        }
    }

    /// An ESP32 master polling the backend directly.
    pub fn master(owner: Uuid, device_id: &str) -> Claims {
        Claims {
            device_id: Some(device_id.to_string()),
            ..Claims::user(owner)
        }
    }

    pub fn service_role() -> Claims {
        Claims::new("service_role")
    }

    pub fn anon() -> Claims {
        Claims::new("anon")
    }

    pub fn expiring_at(mut self, exp: u64) -> Claims {
        self.exp = exp;
        self
    }

    /// Signs the claims with HS256 under `secret`.
    pub fn sign(&self, secret: &str) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            self,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("HS256 signing of plain claims cannot fail")
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
