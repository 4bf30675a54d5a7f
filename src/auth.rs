//! Who may use the HTTP API: tokens, roles, and the browser's session
//! cookie.
//!
//! **Tokens.** `weftlog run --tokens FILE` reads one `ROLE TOKEN` per line
//! (blank lines and lines starting with `#` are skipped). A token is at
//! least [`MIN_TOKEN_CHARS`] visible ASCII characters; a token listed twice
//! is refused, and so is a file with none. The file is read again when it
//! changes (its modification time or size), so removing a line revokes the
//! token at the next request; a file that no longer parses keeps the
//! tokens read before, with a warning in the log. Tokens are compared by
//! their keyed BLAKE3 hashes, in constant time, against every entry.
//!
//! **Roles** are ordered: `read` < `desk` < `admin` ([`required`] says
//! which each route needs). `read` may GET everything; `desk` may also POST
//! appends, venue commands and decisions on oversold sales; `admin` may
//! do everything, `/v1/admin/*`, export and import included.
//!
//! **The local token.** Each run makes a fresh admin token, writes it to
//! [`LOCAL_TOKEN_FILE`] in the data directory (mode 0600) and removes it at
//! stop; the CLI's remote mode ([`crate::remote`]) sends it, so the
//! commands that go through a running node keep working.
//!
//! **Sessions.** A browser cannot add a header to an `EventSource`, so
//! `POST /login` (form fields `token` and `name`) sets the cookie
//! [`SESSION_COOKIE`] (HttpOnly, SameSite=Strict, Path=/, Max-Age
//! [`SESSION_MAX_AGE_S`]). It is stateless: the role, the person's name,
//! the expiry and the keyed hash of the token it was made from, MACed
//! with `blake3::keyed_hash` under the key in [`SECRET_FILE`] (32 random
//! bytes, mode 0600, made at first use). A restart keeps browsers signed
//! in; a cookie whose token is no longer in the file is refused, and its
//! role is never more than its token's role now.
//!
//! **Without tokens** (the HTTP address must then be on loopback,
//! [`crate::run`] checks) every request passes as `admin`, and
//! `GET /v1/whoami` answers `"auth": false`.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use axum::body::Bytes;
use axum::extract::{Extension, Request};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tracing::warn;

use crate::daemon::Daemon;
use crate::http::ApiError;

/// Shortest token accepted, in characters.
pub const MIN_TOKEN_CHARS: usize = 16;
/// Longest token accepted, in characters.
pub const MAX_TOKEN_CHARS: usize = 512;
/// Most tokens a tokens file may hold.
pub const MAX_TOKENS: usize = 10_000;
/// Longest name a person may sign in with, in characters.
pub const MAX_NAME_CHARS: usize = 64;
/// Largest login form body, in bytes.
pub const MAX_LOGIN_BYTES: usize = 4096;
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "weftlog_session";
/// How long a session lasts: 12 hours.
pub const SESSION_MAX_AGE_S: u64 = 12 * 3600;
/// The file in a data directory that holds the session key.
pub const SECRET_FILE: &str = "http.secret";
/// The file in a data directory that holds this run's local admin token.
pub const LOCAL_TOKEN_FILE: &str = "http.token";

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Every GET.
    Read,
    /// `read`, and the POSTs of the desk: appends, venue commands,
    /// decisions on oversold sales.
    Desk,
    /// Everything.
    Admin,
}

impl Role {
    /// Its name in the tokens file and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Desk => "desk",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "read" => Ok(Role::Read),
            "desk" => Ok(Role::Desk),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("unknown role {s:?} (known: read, desk, admin)")),
        }
    }
}

