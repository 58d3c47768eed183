//! The console's sign-in sessions: a bounded set, each ended by idle time, each with its own
//! CSRF token. Sans-I/O: the caller brings the clock and the random bytes.

use std::collections::HashMap;

use subtle::ConstantTimeEq as _;

/// Sessions kept at once; signing in beyond this ends the least recently used one.
pub const SESSIONS_MAX: usize = 16;
/// A session unused for this long is over.
pub const SESSION_IDLE_MS: i64 = 30 * 60 * 1000;
/// The cookie that carries the session id.
pub const COOKIE_NAME: &str = "autocore_console";

/// Lookups are by a digest of the id, so that the map's comparisons do not leak the id.
type IdDigest = [u8; 32];

fn digest(id: &str) -> IdDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, id.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug, Clone)]
struct Session {
    csrf: String,
    last_used_ms: i64,
}

/// A signed-in session as a request finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Active {
    pub csrf: String,
}

#[derive(Debug, Default)]
pub struct Sessions {
    by_id: HashMap<IdDigest, Session>,
}

impl Sessions {
    /// A new session with `id` and `csrf` (both fresh random values of the caller's); the
    /// oldest goes when [`SESSIONS_MAX`] are open.
    pub fn open(&mut self, id: &str, csrf: &str, now_ms: i64) {
        self.expire(now_ms);
        if self.by_id.len() >= SESSIONS_MAX
            && let Some(oldest) = self
                .by_id
                .iter()
                .min_by_key(|(_, s)| s.last_used_ms)
                .map(|(k, _)| *k)
        {
            self.by_id.remove(&oldest);
        }
        self.by_id.insert(
            digest(id),
            Session {
                csrf: csrf.to_string(),
                last_used_ms: now_ms,
            },
        );
    }

    /// The session of `id` if it is open and not idle too long; using it keeps it alive.
    pub fn touch(&mut self, id: &str, now_ms: i64) -> Option<Active> {
        self.expire(now_ms);
        let session = self.by_id.get_mut(&digest(id))?;
        session.last_used_ms = now_ms;
        Some(Active {
            csrf: session.csrf.clone(),
        })
    }

    pub fn close(&mut self, id: &str) -> bool {
        self.by_id.remove(&digest(id)).is_some()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn expire(&mut self, now_ms: i64) {
        self.by_id
            .retain(|_, s| now_ms.saturating_sub(s.last_used_ms) < SESSION_IDLE_MS);
    }
}

/// Whether `given` is the session's CSRF token, in constant time.
pub fn csrf_matches(active: &Active, given: &str) -> bool {
    !given.is_empty() && bool::from(active.csrf.as_bytes().ct_eq(given.as_bytes()))
}

/// The session id in a `Cookie` header value, if any.
pub fn session_cookie(cookie_header: &str) -> Option<&str> {
    cookie_header
        .split(';')
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value of a new session: never readable by scripts, never sent cross-site.
pub fn set_cookie(id: &str) -> String {
    format!("{COOKIE_NAME}={id}; HttpOnly; SameSite=Strict; Path=/")
}

/// The `Set-Cookie` value that ends the session in the browser.
pub fn clear_cookie() -> String {
    format!("{COOKIE_NAME}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_while_used_and_ends_after_its_idle_time() {
        let mut s = Sessions::default();
        s.open("id-1", "csrf-1", 0);
        assert_eq!(
            s.touch("id-1", SESSION_IDLE_MS - 1).map(|a| a.csrf),
            Some("csrf-1".into())
        );
        // Used at SESSION_IDLE_MS - 1: alive until twice that.
        assert!(s.touch("id-1", 2 * SESSION_IDLE_MS - 2).is_some());
        assert!(s.touch("id-1", 3 * SESSION_IDLE_MS).is_none());
        assert!(s.is_empty());
    }

    #[test]
    fn an_unknown_or_closed_session_is_no_session() {
        let mut s = Sessions::default();
        s.open("id-1", "csrf-1", 0);
        assert!(s.touch("id-2", 1).is_none());
        assert!(s.close("id-1"));
        assert!(s.touch("id-1", 2).is_none());
    }

    #[test]
    fn sessions_are_bounded_and_the_least_recently_used_goes_first() {
        let mut s = Sessions::default();
        for i in 0..SESSIONS_MAX {
            s.open(&format!("id-{i}"), "c", i as i64);
        }
        s.touch("id-0", 100);
        s.open("new", "c", 101);
        assert_eq!(s.len(), SESSIONS_MAX);
        assert!(s.touch("id-0", 102).is_some(), "recently used: kept");
        assert!(s.touch("id-1", 102).is_none(), "least recently used: gone");
        assert!(s.touch("new", 102).is_some());
    }

    #[test]
    fn csrf_must_match_exactly() {
        let a = Active {
            csrf: "abc123".into(),
        };
        assert!(csrf_matches(&a, "abc123"));
        assert!(!csrf_matches(&a, "abc124"));
        assert!(!csrf_matches(&a, "abc12"));
        assert!(!csrf_matches(&a, ""));
    }

    #[test]
    fn the_cookie_is_found_among_others_and_is_http_only_and_strict() {
        assert_eq!(
            session_cookie("a=1; autocore_console=xyz; b=2"),
            Some("xyz")
        );
        assert_eq!(session_cookie("autocore_console="), None);
        assert_eq!(session_cookie("other=1"), None);
        let c = set_cookie("xyz");
        assert!(c.contains("HttpOnly") && c.contains("SameSite=Strict") && c.contains("Path=/"));
    }
}
