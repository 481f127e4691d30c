//! Sign-ins to the web UI: a browser that showed the API token gets a session cookie
//! (`forage_session`, HttpOnly, SameSite=Strict) and a CSRF token that every change it
//! makes must carry in `X-CSRF-Token` (see `docs/web-ui.md`).
//!
//! Sessions live in the daemon's memory only: a restart signs everyone out. The store
//! keeps the SHA-256 of each cookie, never the cookie, so looking one up reveals nothing
//! by its timing; CSRF tokens are compared in constant time. At most [`MAX_SESSIONS`] at
//! once (a new sign-in ends the oldest), each for [`LIFETIME`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// The cookie's name.
pub const COOKIE: &str = "forage_session";
/// The header a change made with the cookie carries its CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a sign-in lasts.
pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Sign-ins kept at once.
pub const MAX_SESSIONS: usize = 64;
/// Random bytes in a cookie and in a CSRF token (hex: twice as many characters).
const SECRET_BYTES: usize = 32;

/// One browser's sign-in, as its requests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    pub csrf: String,
    pub expires_unix_ms: i64,
    expires: Instant,
    /// Its place in the store (the SHA-256 of its cookie).
    key: [u8; 32],
}

/// What a request's cookie says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CookieCheck {
    /// No `forage_session` cookie.
    Absent,
    /// A live sign-in.
    Valid(WebSession),
    /// A cookie this daemon does not know (signed out, expired, another daemon's, made
    /// up) or one that is not even of the right shape.
    Unknown,
}

#[derive(Debug, Default)]
pub struct WebSessions {
    sessions: Mutex<HashMap<[u8; 32], WebSession>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no randomness for a session cookie")]
pub struct NoRandomness(#[source] std::io::Error);

impl WebSessions {
    /// A new sign-in: the cookie's value (to set) and the session.
    pub fn create(&self) -> Result<(String, WebSession), NoRandomness> {
        let cookie = random_hex()?;
        let key: [u8; 32] = Sha256::digest(cookie.as_bytes()).into();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
        let session = WebSession {
            csrf: random_hex()?,
            expires_unix_ms: now + LIFETIME.as_millis() as i64,
            expires: Instant::now() + LIFETIME,
            key,
        };
        let mut all = self.lock();
        all.retain(|_, s| s.expires > Instant::now());
        if all.len() >= MAX_SESSIONS {
            if let Some(oldest) = all.values().min_by_key(|s| s.expires).map(|s| s.key) {
                all.remove(&oldest);
            }
        }
        all.insert(key, session.clone());
        Ok((cookie, session))
    }

    /// The sign-in a request's `Cookie` headers name, if any.
    pub fn check<'a>(&self, cookie_headers: impl Iterator<Item = &'a str>) -> CookieCheck {
        let mut result = CookieCheck::Absent;
        for value in cookie_headers.flat_map(|h| h.split(';')).filter_map(|c| c.trim().strip_prefix("forage_session="))
        {
            if !valid_secret(value) {
                result = CookieCheck::Unknown;
                continue;
            }
            let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
            match self.lock().get(&key) {
                Some(s) if s.expires > Instant::now() => return CookieCheck::Valid(s.clone()),
                _ => result = CookieCheck::Unknown,
            }
        }
        result
    }

    /// Whether `session` is still signed in.
    pub fn live(&self, session: &WebSession) -> bool {
        self.lock().get(&session.key).is_some_and(|s| s.expires > Instant::now())
    }

    /// Sign out.
    pub fn remove(&self, session: &WebSession) {
        self.lock().remove(&session.key);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], WebSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl WebSession {
    /// Whether `given` is this session's CSRF token (constant time).
    pub fn csrf_matches(&self, given: &str) -> bool {
        same(given, &self.csrf)
    }
}

/// Compares two secrets in constant time (for equal lengths).
pub fn same(given: &str, secret: &str) -> bool {
    given.len() == secret.len() && given.bytes().zip(secret.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

fn valid_secret(s: &str) -> bool {
    s.len() == SECRET_BYTES * 2 && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

fn random_hex() -> Result<String, NoRandomness> {
    let mut bytes = [0u8; SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(NoRandomness)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `Set-Cookie` for a new sign-in. Not `Secure`: the API is plain HTTP (on loopback or
/// a management network, see `docs/security.md`).
pub fn set_cookie(value: &str) -> String {
    format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}", LIFETIME.as_secs())
}

/// `Set-Cookie` that removes the cookie (sign-out).
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_name_live_sessions_only() {
        let store = WebSessions::default();
        let (cookie, session) = store.create().unwrap();
        assert!(valid_secret(&cookie) && valid_secret(&session.csrf) && cookie != session.csrf);
        let header = format!("theme=dark; {COOKIE}={cookie}");
        assert_eq!(store.check([header.as_str()].into_iter()), CookieCheck::Valid(session.clone()));
        assert_eq!(store.check(["theme=dark"].into_iter()), CookieCheck::Absent);
        for hostile in [
            format!("{COOKIE}="),
            format!("{COOKIE}={}", "0".repeat(64)),
            format!("{COOKIE}={}", cookie.to_uppercase()),
            format!("{COOKIE}={cookie}x"),
            format!("{COOKIE}=../../etc/passwd"),
            format!("{COOKIE}={}", "é".repeat(32)),
        ] {
            assert_eq!(store.check([hostile.as_str()].into_iter()), CookieCheck::Unknown, "{hostile}");
        }
        // A stale cookie beside a good one: the good one counts.
        let two = format!("{COOKIE}={}; {COOKIE}={cookie}", "a".repeat(64));
        assert!(matches!(store.check([two.as_str()].into_iter()), CookieCheck::Valid(_)));
        assert!(session.csrf_matches(&session.csrf));
        assert!(!session.csrf_matches(&session.csrf[1..]));
        assert!(!session.csrf_matches(&"0".repeat(64)));
        store.remove(&session);
        assert!(!store.live(&session));
        assert_eq!(store.check([header.as_str()].into_iter()), CookieCheck::Unknown, "signed out");
    }

    #[test]
    fn the_oldest_sign_in_makes_room() {
        let store = WebSessions::default();
        let (first, _) = store.create().unwrap();
        for _ in 0..MAX_SESSIONS {
            store.create().unwrap();
        }
        let header = format!("{COOKIE}={first}");
        assert_eq!(store.check([header.as_str()].into_iter()), CookieCheck::Unknown);
        assert_eq!(store.lock().len(), MAX_SESSIONS);
    }
}