/// The role a request needs: GET (and HEAD) `read`; POST under
/// `/v1/streams`, `/v1/venue` and `/v1/oversold` `desk`; anything else
/// (`/v1/admin/*`, export, import, other methods) `admin`. Paths are
/// matched as the router matches them, undecoded.
pub fn required(method: &Method, path: &str) -> Role {
    if method == Method::GET || method == Method::HEAD {
        return Role::Read;
    }
    let under = |p: &str| {
        path.strip_prefix(p)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if method == Method::POST
        && ["/v1/streams", "/v1/venue", "/v1/oversold"]
            .iter()
            .any(|p| under(p))
    {
        return Role::Desk;
    }
    Role::Admin
}

/// Why a tokens file was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokensError {
    /// The file could not be read.
    #[error("cannot read the tokens file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is wrong.
    #[error("{path} line {line}: {msg}")]
    Line {
        /// The file.
        path: PathBuf,
        /// Its number, from 1.
        line: usize,
        /// What is wrong with it.
        msg: String,
    },
    /// The file holds no token.
    #[error("{path} holds no token: write one `ROLE TOKEN` per line (roles read, desk, admin)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
}

/// One token of the file: its role and keyed hash.
#[derive(Debug, Clone)]
struct Entry {
    role: Role,
    hash: blake3::Hash,
}

/// The tokens of a tokens file, as keyed hashes.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    entries: Vec<Entry>,
}

impl Tokens {
    /// Parses the text of a tokens file (`path` names it in errors);
    /// tokens are hashed under `key`.
    pub fn parse(text: &str, path: &Path, key: &[u8; 32]) -> Result<Tokens, TokensError> {
        let mut entries: Vec<Entry> = Vec::new();
        let mut lines_of: Vec<usize> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |msg: String| TokensError::Line {
                path: path.to_path_buf(),
                line,
                msg,
            };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut words = l.split_whitespace();
            let (Some(role), Some(token), None) = (words.next(), words.next(), words.next()) else {
                return Err(bad("expected `ROLE TOKEN` (two words)".into()));
            };
            let role: Role = role.parse().map_err(bad)?;
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("a token is visible ASCII characters only".into()));
            }
            if token.len() < MIN_TOKEN_CHARS {
                return Err(bad(format!(
                    "the token has {} characters; at least {MIN_TOKEN_CHARS} are needed (e.g. `openssl rand -hex 24`)",
                    token.len()
                )));
            }
            if token.len() > MAX_TOKEN_CHARS {
                return Err(bad(format!(
                    "the token has {} characters; at most {MAX_TOKEN_CHARS} are accepted",
                    token.len()
                )));
            }
            if entries.len() == MAX_TOKENS {
                return Err(bad(format!("more than {MAX_TOKENS} tokens")));
            }
            let hash = token_hash(key, token);
            if let Some(k) = entries.iter().position(|e| e.hash == hash) {
                return Err(bad(format!(
                    "the same token as line {}: each token is listed once",
                    lines_of[k]
                )));
            }
            entries.push(Entry { role, hash });
            lines_of.push(line);
        }
        if entries.is_empty() {
            return Err(TokensError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Tokens { entries })
    }

    /// Reads and parses a tokens file.
    pub fn load(path: &Path, key: &[u8; 32]) -> Result<Tokens, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Tokens::parse(&text, path, key)
    }

    /// How many tokens.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The role of the token whose keyed hash is `hash`: every entry is
    /// compared, each in constant time (`blake3::Hash`'s equality).
    fn role_of(&self, hash: &blake3::Hash) -> Option<Role> {
        let mut found = None;
        for e in &self.entries {
            if e.hash == *hash {
                found = Some(e.role);
            }
        }
        found
    }
}

/// The keyed hash of a token (the key is derived from the session key).
fn token_hash(key: &[u8; 32], token: &str) -> blake3::Hash {
    blake3::keyed_hash(key, token.as_bytes())
}

/// Who is calling, as the guard found: request handlers read it as an
/// extension (`Extension<Caller>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// What they may do (`admin` when tokens are off).
    pub role: Role,
    /// The name they signed in with (a session), if any.
    pub name: Option<String>,
    /// Whether tokens are on.
    pub auth: bool,
}

