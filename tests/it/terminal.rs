//! Text from outside never reaches the terminal raw (issue 11, item 16): a server whose error
//! message, trace id or ids carry terminal escape sequences (`ESC ] 0 ; … BEL` retitles the
//! terminal, `ESC [ 2J` clears it), a newline that would forge an `error:` line, or a bidi
//! override. Each test runs the binary against a fake server (axum on 127.0.0.1:0) or a
//! crafted file and checks every byte it printed.

use std::path::Path;

use axum::http::StatusCode;
use axum::response::IntoResponse;

const BIN: &str = env!("CARGO_BIN_EXE_contacts-etl");

/// What a hostile server puts in every text field it controls.
const HOSTILE: &str =
    "bad request\x1b]0;pwned\x07\x1b[2J\nerror: forged by the server\u{202e}gpj.exe\u{9b}31m";

/// A server answering every request 400 with [`HOSTILE`] as its message and trace id.
async fn hostile_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(|| async {
        let body = serde_json::json!({
            "statusCode": 400,
            "message": HOSTILE,
            "error": HOSTILE,
            "error_description": HOSTILE,
            "traceId": HOSTILE,
        });
        (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
    });
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

/// Asserts that nothing printed holds a raw control character other than our own newlines
/// (and tabs), and that no line was forged.
fn assert_printed_safely(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    assert!(!bytes.contains(&0x1b), "{what} holds a raw ESC:\n{text}");
    assert!(!bytes.contains(&0x07), "{what} holds a raw BEL:\n{text}");
    let unsafe_char = text
        .chars()
        .find(|&c| c != '\n' && c != '\t' && contacts_etl::term::is_unsafe(c));
    assert_eq!(unsafe_char, None, "{what} holds a raw control:\n{text}");
    assert!(
        !text.lines().any(|l| l.starts_with("error: forged")),
        "{what} holds a forged line:\n{text}"
    );
}

async fn run(args: &[&str], dir: &Path) -> std::process::Output {
    tokio::process::Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("HL_TOKEN", "pit-test-token")
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap()
}

#[tokio::test]
async fn server_escape_sequences_in_an_error_never_reach_the_terminal_raw() {
    let base = hostile_server().await;
    let dir = tempfile::tempdir().unwrap();
    // -v: the debug log carries the error as a field too (`error=…`), which
    // tracing-subscriber writes raw.
    let out = run(
        &[
            "-v",
            "export",
            "--base-url",
            &base,
            "--location",
            "loc1",
            "--out",
            "out",
            "--rate-limit",
            "off",
        ],
        dir.path(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_printed_safely("stderr", &out.stderr);
    assert_printed_safely("stdout", &out.stdout);
    // What the server said is still there to read, escaped.
    assert!(
        stderr.contains(
            "bad request\\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\nerror: forged by the server\\u{202e}"
        ),
        "{stderr}"
    );
    // The final error line, and the debug log's field, both quote it.
    assert!(stderr.contains("\nerror: "), "{stderr}");
    assert!(stderr.contains("error="), "{stderr}");
}

#[tokio::test]
async fn server_escape_sequences_in_an_import_never_reach_the_terminal_raw() {
    let base = hostile_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("in.csv"),
        "firstName,email\nAda,ada@example.com\nBob,bob@example.com\n",
    )
    .unwrap();
    let out = run(
        &[
            "import",
            "contacts",
            "--location",
            "loc1",
            "--input",
            "in.csv",
            "--base-url",
            &base,
            "--rate-limit",
            "off",
        ],
        dir.path(),
    )
    .await;
    assert!(!out.status.success());
    assert_printed_safely("stderr", &out.stderr);
    assert_printed_safely("stdout", &out.stdout);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("pwned"), "{all}");
}

#[tokio::test]
async fn server_escape_sequences_in_an_oauth_error_never_reach_the_terminal_raw() {
    let base = hostile_server().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret"), "client-secret").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            dir.path().join("secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
    }
    // An agency grant whose token is spent, so `auth locations` first refreshes it at the
    // hostile server's /oauth/token.
    write_store(
        &dir.path().join("tokens.json"),
        r#"{"version":"1","tokens":{"company:co1":{"user_type":"Company","company_id":"co1","access_token":"a","refresh_token":"r","expires_at":0}}}"#,
    );
    let out = run(
        &[
            "auth",
            "locations",
            "--client-id",
            "app-1",
            "--client-secret-file",
            "secret",
            "--token-store",
            "tokens.json",
            "--base-url",
            &base,
        ],
        dir.path(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("pwned"), "{stderr}");
    assert_printed_safely("stderr", &out.stderr);
    assert_printed_safely("stdout", &out.stdout);
}

fn write_store(path: &Path, json: &str) {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    use std::io::Write;
    o.open(path).unwrap().write_all(json.as_bytes()).unwrap();
}

#[tokio::test]
async fn server_values_kept_in_the_token_store_are_printed_escaped_by_auth_status() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = serde_json::to_string(HOSTILE).unwrap();
    write_store(
        &dir.path().join("tokens.json"),
        &format!(
            r#"{{"version":"1","tokens":{{"location:x":{{"user_type":"Location","location_id":{hostile},"access_token":"a","refresh_token":"r","expires_at":0,"scope":{hostile}}}}}}}"#
        ),
    );
    let out = run(
        &["auth", "status", "--token-store", "tokens.json"],
        dir.path(),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("pwned"), "{stdout}");
    assert_printed_safely("stdout", &out.stdout);
    assert_printed_safely("stderr", &out.stderr);
}

