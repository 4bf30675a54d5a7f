//! Guards the HTTP API's access rule against real `weftlog run` processes:
//! a node refuses to serve HTTP beyond loopback without tokens and stays
//! open on loopback without them; with tokens each role may do what its
//! row of the table says and no more; a browser signs in with the login
//! form and its cookie survives a restart but not the removal of its
//! token; and the CLI keeps working through a node that requires tokens.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::server::{init, Opts, Proc, DEADLINE};
use serde_json::{json, Value};

const READ: &str = "read-token-0123456789";
const DESK: &str = "desk-token-0123456789";
const ADMIN: &str = "admin-token-0123456789";

/// An agent that hands back every status and follows no redirect.
fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// An answer: status, headers we look at, and body.
struct Answer {
    code: u16,
    location: Option<String>,
    set_cookie: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn answer(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Answer {
    let mut r = r.expect("an HTTP answer");
    let header = |n: &str| {
        r.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (location, set_cookie) = (header("location"), header("set-cookie"));
    Answer {
        code: r.status().as_u16(),
        location,
        set_cookie,
        body: r.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// How a request identifies itself.
#[derive(Clone, Copy)]
enum Cred<'a> {
    None,
    Bearer(&'a str),
    Cookie(&'a str),
}

fn request(p: &Proc, method: &str, path: &str, cred: Cred, body: Option<&Value>) -> Answer {
    let a = agent();
    let url = p.url(path);
    let auth = |b: ureq::RequestBuilder<ureq::typestate::WithBody>| match cred {
        Cred::None => b,
        Cred::Bearer(t) => b.header("authorization", format!("Bearer {t}")),
        Cred::Cookie(c) => b.header("cookie", format!("weftlog_session={c}")),
    };
    if method == "GET" {
        let mut b = a.get(&url);
        match cred {
            Cred::None => {}
            Cred::Bearer(t) => b = b.header("authorization", format!("Bearer {t}")),
            Cred::Cookie(c) => b = b.header("cookie", format!("weftlog_session={c}")),
        }
        return answer(b.header("accept", "text/html,*/*").call());
    }
    let b = auth(a.post(&url)).header("content-type", "application/json");
    let text = body.map_or(String::new(), |v| v.to_string());
    answer(b.send(text))
}

fn get(p: &Proc, path: &str, cred: Cred) -> Answer {
    request(p, "GET", path, cred, None)
}

fn post(p: &Proc, path: &str, cred: Cred, body: &Value) -> Answer {
    request(p, "POST", path, cred, Some(body))
}

fn login(p: &Proc, token: &str, name: &str) -> Answer {
    let form = format!(
        "name={}&token={}",
        name.replace(' ', "+"),
        token.replace('+', "%2B")
    );
    answer(
        agent()
            .post(p.url("/login"))
            .header("content-type", "application/x-www-form-urlencoded")
            .send(form),
    )
}

fn tokens_file(path: &Path, lines: &[(&str, &str)]) {
    let mut text = String::from("# the desk's tokens\n\n");
    for (role, token) in lines {
        text.push_str(&format!("{role} {token}\n"));
    }
    fs::write(path, text).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn append_body(kind: &str) -> Value {
    json!({"kind": kind, "set": {"name": "Ada"}})
}

#[test]
fn http_beyond_loopback_is_refused_without_tokens_and_loopback_stays_open() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_weftlog"))
        .arg("--data")
        .arg(&dir)
        .args(["run", "--listen", "127.0.0.1:0", "--http", "0.0.0.0:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > DEADLINE {
            let _ = child.kill();
            panic!("weftlog run on 0.0.0.0 without --tokens did not refuse");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "no ready line");
    assert!(
        stderr.contains("refusing to serve HTTP on 0.0.0.0:0 without --tokens")
            && stderr.contains("pass --tokens FILE, or listen on 127.0.0.1"),
        "{stderr}"
    );

    // On loopback without tokens: everything as before.
    let a = Proc::start("a", &dir, Opts::default());
    let who = get(&a, "/v1/whoami", Cred::None).json();
    assert_eq!(who, json!({"role": "admin", "name": null, "auth": false}));
    assert_eq!(
        post(&a, "/v1/admin/partition", Cred::None, &json!({"block": []})).code,
        200
    );
    assert_eq!(
        post(
            &a,
            "/v1/streams/c/1/events",
            Cred::None,
            &append_body("Opened")
        )
        .code,
        201
    );
    assert_eq!(get(&a, "/v1/status", Cred::None).code, 200);
    let l = get(&a, "/login", Cred::None);
    assert_eq!((l.code, l.location.as_deref()), (303, Some("/")));
    assert!(
        !dir.join("http.token").exists(),
        "no local token without tokens"
    );
}

#[test]
fn each_role_may_do_what_its_row_says_and_no_more() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let file = tmp.path().join("tokens.txt");
    tokens_file(&file, &[("read", READ), ("desk", DESK), ("admin", ADMIN)]);
    let file_arg = file.display().to_string();
    // Beyond loopback, with tokens: it starts.
    let a = Proc::start(
        "a",
        &dir,
        Opts {
            http: Some("0.0.0.0:0".into()),
            extra: vec!["--tokens", &file_arg],
            ..Default::default()
        },
    );
    assert_eq!(mode(&dir.join("http.token")), 0o600);
    assert_eq!(mode(&dir.join("http.secret")), 0o600);

    // No credentials: 401 JSON for the API, a redirect for the page.
    let r = get(&a, "/v1/status", Cred::None);
    assert_eq!(r.code, 401, "{}", r.body);
    assert!(
        r.json()["error"].as_str().unwrap().contains("Bearer"),
        "{}",
        r.body
    );
    let r = get(&a, "/", Cred::None);
    assert_eq!((r.code, r.location.as_deref()), (303, Some("/login")));
    let r = post(
        &a,
        "/v1/streams/c/1/events",
        Cred::None,
        &append_body("Opened"),
    );
    assert_eq!(r.code, 401, "{}", r.body);
    let r = get(&a, "/v1/status", Cred::Bearer("not-a-token-at-all-000"));
    assert_eq!(r.code, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "the bearer token is not valid");

    // read: every GET, no POST.
    for path in [
        "/v1/status",
        "/v1/log",
        "/v1/conflicts",
        "/v1/oversold",
        "/metrics",
    ] {
        assert_eq!(
            get(&a, path, Cred::Bearer(READ)).code,
            200,
            "read: GET {path}"
        );
    }
    let who = get(&a, "/v1/whoami", Cred::Bearer(READ)).json();
    assert_eq!(who, json!({"role": "read", "name": null, "auth": true}));
    let r = post(
        &a,
        "/v1/streams/c/1/events",
        Cred::Bearer(READ),
        &append_body("Opened"),
    );
    assert_eq!(r.code, 403, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("needs the desk role; this token has read"),
        "{}",
        r.body
    );

    // desk: appends and decisions, not admin routes.
    let r = post(
        &a,
        "/v1/streams/c/1/events",
        Cred::Bearer(DESK),
        &append_body("Opened"),
    );
    assert_eq!(r.code, 201, "{}", r.body);
    let sale = "00".repeat(32);
    let r = post(
        &a,
        &format!("/v1/oversold/{sale}"),
        Cred::Bearer(DESK),
        &json!({"action": "honour"}),
    );
    assert!(
        ![401, 403].contains(&r.code),
        "desk may decide: {} {}",
        r.code,
        r.body
    );
    for path in ["/v1/admin/partition", "/v1/export", "/v1/import"] {
        let r = post(&a, path, Cred::Bearer(DESK), &json!({"block": []}));
        assert_eq!(r.code, 403, "desk: POST {path}: {}", r.body);
    }

    // admin: everything.
    let r = post(
        &a,
        "/v1/admin/partition",
        Cred::Bearer(ADMIN),
        &json!({"block": []}),
    );
    assert_eq!(r.code, 200, "{}", r.body);
    let r = answer(
        agent()
            .post(a.url("/v1/export"))
            .header("authorization", format!("Bearer {ADMIN}"))
            .send(""),
    );
    assert_eq!(r.code, 200);
    let r = post(
        &a,
        "/v1/streams/c/1/events",
        Cred::Bearer(ADMIN),
        &append_body("Renamed"),
    );
    assert_eq!(r.code, 201, "{}", r.body);
}

#[test]
fn a_browser_signs_in_and_its_cookie_survives_a_restart_but_not_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let file = tmp.path().join("tokens.txt");
    tokens_file(&file, &[("desk", DESK), ("admin", ADMIN)]);
    let file_arg = file.display().to_string();
    let mut a = Proc::start(
        "a",
        &dir,
        Opts {
            extra: vec!["--tokens", &file_arg],
            ..Default::default()
        },
    );

    let form = get(&a, "/login", Cred::None);
    assert_eq!(form.code, 200);
    assert!(
        form.body
            .contains("<form method=\"post\" action=\"/login\">"),
        "{}",
        form.body
    );

    // A wrong token: the form again, with the error and the name kept.
    let bad = login(&a, "wrong-token-0123456789", "Ana <b>");
    assert_eq!(bad.code, 401);
    assert!(
        bad.body.contains("That token is not valid on this desk."),
        "{}",
        bad.body
    );
    assert!(bad.body.contains("value=\"Ana &lt;b&gt;\""), "{}", bad.body);
    assert!(bad.set_cookie.is_none());
    let noname = login(&a, DESK, "");
    assert_eq!(noname.code, 400);
    assert!(noname.body.contains("Enter your name"), "{}", noname.body);

    // The right one: a cookie, and a redirect to the page.
    let ok = login(&a, DESK, "Ana Lima");
    assert_eq!((ok.code, ok.location.as_deref()), (303, Some("/")));
    let set = ok.set_cookie.expect("a session cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(set.contains(attr), "{attr} in {set}");
    }
    let value = set
        .strip_prefix("weftlog_session=")
        .and_then(|s| s.split(';').next())
        .unwrap()
        .to_string();
    let who = get(&a, "/v1/whoami", Cred::Cookie(&value)).json();
    assert_eq!(
        who,
        json!({"role": "desk", "name": "Ana Lima", "auth": true})
    );
    assert_eq!(get(&a, "/v1/status", Cred::Cookie(&value)).code, 200);
    let r = post(
        &a,
        "/v1/streams/c/1/events",
        Cred::Cookie(&value),
        &append_body("Opened"),
    );
    assert_eq!(r.code, 201, "{}", r.body);
    let r = post(
        &a,
        "/v1/admin/partition",
        Cred::Cookie(&value),
        &json!({"block": []}),
    );
    assert_eq!(r.code, 403, "{}", r.body);
    // A tampered cookie is refused.
    let forged = value.replacen("v1.desk", "v1.admin", 1);
    assert_eq!(get(&a, "/v1/status", Cred::Cookie(&forged)).code, 401);
    let out = answer(agent().post(a.url("/logout")).send(""));
    assert_eq!(out.code, 303);
    assert!(out.set_cookie.unwrap().contains("Max-Age=0"));

    // A restart keeps the session (the key is in the data directory) and
    // makes a new local token.
    let local = fs::read_to_string(dir.join("http.token")).unwrap();
    let (status, _) = a.sigterm();
    assert!(status.success(), "{status}");
    assert!(
        !dir.join("http.token").exists(),
        "the local token goes at stop"
    );
    a.launch();
    assert_ne!(fs::read_to_string(dir.join("http.token")).unwrap(), local);
    assert_eq!(get(&a, "/v1/status", Cred::Bearer(local.trim())).code, 401);
    let who = get(&a, "/v1/whoami", Cred::Cookie(&value)).json();
    assert_eq!(who["name"], "Ana Lima");

    // Its token leaves the file: the session dies at once, and after a
    // restart too.
    tokens_file(&file, &[("admin", ADMIN)]);
    let r = get(&a, "/v1/whoami", Cred::Cookie(&value));
    assert_eq!(r.code, 401, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .unwrap()
            .contains("no longer valid"),
        "{}",
        r.body
    );
    assert_eq!(get(&a, "/v1/status", Cred::Bearer(DESK)).code, 401);
    let r = get(&a, "/", Cred::Cookie(&value));
    assert_eq!((r.code, r.location.as_deref()), (303, Some("/login")));
    a.sigterm();
    a.launch();
    assert_eq!(get(&a, "/v1/whoami", Cred::Cookie(&value)).code, 401);
    assert_eq!(get(&a, "/v1/whoami", Cred::Bearer(ADMIN)).code, 200);
}

#[test]
fn the_cli_works_through_a_node_that_requires_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let file = tmp.path().join("tokens.txt");
    tokens_file(&file, &[("read", READ)]);
    let file_arg = file.display().to_string();
    let a = Proc::start(
        "a",
        &dir,
        Opts {
            extra: vec!["--tokens", &file_arg],
            ..Default::default()
        },
    );
    assert_eq!(get(&a, "/v1/status", Cred::None).code, 401);
    let r = common::weftlog(
        &dir,
        &[
            "append",
            "--stream",
            "customer/1",
            "--kind",
            "Registered",
            "--set",
            "name=\"Ada\"",
        ],
    );
    assert_eq!(r.code, Some(0), "append: {}", r.stderr);
    let r = common::weftlog(&dir, &["status"]);
    assert_eq!(r.code, Some(0), "status: {}", r.stderr);
    let s: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(s["events"], 1, "{s}");
    // A second `run` on the locked directory fails, and leaves the
    // running node's local token alone.
    let r = common::weftlog(
        &dir,
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tokens",
            &file_arg,
        ],
    );
    assert_ne!(r.code, Some(0), "a second run on a locked directory");
    let r = common::weftlog(&dir, &["get", "--stream", "customer/1"]);
    assert_eq!(r.code, Some(0), "get: {}", r.stderr);
    assert!(r.stdout.contains("Ada"), "{}", r.stdout);
}

#[test]
fn a_bad_tokens_file_is_refused_naming_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("a");
    init(&dir);
    let file = tmp.path().join("tokens.txt");
    fs::write(&file, "desk desk-token-0123456789\nadmin short\n").unwrap();
    let r = common::weftlog(
        &dir,
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--tokens",
            file.to_str().unwrap(),
        ],
    );
    assert_ne!(r.code, Some(0));
    assert!(
        r.stderr
            .contains("tokens.txt line 2: the token has 5 characters; at least 16"),
        "{}",
        r.stderr
    );
    assert!(!dir.join("http.token").exists());
}