/// The tokens file as last read, with the stamp it was read at.
struct Loaded {
    tokens: Tokens,
    stamp: Option<(SystemTime, u64)>,
}

struct On {
    path: PathBuf,
    loaded: RwLock<Loaded>,
    /// The session MAC key ([`SECRET_FILE`]).
    mac_key: [u8; 32],
    /// The key tokens are hashed under, derived from the MAC key.
    hash_key: [u8; 32],
    /// The keyed hash of this run's local admin token.
    local: blake3::Hash,
}

/// The HTTP API's access rule: off (loopback, no tokens) or on.
pub struct Auth {
    on: Option<On>,
}

/// Why a request's credentials were not taken.
enum Denied {
    /// None given.
    Missing,
    /// Given but not valid: why, in a sentence.
    Invalid(&'static str),
}

impl Auth {
    /// No tokens: every request passes.
    pub fn off() -> Auth {
        Auth { on: None }
    }

    /// Tokens from `tokens` (see the module docs); the session key in
    /// `dir`'s [`SECRET_FILE`], made if missing. `local_token` is this
    /// run's local admin token.
    pub fn on(tokens: &Path, dir: &Path, local_token: &str) -> anyhow::Result<Auth> {
        let mac_key = session_key(dir)?;
        let hash_key = blake3::derive_key("weftlog http token hash v1", &mac_key);
        let stamp = stamp(tokens);
        let loaded = Tokens::load(tokens, &hash_key)?;
        Ok(Auth {
            on: Some(On {
                path: tokens.to_path_buf(),
                loaded: RwLock::new(Loaded {
                    tokens: loaded,
                    stamp,
                }),
                mac_key,
                hash_key,
                local: token_hash(&hash_key, local_token),
            }),
        })
    }

    /// Whether tokens are on.
    pub fn enabled(&self) -> bool {
        self.on.is_some()
    }

    /// The role of `token` now (the file read again if it changed).
    fn role_of_hash(on: &On, hash: &blake3::Hash) -> Option<Role> {
        reload(on);
        // Nothing holds the lock across a panic that could leave it
        // halfway: the write replaces the value whole.
        let g = on.loaded.read().unwrap_or_else(|e| e.into_inner());
        let file = g.tokens.role_of(hash);
        let local = (on.local == *hash).then_some(Role::Admin);
        file.max(local)
    }

    /// The role of a token, or `None` if it is not valid now.
    pub fn role_of(&self, token: &str) -> Option<Role> {
        let on = self.on.as_ref()?;
        Auth::role_of_hash(on, &token_hash(&on.hash_key, token))
    }

    /// Who makes a request with `headers`: a bearer token first, else the
    /// session cookie.
    fn caller(&self, headers: &HeaderMap) -> Result<Caller, Denied> {
        let Some(on) = &self.on else {
            return Ok(Caller {
                role: Role::Admin,
                name: None,
                auth: false,
            });
        };
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            let token = v
                .to_str()
                .ok()
                .and_then(|s| s.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or(Denied::Invalid(
                    "the Authorization header must be `Bearer TOKEN`",
                ))?;
            let role = Auth::role_of_hash(on, &token_hash(&on.hash_key, token))
                .ok_or(Denied::Invalid("the bearer token is not valid"))?;
            return Ok(Caller {
                role,
                name: None,
                auth: true,
            });
        }
        let Some(cookie) = cookie(headers, SESSION_COOKIE) else {
            return Err(Denied::Missing);
        };
        let s = Session::verify(&on.mac_key, cookie, now_s()).ok_or(Denied::Invalid(
            "the session has expired or is not valid: sign in again at /login",
        ))?;
        let now = Auth::role_of_hash(on, &s.token_hash).ok_or(Denied::Invalid(
            "the token this session was made from is no longer valid: sign in again at /login",
        ))?;
        Ok(Caller {
            role: s.role.min(now),
            name: Some(s.name),
            auth: true,
        })
    }