/// Serves `app` on 127.0.0.1:<free port>.
async fn serve(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn server_escape_sequences_in_a_looping_cursor_id_never_reach_the_terminal_raw() {
    // Every page: a new contact, but the same cursor, whose id is hostile: the listing
    // stops with CursorLoop, which quotes the cursor.
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/contacts/",
        axum::routing::get(move || {
            let n = hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                axum::Json(serde_json::json!({
                    "contacts": [{ "id": format!("c{n}"), "dateAdded": "2024-01-01T00:00:00.000Z" }],
                    "meta": { "startAfter": 1_700_000_000_000i64, "startAfterId": HOSTILE, "nextPage": 2 },
                }))
            }
        }),
    );
    let base = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    let out = run(
        &[
            "export",
            "--base-url",
            &base,
            "--location",
            "loc1",
            "--out",
            "out",
            "--include",
            "none",
            "--rate-limit",
            "off",
        ],
        dir.path(),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("did not advance"), "{stderr}");
    assert!(stderr.contains("pwned"), "{stderr}");
    assert_printed_safely("stderr", &out.stderr);
    assert_printed_safely("stdout", &out.stdout);
}

/// A token store holding a valid agency (Company) token of company `co1`, and the app's
/// client secret, in `dir`.
fn agency_store(dir: &Path) {
    std::fs::write(dir.join("secret"), "client-secret").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
    }
    write_store(
        &dir.join("tokens.json"),
        r#"{"version":"1","tokens":{"company:co1":{"user_type":"Company","company_id":"co1","access_token":"a","refresh_token":"r","expires_at":4102444800}}}"#,
    );
}

#[tokio::test]
async fn server_escape_sequences_in_an_installed_location_id_never_reach_the_terminal_raw() {
    // One of the agency's installed locations has a hostile id: the pipeline must neither use it
    // (requests, directories) nor print it raw in its summary.
    let app = axum::Router::new().fallback(|uri: axum::http::Uri| async move {
        if uri.path() == "/oauth/installedLocations" {
            axum::Json(serde_json::json!({
                "locations": [
                    { "_id": HOSTILE, "name": "x", "isInstalled": true },
                    { "_id": "goodLoc1", "name": "y", "isInstalled": true },
                ],
                "count": 2,
            }))
            .into_response()
        } else {
            let body = serde_json::json!({ "statusCode": 400, "message": HOSTILE });
            (StatusCode::BAD_REQUEST, axum::Json(body)).into_response()
        }
    });
    let base = serve(app).await;
    let dir = tempfile::tempdir().unwrap();
    agency_store(dir.path());
    std::fs::write(
        dir.path().join("p.toml"),
        format!("name = \"agency\"\n[api]\nbase_url = \"{base}\"\nrate_limit = \"off\"\n[auth.oauth]\ntoken_store = \"tokens.json\"\nclient_id = \"app-1\"\nclient_secret_file = \"secret\"\nall_installed_locations = true\n[export]\nout = \"out\"\ninclude = [\"tasks\"]\n"),
    )
    .unwrap();
    let out = run(&["run", "p.toml"], dir.path()).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("skipping an installed location"),
        "{stderr}"
    );
    // The other location still runs (its token request meets the hostile 400), and its
    // summary line, quoting that error, is printed safely too.
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("goodLoc1") && l.contains("failed")),
        "{stderr}"
    );
    assert!(
        stderr.contains("pwned"),
        "the id is shown escaped: {stderr}"
    );
    assert_printed_safely("stderr", &out.stderr);
    assert_printed_safely("stdout", &out.stdout);
    // Nothing was made for it: no file or directory is named after the hostile id.
    for sub in ["out", "out/_state"] {
        for entry in std::fs::read_dir(dir.path().join(sub))
            .into_iter()
            .flatten()
        {
            let name = entry.unwrap().file_name();
            assert!(
                !name.to_string_lossy().contains("pwned"),
                "{sub} has an entry named after the hostile id: {name:?}"
            );
        }
    }
}