    /// A session cookie's value for someone who signed in with `token`
    /// (which must be valid) and `name`.
    fn session_for(&self, token: &str, name: &str) -> Option<String> {
        let on = self.on.as_ref()?;
        let hash = token_hash(&on.hash_key, token);
        let role = Auth::role_of_hash(on, &hash)?;
        let s = Session {
            role,
            name: name.to_string(),
            expires_s: now_s().saturating_add(SESSION_MAX_AGE_S),
            token_hash: hash,
        };
        Some(s.seal(&on.mac_key))
    }
}

/// The file's modification time and size, if it can be read.
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// Reads the tokens file again if its stamp changed.
fn reload(on: &On) {
    let now = stamp(&on.path);
    {
        let g = on.loaded.read().unwrap_or_else(|e| e.into_inner());
        if g.stamp == now {
            return;
        }
    }
    let mut g = on.loaded.write().unwrap_or_else(|e| e.into_inner());
    if g.stamp == now {
        return;
    }
    g.stamp = now;
    match Tokens::load(&on.path, &on.hash_key) {
        Ok(t) => {
            tracing::info!(tokens = t.len(), path = %on.path.display(), "tokens file read again");
            g.tokens = t;
        }
        Err(e) => warn!("{e}; the tokens read before stay in force"),
    }
}

fn now_s() -> u64 {
    crate::node::wall_ms() / 1000
}

/// The 32-byte session key in `dir`'s [`SECRET_FILE`], made (mode 0600)
/// if missing.
pub fn session_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    let path = dir.join(SECRET_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            anyhow::anyhow!(
                "{} holds {} bytes, not 32: remove it to make a new one (browsers sign in again)",
                path.display(),
                bytes.len()
            )
        }),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
            write_private(&path, &key)?;
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `data` to `path` atomically, mode 0600.
fn write_private(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    // The temporary file `write_file` persists is made with mode 0600.
    crate::cli::write_file(path, data)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(())
}

/// A fresh local admin token (64 hex digits), written to `dir`'s
/// [`LOCAL_TOKEN_FILE`] (mode 0600).
pub fn write_local_token(dir: &Path) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let token = hex(&bytes);
    write_private(&dir.join(LOCAL_TOKEN_FILE), token.as_bytes())?;
    Ok(token)
}

/// The local admin token of the node running on `dir`, if it wrote one.
pub fn local_token(dir: &Path) -> Option<String> {
    let t = std::fs::read_to_string(dir.join(LOCAL_TOKEN_FILE)).ok()?;
    let t = t.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// A signed-in session, as its cookie holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Session {
    role: Role,
    name: String,
    expires_s: u64,
    token_hash: blake3::Hash,
}

impl Session {
    /// The cookie value: `v1.ROLE.EXPIRES.TOKENHASH.NAMEHEX.MAC`, all
    /// characters a cookie may hold without quoting.
    fn seal(&self, key: &[u8; 32]) -> String {
        let body = format!(
            "v1.{}.{}.{}.{}",
            self.role.name(),
            self.expires_s,
            self.token_hash.to_hex(),
            hex(self.name.as_bytes())
        );
        let mac = blake3::keyed_hash(key, body.as_bytes());
        format!("{body}.{}", mac.to_hex())
    }

    /// The session a cookie value holds, if its MAC is right and it has
    /// not expired at `now_s`.
    fn verify(key: &[u8; 32], value: &str, now_s: u64) -> Option<Session> {
        let (body, mac) = value.rsplit_once('.')?;
        let mac = blake3::Hash::from_hex(mac).ok()?;
        // Constant-time comparison (`blake3::Hash`'s equality).
        if blake3::keyed_hash(key, body.as_bytes()) != mac {
            return None;
        }
        let mut parts = body.split('.');
        let (Some("v1"), Some(role), Some(exp), Some(th), Some(name), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return None;
        };
        let expires_s: u64 = exp.parse().ok()?;
        if expires_s <= now_s {
            return None;
        }
        Some(Session {
            role: role.parse().ok()?,
            name: String::from_utf8(unhex(name)?).ok()?,
            expires_s,
            token_hash: blake3::Hash::from_hex(th).ok()?,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// The guard every route passes ([`crate::http::router_with`]): finds the
/// caller, refuses what its role does not allow (401 without valid
/// credentials, 403 for a role too weak, both `{"error": …}`; a GET of a
/// page rather than of the API is sent to `/login` instead), and hands
/// the [`Caller`] and the [`Auth`] to the handlers as extensions.
pub async fn guard(
    axum::extract::State(auth): axum::extract::State<Arc<Auth>>,
    mut req: Request,
    next: Next,
) -> Response {
    let path = req.uri().path().to_string();
    req.extensions_mut().insert(auth.clone());
    if path == "/login" || path == "/logout" {
        return next.run(req).await;
    }
    let need = required(req.method(), &path);
    match auth.caller(req.headers()) {
        Ok(c) if c.role >= need => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        Ok(c) => ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{} {path} needs the {} role; this token has {}",
                req.method(),
                need.name(),
                c.role.name()
            ),
        )
        .into_response(),
        Err(denied) => {
            let page =
                req.method() == Method::GET && !path.starts_with("/v1/") && path != "/metrics";
            if page {
                return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
            }
            let msg = match denied {
                Denied::Missing => "this node requires a token: send `Authorization: Bearer TOKEN`, or sign in at /login",
                Denied::Invalid(why) => why,
            };
            let mut r = ApiError::new(StatusCode::UNAUTHORIZED, msg).into_response();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"weftlog\""),
            );
            r
        }
    }
}

/// `GET /login`, `POST /login`, `POST /logout`, `GET /v1/whoami`.
pub fn routes() -> Router<Arc<Daemon>> {
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/v1/whoami", get(whoami))
}

async fn whoami(Extension(c): Extension<Caller>) -> Json<serde_json::Value> {
    Json(json!({ "role": c.role.name(), "name": c.name, "auth": c.auth }))
}

async fn login_form(Extension(auth): Extension<Arc<Auth>>) -> Response {
    if !auth.enabled() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    login_page(StatusCode::OK, "", None)
}

async fn login(Extension(auth): Extension<Arc<Auth>>, body: Bytes) -> Response {
    if !auth.enabled() {
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response();
    }
    if body.len() > MAX_LOGIN_BYTES {
        return login_page(
            StatusCode::PAYLOAD_TOO_LARGE,
            "",
            Some("The form is too large."),
        );
    }
    let fields = form_fields(&body);
    let field = |k: &str| {
        fields
            .iter()
            .find(|(f, _)| f == k)
            .map_or("", |(_, v)| v.as_str())
    };
    let name = field("name").trim().to_string();
    let token = field("token").trim();
    if let Err(e) = check_name(&name) {
        return login_page(StatusCode::BAD_REQUEST, &name, Some(&e));
    }
    if token.is_empty() {
        return login_page(StatusCode::BAD_REQUEST, &name, Some("Enter your token."));
    }
    let Some(value) = auth.session_for(token, &name) else {
        return login_page(
            StatusCode::UNAUTHORIZED,
            &name,
            Some("That token is not valid on this desk."),
        );
    };
    let cookie = format!(
        "{SESSION_COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_MAX_AGE_S}"
    );
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

async fn logout() -> Response {
    let cookie = format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0");
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/login".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

/// A person's name: 1 to [`MAX_NAME_CHARS`] characters, no control
/// characters.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("Enter your name: it is shown with what you change.".into());
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(format!(
            "Your name may have at most {MAX_NAME_CHARS} characters."
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("Your name may not hold control characters.".into());
    }
    Ok(())
}

/// The fields of an `application/x-www-form-urlencoded` body, decoded
/// (`+` is a space, `%XX` a byte; malformed escapes are kept as they are).
fn form_fields(body: &[u8]) -> Vec<(String, String)> {
    fn decode(s: &[u8]) -> String {
        let mut out = Vec::with_capacity(s.len());
        let mut i = 0;
        while i < s.len() {
            match s[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let byte = s
                        .get(i + 1..i + 3)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    if let Some(b) = byte {
                        out.push(b);
                        i += 2;
                    } else {
                        out.push(b'%');
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split(|b| *b == b'&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let mut it = kv.splitn(2, |b| *b == b'=');
            let k = it.next().unwrap_or_default();
            let v = it.next().unwrap_or_default();
            (decode(k), decode(v))
        })
        .collect()
}

/// `s` with the characters HTML gives a meaning escaped.
fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The login page, with `name` filled in and `error` shown.
fn login_page(status: StatusCode, name: &str, error: Option<&str>) -> Response {
    let error = match error {
        Some(e) => format!("<p class=\"error\" role=\"alert\">{}</p>", escape_html(e)),
        None => String::new(),
    };
    let page = LOGIN_HTML
        .replace("{{error}}", &error)
        .replace("{{name}}", &escape_html(name));
    let mut r = (status, Html(page)).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

const LOGIN_HTML: &str = r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in · weftlog desk</title>
<style>
  :root { color-scheme: light dark; --bg: #f4f5f7; --card: #fff; --ink: #1d2433; --muted: #5b6477;
          --line: #d5d9e2; --accent: #2f5bd3; --bad: #b42318; --bad-bg: #fdecea; }
  @media (prefers-color-scheme: dark) {
    :root { --bg: #12151c; --card: #1b202a; --ink: #e6e9f0; --muted: #9aa3b5; --line: #2e3544;
            --accent: #7d9cff; --bad: #ffb4a9; --bad-bg: #3a1d1a; }
  }
  * { box-sizing: border-box; }
  body { margin: 0; min-height: 100vh; display: grid; place-items: center; background: var(--bg);
         color: var(--ink); font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
  main { width: min(24rem, calc(100vw - 2rem)); background: var(--card); border: 1px solid var(--line);
         border-radius: 12px; padding: 2rem; box-shadow: 0 8px 24px rgba(0,0,0,.08); }
  h1 { margin: 0 0 .25rem; font-size: 1.4rem; }
  p.lead { margin: 0 0 1.5rem; color: var(--muted); font-size: .95rem; }
  label { display: block; font-weight: 600; font-size: .9rem; margin: 1rem 0 .35rem; }
  input { width: 100%; padding: .6rem .75rem; font: inherit; color: inherit; background: transparent;
          border: 1px solid var(--line); border-radius: 8px; }
  input:focus { outline: 2px solid var(--accent); outline-offset: 1px; border-color: var(--accent); }
  button { margin-top: 1.5rem; width: 100%; padding: .7rem; font: inherit; font-weight: 600; color: #fff;
           background: var(--accent); border: 0; border-radius: 8px; cursor: pointer; }
  button:hover { filter: brightness(1.08); }
  .error { margin: 0 0 1rem; padding: .6rem .75rem; border-radius: 8px; color: var(--bad);
           background: var(--bad-bg); font-size: .95rem; }
  .hint { margin: .35rem 0 0; color: var(--muted); font-size: .8rem; }
</style>
</head>
<body>
<main>
  <h1>Registration desk</h1>
  <p class="lead">Sign in to this desk with the token you were given.</p>
  {{error}}
  <form method="post" action="/login">
    <label for="name">Your name</label>
    <input id="name" name="name" autocomplete="name" required maxlength="64" value="{{name}}">
    <p class="hint">Shown next to what you change.</p>
    <label for="token">Token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required>
    <button type="submit">Sign in</button>
  </form>
</main>
</body>
</html>
"#;

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: [u8; 32] = [7; 32];

    fn parse(text: &str) -> Result<Tokens, TokensError> {
        Tokens::parse(text, Path::new("tokens.txt"), &KEY)
    }

    #[test]
    fn a_tokens_file_parses_and_its_errors_name_the_line() {
        let t = parse(
            "# staff\n\nread  rrrrrrrrrrrrrrrr\ndesk dddddddddddddddd\nadmin aaaaaaaaaaaaaaaa\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.role_of(&token_hash(&KEY, "dddddddddddddddd")),
            Some(Role::Desk)
        );
        assert_eq!(t.role_of(&token_hash(&KEY, "nope-nope-nope-nope")), None);
        let e = parse("read rrrrrrrrrrrrrrrr\nroot xxxxxxxxxxxxxxxxxx\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tokens.txt line 2: unknown role \"root\" (known: read, desk, admin)"
        );
        let e = parse("\ndesk short\n").unwrap_err().to_string();
        assert!(
            e.starts_with("tokens.txt line 2: the token has 5 characters; at least 16"),
            "{e}"
        );
        let e = parse("desk dddddddddddddddd\nadmin dddddddddddddddd\n").unwrap_err();
        assert_eq!(
            e.to_string(),
            "tokens.txt line 2: the same token as line 1: each token is listed once"
        );
        let e = parse("desk\n").unwrap_err().to_string();
        assert!(e.contains("line 1: expected `ROLE TOKEN`"), "{e}");
        assert!(matches!(parse("# none\n"), Err(TokensError::Empty { .. })));
    }

    #[test]
    fn routes_need_the_roles_of_the_table() {
        assert_eq!(required(&Method::GET, "/v1/admin/partition"), Role::Read);
        assert_eq!(required(&Method::POST, "/v1/streams/a/events"), Role::Desk);
        assert_eq!(required(&Method::POST, "/v1/venue/commands"), Role::Desk);
        assert_eq!(required(&Method::POST, "/v1/oversold/ab"), Role::Desk);
        assert_eq!(required(&Method::POST, "/v1/streamsx"), Role::Admin);
        assert_eq!(required(&Method::POST, "/v1/admin/partition"), Role::Admin);
        assert_eq!(required(&Method::POST, "/v1/export"), Role::Admin);
        assert_eq!(required(&Method::POST, "/v1/import"), Role::Admin);
        assert_eq!(required(&Method::DELETE, "/v1/streams/a"), Role::Admin);
    }

    #[test]
    fn a_session_cookie_verifies_only_unaltered_and_unexpired() {
        let s = Session {
            role: Role::Desk,
            name: "Ana María; x=\"1\"".into(),
            expires_s: 1_000,
            token_hash: token_hash(&KEY, "dddddddddddddddd"),
        };
        let v = s.seal(&KEY);
        assert!(v.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'));
        assert_eq!(Session::verify(&KEY, &v, 999), Some(s.clone()));
        assert_eq!(Session::verify(&KEY, &v, 1_000), None, "expired");
        assert_eq!(Session::verify(&[8; 32], &v, 999), None, "another key");
        let forged = v.replacen("v1.desk", "v1.admin", 1);
        assert_eq!(Session::verify(&KEY, &forged, 999), None);
        assert_eq!(Session::verify(&KEY, "garbage", 0), None);
        assert_eq!(Session::verify(&KEY, "", 0), None);
    }

    #[test]
    fn form_fields_decode_and_names_are_checked() {
        let f = form_fields(b"name=Ana+Mar%C3%ADa&token=abc%2Bdef&bad=%zz%");
        assert_eq!(
            f,
            vec![
                ("name".into(), "Ana María".into()),
                ("token".into(), "abc+def".into()),
                ("bad".into(), "%zz%".into()),
            ]
        );
        assert!(check_name("").is_err());
        assert!(check_name("a\u{7}").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        assert!(check_name("Ana").is_ok());
        assert_eq!(
            escape_html("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn cookies_are_found_among_others() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; weftlog_session=v1.x"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("v1.x"));
        assert_eq!(cookie(&h, "b"), None);
    }
}
