//! OAuth end to end against the simulator with `SimOAuth::required` on: the login flow (the
//! test plays the browser), refresh before expiry and once on a 401, one refresh for many
//! concurrent 401s, the newest refresh token on disk, the store's permissions, agency
//! tokens exchanged for location tokens, and no token in any error or `Debug` output.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::common::TestSim;
use contacts_etl::api::{ApiError, Client, ClientConfig, ErrorKind, Token, TokenSource};
use contacts_etl::auth::{
    token_source_from_store, LoginRequest, ManualClock, OAuthApp, OAuthProvider, OAuthSettings,
    OAuthTokenSource, PendingLogin, StoreKey, StoredToken, TokenStore, UserType,
};
use contacts_etl::sim::{SimConfig, SimOAuth};

const LOCATIONS: [&str; 3] = [
    "oauthLocation0000001",
    "oauthLocation0000002",
    "oauthLocation0000003",
];
const DAY: u64 = 86_399;

fn oauth_sim(contacts: usize) -> SimConfig {
    SimConfig {
        contacts,
        locations: LOCATIONS.iter().map(|s| s.to_string()).collect(),
        rate_limit: None,
        daily_quota: None,
        oauth: SimOAuth {
            required: true,
            ..SimOAuth::default()
        },
        ..SimConfig::default()
    }
}

fn app(sim: &TestSim) -> OAuthApp {
    let o = &sim.sim.config().oauth;
    OAuthApp::new(o.client_id.clone(), o.client_secret.clone())
}

fn settings(sim: &TestSim, store: &Path, clock: &Arc<ManualClock>) -> OAuthSettings {
    OAuthSettings {
        clock: clock.clone(),
        ..OAuthSettings::new(sim.base_url.clone(), app(sim), store)
    }
}

/// Follows the consent URL like a browser: the simulator's consent screen redirects at
/// once to the loopback listener, whose page is returned.
async fn play_browser(consent_url: String) -> String {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let consent = http.get(&consent_url).send().await.unwrap();
    assert_eq!(
        consent.status().as_u16(),
        302,
        "the consent screen redirects"
    );
    let location = consent.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("http://127.0.0.1:"), "{location}");
    let callback = http.get(&location).send().await.unwrap();
    assert!(callback.status().is_success());
    callback.text().await.unwrap()
}

async fn login(sim: &TestSim, store: &Path, user_type: UserType) -> StoredToken {
    let req = LoginRequest {
        app: app(sim),
        base_url: sim.base_url.clone(),
        authorize_url: format!("{}/oauth/chooselocation", sim.base_url),
        scopes: vec!["contacts.readonly".into()],
        user_type,
        redirect_port: 0,
        store: store.to_path_buf(),
        timeout: Duration::from_secs(20),
    };
    let pending = PendingLogin::start(req).await.unwrap();
    let browser = tokio::spawn(play_browser(pending.consent_url().to_string()));
    let entry = pending.finish().await.unwrap();
    let page = browser.await.unwrap();
    assert!(page.contains("Logged in"), "{page}");
    entry
}

fn client(sim: &TestSim, token: Arc<dyn TokenSource>) -> Client {
    let mut cfg = ClientConfig::new(sim.base_url.clone(), Token::new("replaced").unwrap());
    cfg.token = token;
    cfg.rate_limit = None;
    cfg.concurrency = 64;
    Client::new(cfg).unwrap()
}

fn count(sim: &TestSim, route: &str) -> u64 {
    sim.sim.stats().by_route.get(route).copied().unwrap_or(0)
}

fn token_calls(sim: &TestSim) -> u64 {
    count(sim, "POST /oauth/token")
}

fn list_calls(sim: &TestSim) -> u64 {
    count(sim, "GET /contacts/")
}

fn stored(store: &Path, key: &StoreKey) -> StoredToken {
    TokenStore::new(store)
        .get(key)
        .unwrap()
        .expect("the entry is stored")
}

fn location_source(sim: &TestSim, store: &Path, clock: &Arc<ManualClock>) -> Arc<OAuthTokenSource> {
    Arc::new(
        OAuthTokenSource::from_store(
            &settings(sim, store, clock),
            StoreKey::Location(LOCATIONS[0].into()),
        )
        .unwrap(),
    )
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// Every token the store file holds, to search error messages and logs for.
fn secrets_in(store: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(store).unwrap()).unwrap();
    let mut out = Vec::new();
    for e in v["tokens"].as_object().unwrap().values() {
        for k in ["access_token", "refresh_token"] {
            if let Some(s) = e[k].as_str() {
                out.push(s.to_string());
            }
        }
    }
    out
}

fn assert_no_secret(text: &str, secrets: &[String]) {
    for s in secrets {
        assert!(!text.contains(s.as_str()), "a token leaked into: {text}");
    }
}

#[tokio::test]
async fn login_saves_a_0600_store_whose_token_lists_contacts() {
    let sim = TestSim::start(oauth_sim(50)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("conf/tokens.json");
    let entry = login(&sim, &store, UserType::Location).await;
    assert_eq!(entry.location_id.as_deref(), Some(LOCATIONS[0]));
    assert!(entry.refresh_token.is_some());
    #[cfg(unix)]
    assert_eq!(mode(&store), 0o600);

    let source =
        token_source_from_store(&settings(&sim, &store, &Arc::default()), LOCATIONS[0]).unwrap();
    let page = client(&sim, source)
        .list_contacts(LOCATIONS[0], 10, None)
        .await
        .unwrap();
    assert_eq!(page.contacts.len(), 10);

    // With OAuth required, a token the simulator never issued is refused.
    let stranger = sim
        .client(None, 1)
        .list_contacts(LOCATIONS[0], 10, None)
        .await
        .unwrap_err();
    assert_eq!(stranger.kind(), ErrorKind::Reauth);
}

#[tokio::test]
async fn token_near_expiry_is_refreshed_before_use() {
    let sim = TestSim::start(oauth_sim(50)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let clock = Arc::new(ManualClock::default());
    let source = location_source(&sim, &store, &clock);
    let c = client(&sim, source.clone());
    c.list_contacts(LOCATIONS[0], 10, None).await.unwrap();
    assert_eq!(
        (token_calls(&sim), source.refreshes()),
        (1, 0),
        "a fresh token is used as is"
    );

    // 100 s before expiry, inside the 5-minute margin; the server still accepts the token.
    let almost = Duration::from_secs(DAY - 100);
    clock.advance(almost);
    sim.sim.oauth_advance(almost);
    let before = list_calls(&sim);
    c.list_contacts(LOCATIONS[0], 10, None).await.unwrap();
    assert_eq!(source.refreshes(), 1);
    assert_eq!(token_calls(&sim), 2);
    assert_eq!(
        list_calls(&sim) - before,
        1,
        "refreshed before the call, so no 401 and no retry"
    );
    let entry = stored(&store, &StoreKey::Location(LOCATIONS[0].into()));
    assert!(
        entry.expires_at > clock_now(&clock) + 86_000,
        "the new expiry is saved"
    );
}

fn clock_now(clock: &ManualClock) -> i64 {
    contacts_etl::auth::Clock::now(clock)
}

#[tokio::test]
async fn expired_token_is_refreshed_once_on_401_and_the_call_retried() {
    let sim = TestSim::start(oauth_sim(50)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let source = location_source(&sim, &store, &Arc::default());
    let c = client(&sim, source.clone());
    c.list_contacts(LOCATIONS[0], 10, None).await.unwrap();

    // The server expires the token; the client's clock still thinks it is good.
    sim.sim.oauth_expire_access_tokens();
    let before = list_calls(&sim);
    let page = c.list_contacts(LOCATIONS[0], 10, None).await.unwrap();
    assert_eq!(page.contacts.len(), 10);
    assert_eq!(
        list_calls(&sim) - before,
        2,
        "refused once, then sent again"
    );
    assert_eq!(source.refreshes(), 1);
    assert_eq!(token_calls(&sim), 2);
}

#[tokio::test]
async fn concurrent_401s_cause_exactly_one_refresh() {
    let sim = TestSim::start(oauth_sim(200)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let source = location_source(&sim, &store, &Arc::default());
    let c = Arc::new(client(&sim, source.clone()));
    c.list_contacts(LOCATIONS[0], 1, None).await.unwrap();

    sim.sim.oauth_expire_access_tokens();
    let calls = (0..40).map(|_| {
        let c = c.clone();
        tokio::spawn(async move {
            c.list_contacts(LOCATIONS[0], 5, None)
                .await
                .map(|p| p.contacts.len())
        })
    });
    for r in futures::future::join_all(calls).await {
        assert_eq!(r.unwrap().unwrap(), 5);
    }
    assert_eq!(source.refreshes(), 1);
    assert_eq!(token_calls(&sim), 2, "the login's exchange and one refresh");
}

#[tokio::test]
async fn newest_refresh_token_is_on_disk_and_a_spent_one_is_refused_without_leaking() {
    let sim = TestSim::start(oauth_sim(50)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let first = login(&sim, &store, UserType::Location).await;
    let stale_copy = dir.path().join("stale.json");
    std::fs::copy(&store, &stale_copy).unwrap();

    let source = location_source(&sim, &store, &Arc::default());
    let c = client(&sim, source.clone());
    let key = StoreKey::Location(LOCATIONS[0].into());
    let mut seen = vec![first.refresh_token.clone().unwrap()];
    for _ in 0..4 {
        sim.sim.oauth_expire_access_tokens();
        c.list_contacts(LOCATIONS[0], 5, None).await.unwrap();
        let now_stored = stored(&store, &key).refresh_token.unwrap();
        assert!(
            !seen.contains(&now_stored),
            "each refresh saves a new refresh token"
        );
        seen.push(now_stored);
        #[cfg(unix)]
        assert_eq!(mode(&store), 0o600, "the rewritten store keeps mode 0600");
    }
    assert_eq!(source.refreshes(), 4);

    // A new process starting from the store can refresh: what is on disk is the live token.
    let again = location_source(&sim, &store, &Arc::default());
    sim.sim.oauth_expire_access_tokens();
    client(&sim, again.clone())
        .list_contacts(LOCATIONS[0], 5, None)
        .await
        .unwrap();
    assert_eq!(again.refreshes(), 1);

    // A store holding a spent refresh token is refused like a real server does, and no
    // token shows in the error or the source's Debug.
    let mut secrets = secrets_in(&store);
    secrets.extend(secrets_in(&stale_copy));
    let stale = location_source(&sim, &stale_copy, &Arc::default());
    sim.sim.oauth_expire_access_tokens();
    let err = client(&sim, stale.clone())
        .list_contacts(LOCATIONS[0], 5, None)
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Unauthorized { .. }), "{err:?}");
    let shown = format!("{err:#} / {err:?} / {stale:?} / {again:?}");
    assert!(
        shown.contains("auth login"),
        "the error says how to recover: {shown}"
    );
    assert_no_secret(&shown, &secrets);
}

#[cfg(unix)]
#[tokio::test]
async fn world_readable_store_is_refused_with_the_chmod_fix() {
    use std::os::unix::fs::PermissionsExt;
    let sim = TestSim::start(oauth_sim(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o644)).unwrap();

    let err = token_source_from_store(&settings(&sim, &store, &Arc::default()), LOCATIONS[0])
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&store.display().to_string()), "{msg}");
    assert!(msg.contains("0644"), "{msg}");
    assert!(
        msg.contains(&format!("chmod 600 {}", store.display())),
        "{msg}"
    );
    assert_no_secret(&msg, &secrets_in(&store));

    // A login into it is refused before the user is sent to the consent screen.
    let req = LoginRequest {
        app: app(&sim),
        base_url: sim.base_url.clone(),
        authorize_url: format!("{}/oauth/chooselocation", sim.base_url),
        scopes: vec![],
        user_type: UserType::Location,
        redirect_port: 0,
        store: store.clone(),
        timeout: Duration::from_secs(1),
    };
    assert!(PendingLogin::start(req)
        .await
        .unwrap_err()
        .to_string()
        .contains("chmod 600"));
}

#[tokio::test]
async fn agency_token_is_exchanged_for_location_tokens_and_refreshed_when_refused() {
    let sim = TestSim::start(oauth_sim(30)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let agency = login(&sim, &store, UserType::Company).await;
    assert_eq!(agency.user_type, UserType::Company);
    let company = agency.company_id.clone().unwrap();

    let provider = OAuthProvider::new(settings(&sim, &store, &Arc::default())).unwrap();
    let installed: Vec<String> = provider
        .installed_locations(None)
        .await
        .unwrap()
        .into_iter()
        .map(|l| l.id)
        .collect();
    assert_eq!(installed, LOCATIONS);

    let clients: Vec<Client> = installed
        .iter()
        .map(|l| client(&sim, provider.for_location(l).unwrap()))
        .collect();
    for (c, l) in clients.iter().zip(&installed) {
        assert_eq!(c.list_contacts(l, 5, None).await.unwrap().contacts.len(), 5);
    }
    assert_eq!(count(&sim, "POST /oauth/locationToken"), 3);
    for l in &installed {
        let e = stored(&store, &StoreKey::Location(l.clone()));
        assert_eq!(
            (e.user_type, e.company_id.as_deref()),
            (UserType::Location, Some(company.as_str()))
        );
        assert!(
            e.refresh_token.is_none(),
            "location tokens are renewed from the agency grant"
        );
    }

    // Everything expires: the first location's 401 makes it ask for a new location token,
    // which the expired agency token cannot get, so the agency grant is refreshed once;
    // the other locations then only need new location tokens.
    sim.sim.oauth_expire_access_tokens();
    for (c, l) in clients.iter().zip(&installed) {
        assert_eq!(c.list_contacts(l, 5, None).await.unwrap().contacts.len(), 5);
    }
    assert_eq!(
        token_calls(&sim),
        2,
        "the login's exchange and one agency refresh"
    );
    assert_eq!(provider.agency(None).unwrap().refreshes(), 1);
    assert_eq!(
        count(&sim, "POST /oauth/locationToken"),
        3 + 1 + 3,
        "one refused, three granted"
    );
    let secrets = secrets_in(&store);
    assert_no_secret(&format!("{provider:?}"), &secrets);
}

#[tokio::test]
async fn export_completes_when_tokens_expire_mid_run() {
    use contacts_etl::export::{self, ExportPlan, Progress};
    let sim = TestSim::start(oauth_sim(400)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let source = location_source(&sim, &store, &Arc::default());
    let mut cfg = ClientConfig::new(sim.base_url.clone(), Token::new("replaced").unwrap());
    cfg.token = source.clone();
    cfg.rate_limit = None;
    cfg.concurrency = 8;
    let c = Arc::new(Client::new(cfg).unwrap());

    // Revokes the tokens once the export is under way (waits on the simulator's counter,
    // failing after a deadline rather than hanging if the export never gets there).
    let watcher = {
        let sim = sim.sim.clone();
        tokio::spawn(async move {
            crate::common::until_requests(&sim, 60, "revoking the tokens mid-export").await;
            sim.oauth_expire_access_tokens();
        })
    };
    let out: PathBuf = dir.path().join("out");
    let plan = ExportPlan::new(
        LOCATIONS[0].to_string(),
        contacts_etl::sink::Format::Csv,
        &out,
    );
    let manifest = export::run(c, &plan, Arc::new(Progress::default()))
        .await
        .unwrap();
    watcher.await.unwrap();
    assert_eq!(manifest.entities["contacts"].rows, 400);
    assert_eq!(
        source.refreshes(),
        1,
        "concurrent 401s mid-export refresh once"
    );
}

#[tokio::test]
async fn cli_login_then_status_shows_the_grant_but_no_token() {
    use tokio::io::AsyncBufReadExt;
    let sim = TestSim::start(oauth_sim(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let o = sim.sim.config().oauth.clone();
    let bin = env!("CARGO_BIN_EXE_contacts-etl");
    let mut child = tokio::process::Command::new(bin)
        .args([
            "auth",
            "login",
            "--client-id",
            &o.client_id,
            "--client-secret-env",
            "SIM_SECRET",
            "--scope",
            "contacts.readonly",
        ])
        .arg("--token-store")
        .arg(&store)
        .env("SIM_SECRET", &o.client_secret)
        .env("HL_BASE_URL", &sim.base_url)
        .env(
            "HL_AUTHORIZE_URL",
            format!("{}/oauth/chooselocation", sim.base_url),
        )
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut printed = String::new();
    let url = loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the consent URL is printed");
        printed.push_str(&line);
        printed.push('\n');
        if let Some(u) = line.trim().strip_prefix("http") {
            break format!("http{u}");
        }
    };
    play_browser(url).await;
    while let Some(line) = lines.next_line().await.unwrap() {
        printed.push_str(&line);
        printed.push('\n');
    }
    assert!(child.wait().await.unwrap().success(), "{printed}");
    assert!(
        printed.contains(&format!("logged in: location {}", LOCATIONS[0])),
        "{printed}"
    );

    let status = tokio::process::Command::new(bin)
        .args(["auth", "status", "--token-store"])
        .arg(&store)
        .output()
        .await
        .unwrap();
    let out = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success());
    assert!(
        out.contains(LOCATIONS[0]) && out.contains("refresh token stored"),
        "{out}"
    );
    let secrets = secrets_in(&store);
    assert_no_secret(&format!("{out}{printed}"), &secrets);
    assert!(!printed.contains(&o.client_secret));
}

#[tokio::test]
async fn short_lived_tokens_are_not_refreshed_before_every_call() {
    let mut cfg = oauth_sim(20);
    cfg.oauth.expires_in = 120; // shorter than the 5-minute margin
    let sim = TestSim::start(cfg).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let clock = Arc::new(ManualClock::default());
    let source = location_source(&sim, &store, &clock);
    let c = client(&sim, source.clone());
    for _ in 0..5 {
        c.list_contacts(LOCATIONS[0], 5, None).await.unwrap();
    }
    assert_eq!(
        source.refreshes(),
        0,
        "the margin shrinks to half the lifetime"
    );
    clock.advance(Duration::from_secs(61));
    sim.sim.oauth_advance(Duration::from_secs(61));
    c.list_contacts(LOCATIONS[0], 5, None).await.unwrap();
    assert_eq!(source.refreshes(), 1);
}

#[cfg(unix)]
#[tokio::test]
async fn a_refresh_that_cannot_be_saved_is_saved_before_the_next_use() {
    use std::os::unix::fs::PermissionsExt;
    let sim = TestSim::start(oauth_sim(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    let store = conf.join("tokens.json");
    login(&sim, &store, UserType::Location).await;
    let source = location_source(&sim, &store, &Arc::default());
    let c = client(&sim, source.clone());

    // A directory where the store should be: unwritable even for root.
    let saved = std::fs::read(&store).unwrap();
    std::fs::remove_file(&store).unwrap();
    std::fs::create_dir(&store).unwrap();
    sim.sim.oauth_expire_access_tokens();
    let err = c.list_contacts(LOCATIONS[0], 5, None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Retry, "{err:#}");
    assert!(
        format!("{err:#}").contains(&store.display().to_string()),
        "{err:#}"
    );
    assert_eq!(source.refreshes(), 1);

    // The refreshed grant was kept in memory: once the store is writable it is saved and
    // used, without spending another refresh token.
    std::fs::remove_dir(&store).unwrap();
    std::fs::write(&store, saved).unwrap();
    std::fs::set_permissions(&store, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.list_contacts(LOCATIONS[0], 5, None).await.unwrap();
    assert_eq!((source.refreshes(), token_calls(&sim)), (1, 2));
    let again = location_source(&sim, &store, &Arc::default());
    sim.sim.oauth_expire_access_tokens();
    client(&sim, again)
        .list_contacts(LOCATIONS[0], 5, None)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agency_pipeline_exports_every_installed_location_with_oauth() {
    let sim = TestSim::start(oauth_sim(40)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    login(&sim, &store, UserType::Company).await;
    let o = &sim.sim.config().oauth;
    std::fs::write(dir.path().join("client-secret"), &o.client_secret).unwrap();
    let text = format!(
        "name = \"agency\"\n[api]\nbase_url = \"{}\"\nrate_limit = \"off\"\n[auth.oauth]\ntoken_store = \"tokens.json\"\nclient_id = \"{}\"\nclient_secret_file = \"client-secret\"\nall_installed_locations = true\n[export]\nout = \"out\"\ninclude = [\"tasks\"]\n",
        sim.base_url, o.client_id
    );
    let file = dir.path().join("agency.toml");
    std::fs::write(&file, text).unwrap();
    let p = contacts_etl::app::pipeline::load(&file).unwrap();
    let contacts_etl::app::pipeline::Job::Export(job) = &p.job else {
        panic!("an export")
    };
    let (outcome, report) =
        contacts_etl::app::pipeline::run_export(&p, job, &Default::default()).await;
    let report = report.expect("the pipeline ran");
    assert_eq!(outcome.exit_code(), 0, "{outcome:?}");
    assert_eq!(report.status, "complete", "{report:?}");
    assert_eq!(report.locations.len(), LOCATIONS.len());
    for l in LOCATIONS {
        let r = report
            .locations
            .iter()
            .find(|r| r.location_id == l)
            .unwrap();
        assert_eq!(r.rows["contacts"], 40, "{l}");
    }
    let secrets = secrets_in(&store);
    assert_no_secret(
        &std::fs::read_to_string(dir.path().join("out/_pipeline_report.json")).unwrap(),
        &secrets,
    );
}

// Issue 11, item 14: the loopback redirect requires this login's `state` and is served
// concurrently.

/// Starts a login against the simulator; the caller plays the browser.
async fn start_login(sim: &TestSim, store: &Path) -> PendingLogin {
    let req = LoginRequest {
        app: app(sim),
        base_url: sim.base_url.clone(),
        authorize_url: format!("{}/oauth/chooselocation", sim.base_url),
        scopes: vec!["contacts.readonly".into()],
        user_type: UserType::Location,
        redirect_port: 0,
        store: store.to_path_buf(),
        timeout: Duration::from_secs(20),
    };
    PendingLogin::start(req).await.unwrap()
}

/// A redirect planted by someone else (a link, an image on a page): answered with an error
/// page, which is returned.
async fn planted_redirect(redirect_uri: &str, query: &str) -> String {
    let r = reqwest::get(format!("{redirect_uri}?{query}"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400, "a planted redirect is refused");
    r.text().await.unwrap()
}

#[tokio::test]
async fn login_refuses_a_redirect_without_state_and_never_exchanges_its_code() {
    let sim = TestSim::start(oauth_sim(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let pending = start_login(&sim, &store).await;
    let (consent, redirect) = (
        pending.consent_url().to_string(),
        pending.redirect_uri().to_string(),
    );
    let login = tokio::spawn(pending.finish());

    let page = planted_redirect(&redirect, "code=attackers-code").await;
    assert!(page.contains("Login not accepted"), "{page}");
    // The login goes on: the user's own redirect still completes it.
    let page = play_browser(consent).await;
    assert!(page.contains("Logged in"), "{page}");
    let entry = login.await.unwrap().unwrap();
    assert_eq!(entry.location_id.as_deref(), Some(LOCATIONS[0]));
    assert_eq!(
        token_calls(&sim),
        1,
        "only the user's own code is exchanged"
    );
}

#[tokio::test]
async fn login_refuses_a_redirect_with_another_state_then_accepts_its_own() {
    let sim = TestSim::start(oauth_sim(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let pending = start_login(&sim, &store).await;
    let (consent, redirect) = (
        pending.consent_url().to_string(),
        pending.redirect_uri().to_string(),
    );
    let login = tokio::spawn(pending.finish());

    // As long as the real state, and shorter; and an error that would end the login.
    for query in [
        format!("code=attackers-code&state={}", "0".repeat(32)),
        "code=attackers-code&state=x".to_string(),
        "code=attackers-code&state=".to_string(),
        "error=access_denied&state=x".to_string(),
    ] {
        let page = planted_redirect(&redirect, &query).await;
        assert!(page.contains("another login attempt"), "{query}: {page}");
    }
    assert!(
        !login.is_finished(),
        "a planted redirect does not end the login"
    );
    play_browser(consent).await;
    let entry = login.await.unwrap().unwrap();
    assert_eq!(entry.location_id.as_deref(), Some(LOCATIONS[0]));
    assert_eq!(
        token_calls(&sim),
        1,
        "only the user's own code is exchanged"
    );
}

#[tokio::test]
async fn idle_connections_to_the_redirect_listener_do_not_delay_the_login() {
    let sim = TestSim::start(oauth_sim(10)).await;
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("tokens.json");
    let pending = start_login(&sim, &store).await;
    let consent = pending.consent_url().to_string();
    let addr = pending
        .redirect_uri()
        .trim_start_matches("http://")
        .trim_end_matches("/callback")
        .to_string();
    // Three connections that never send a request (a browser's preconnects), opened first:
    // a listener serving one connection at a time waited 10 s on each before the redirect
    // (longer than this login's 20 s timeout in all).
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let login = tokio::spawn(pending.finish());
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let consent = http.get(&consent).send().await.unwrap();
    let redirect = consent.headers()["location"].to_str().unwrap().to_string();
    // The idle connections are open and unanswered when the redirect is sent…
    for s in &idle {
        let mut buf = [0u8; 64];
        let e = s
            .try_read(&mut buf)
            .expect_err("nothing was sent on an idle connection");
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
    }
    // … and the redirect is answered anyway, and the login completes.
    let page = http
        .get(&redirect)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(page.contains("Logged in"), "{page}");
    let entry = login.await.unwrap().unwrap();
    assert_eq!(entry.location_id.as_deref(), Some(LOCATIONS[0]));
    // Ending the login closes them without an answer.
    for s in &idle {
        let mut buf = [0u8; 64];
        if let Ok(n) = s.try_read(&mut buf) {
            assert_eq!(n, 0, "an idle connection got an answer");
        }
    }
}

// Issue 11, item 17: the token store's directory, a linked store, and a token file others
// can read.

#[cfg(unix)]
#[test]
fn token_store_in_a_world_writable_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let path = shared.join("tokens.json");
    // World-writable, and world-writable with the sticky bit (/tmp).
    for mode in [0o777, 0o1777, 0o703] {
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
        let store = TokenStore::new(&path);
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains(&shared.display().to_string()), "{err}");
        assert!(err.contains("may be written by any user"), "{err}");
        assert!(err.contains(&format!("{mode:04o}")), "{err}");
        assert!(err.contains("hint: "), "{err}");
        assert!(store.put(entry_for("L1", "ref-1")).is_err());
        assert!(!path.exists(), "nothing is written there");
    }
    // Group-writable (user-private groups) is accepted with a warning; private, silently.
    for mode in [0o770, 0o755] {
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(mode)).unwrap();
        TokenStore::new(&path)
            .put(entry_for("L1", "ref-1"))
            .unwrap();
    }
}

#[cfg(unix)]
fn entry_for(location: &str, refresh: &str) -> StoredToken {
    StoredToken {
        user_type: UserType::Location,
        company_id: None,
        location_id: Some(location.into()),
        access_token: contacts_etl::auth::Secret::new(format!("acc-{refresh}")),
        refresh_token: Some(contacts_etl::auth::Secret::new(refresh)),
        expires_at: 1_900_000_000,
        scope: None,
        user_id: None,
        updated_at: 0,
    }
}

#[cfg(unix)]
#[test]
fn symlinked_token_store_is_written_through_not_replaced_by_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("private");
    let config = dir.path().join("config");
    std::fs::create_dir(&private).unwrap();
    std::fs::create_dir(&config).unwrap();
    let target = private.join("tokens.json");
    TokenStore::new(&target)
        .put(entry_for("L1", "ref-1"))
        .unwrap();
    // A relative link, as dotfile managers make them.
    let link = config.join("tokens.json");
    std::os::unix::fs::symlink("../private/tokens.json", &link).unwrap();

    // A refresh saves a new refresh token through the link.
    TokenStore::new(&link)
        .put(entry_for("L1", "ref-2"))
        .unwrap();
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link stays a link"
    );
    let key = StoreKey::Location("L1".into());
    let on_target = stored(&target, &key);
    assert_eq!(on_target.refresh_token.unwrap().expose(), "ref-2");
    assert_eq!(mode(&target), 0o600);
    // No temporary file is left in either directory.
    assert_eq!(std::fs::read_dir(&private).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(&config).unwrap().count(), 1);

    // A link made before the first login: the target is created.
    let dangling = config.join("new.json");
    std::os::unix::fs::symlink(private.join("new.json"), &dangling).unwrap();
    TokenStore::new(&dangling)
        .put(entry_for("L2", "ref-3"))
        .unwrap();
    assert!(std::fs::symlink_metadata(&dangling)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(private.join("new.json").is_file());
}

#[cfg(unix)]
#[test]
fn symlinked_token_store_into_a_world_writable_directory_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let link = dir.path().join("tokens.json");
    std::os::unix::fs::symlink(open.join("tokens.json"), &link).unwrap();
    let err = TokenStore::new(&link)
        .put(entry_for("L1", "ref-1"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&open.display().to_string()), "{err}");
}

/// Runs `export` against the simulator with `--token-file` at `mode`; returns stderr and the
/// token file.
#[cfg(unix)]
async fn export_with_token_file(dir: &Path, mode: u32) -> (String, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let sim = TestSim::start(crate::common::fast_sim(3, 1)).await;
    let token = dir.join("token");
    std::fs::write(&token, "pit-test-token\n").unwrap();
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(mode)).unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_contacts-etl"))
        .args(["export", "--base-url", &sim.base_url, "--location"])
        .arg(sim.location())
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(dir.join("out"))
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    (stderr, token)
}

#[cfg(unix)]
#[tokio::test]
async fn token_file_readable_by_others_is_warned_about_with_the_chmod_fix() {
    let dir = tempfile::tempdir().unwrap();
    let (stderr, token) = export_with_token_file(dir.path(), 0o644).await;
    assert!(stderr.contains("WARN"), "{stderr}");
    assert!(
        stderr.contains(&format!("chmod 600 {}", token.display())),
        "{stderr}"
    );
    assert!(stderr.contains("0644"), "{stderr}");
    assert!(!stderr.contains("pit-test-token"), "{stderr}");

    let dir = tempfile::tempdir().unwrap();
    let (stderr, _) = export_with_token_file(dir.path(), 0o600).await;
    assert!(!stderr.contains("chmod 600"), "{stderr}");
}

// Issue 11, items 8 and 12, for the OAuth endpoints: `installedLocations` pages that never
// end, and reply bodies without a cap.

/// An OAuth provider for a fake server (`router`) holding a valid agency grant of `co1`.
async fn agency_provider(dir: &Path, router: axum::Router) -> OAuthProvider {
    let grant = Grant {
        access: "agency-access",
        refresh: "agency-refresh",
        expires_at: 4_102_444_800,
        client_secret: "secret",
    };
    fake_agency_provider(dir, router, grant, None).await
}

/// The agency grant a fake OAuth server's provider holds, and the app's secret.
struct Grant {
    access: &'static str,
    refresh: &'static str,
    expires_at: i64,
    client_secret: &'static str,
}

/// An OAuth provider for a fake server (`router`) holding `grant` for agency `co1`, with
/// `retry` as its policy (the default without).
async fn fake_agency_provider(
    dir: &Path,
    router: axum::Router,
    grant: Grant,
    retry: Option<contacts_etl::api::RetryPolicy>,
) -> OAuthProvider {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let store = dir.join("tokens.json");
    TokenStore::new(&store)
        .put(StoredToken {
            user_type: UserType::Company,
            company_id: Some("co1".into()),
            location_id: None,
            access_token: contacts_etl::auth::Secret::new(grant.access),
            refresh_token: Some(contacts_etl::auth::Secret::new(grant.refresh)),
            expires_at: grant.expires_at,
            scope: None,
            user_id: None,
            updated_at: 0,
        })
        .unwrap();
    let mut settings = OAuthSettings::new(base, OAuthApp::new("app-1", grant.client_secret), store);
    if let Some(retry) = retry {
        settings.retry = retry;
    }
    OAuthProvider::new(settings).unwrap()
}

/// Answers `/oauth/installedLocations` with `reply`, counting the requests.
fn installed_locations_route<F, Fut, R>(
    hits: Arc<std::sync::atomic::AtomicUsize>,
    reply: F,
) -> axum::Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = R> + Send + 'static,
    R: axum::response::IntoResponse + 'static,
{
    axum::Router::new().route(
        "/oauth/installedLocations",
        axum::routing::get(move || {
            hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            reply()
        }),
    )
}

#[tokio::test]
async fn installed_locations_serving_one_full_page_forever_never_ended() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = installed_locations_route(hits.clone(), || async {
        // The same 100 locations on every page, and no count.
        let locations: Vec<serde_json::Value> = (0..100)
            .map(|i| serde_json::json!({ "_id": format!("loc{i:03}"), "isInstalled": true }))
            .collect();
        axum::Json(serde_json::json!({ "locations": locations }))
    });
    let dir = tempfile::tempdir().unwrap();
    let provider = agency_provider(dir.path(), router).await;
    let result = tokio::time::timeout(Duration::from_secs(30), provider.installed_locations(None))
        .await
        .expect("the listing ends");
    let err = result.expect_err("a loop error").to_string();
    assert!(
        err.contains("GET /oauth/installedLocations?companyId=co1"),
        "{err}"
    );
    assert!(err.contains("not advancing"), "{err}");
    assert!(err.contains("same 100 locations"), "{err}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_oauth_reply_over_the_body_cap_was_read_whole_into_memory() {
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let router = installed_locations_route(hits.clone(), || async {
        // 65 MiB, streamed without a Content-Length: over the default 64 MiB cap.
        let chunks = std::iter::repeat_n(bytes::Bytes::from(vec![b' '; 1 << 20]), 65)
            .map(Ok::<_, std::io::Error>);
        axum::response::Response::builder()
            .header("content-type", "application/json")
            .body(axum::body::Body::from_stream(futures::stream::iter(chunks)))
            .unwrap()
    });
    let dir = tempfile::tempdir().unwrap();
    let provider = agency_provider(dir.path(), router).await;
    let err = provider
        .installed_locations(None)
        .await
        .expect_err("refused")
        .to_string();
    assert!(err.contains("GET /oauth/installedLocations"), "{err}");
    assert!(err.contains("67108864-byte cap"), "{err}");
    assert!(err.contains("passed it after"), "{err}");
    assert_eq!(
        hits.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried"
    );
}

// Issue 12: the OAuth calls go through the crate's one HTTP transport, with the same retry
// policy as the Contacts calls (Retry-After honoured, an overall deadline per request).

/// An OAuth provider for a fake server (`router`) holding an agency grant of `co1` whose
/// access token has expired (so the first use refreshes it), with `retry` as its policy.
async fn expired_agency_provider(
    dir: &Path,
    router: axum::Router,
    retry: contacts_etl::api::RetryPolicy,
) -> OAuthProvider {
    let grant = Grant {
        access: "agency-access-old",
        refresh: "agency-refresh-old",
        expires_at: 0,
        client_secret: "client-secret-xyz",
    };
    fake_agency_provider(dir, router, grant, Some(retry)).await
}

/// When each request reached a fake OAuth route.
type Arrivals = Arc<std::sync::Mutex<Vec<std::time::Instant>>>;

fn arrived(log: &Arrivals) -> usize {
    let mut l = log.lock().unwrap();
    l.push(std::time::Instant::now());
    l.len()
}

fn token_json() -> serde_json::Value {
    serde_json::json!({
        "access_token": "agency-access-new", "refresh_token": "agency-refresh-new",
        "expires_in": 86399, "userType": "Company", "companyId": "co1"
    })
}

fn one_installed_location() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "locations": [{ "_id": "loc1" }], "count": 1 }))
}

fn rate_limited(retry_after: &'static str) -> axum::response::Response {
    axum::response::Response::builder()
        .status(429)
        .header("retry-after", retry_after)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(
            r#"{"statusCode":429,"message":"Too many requests"}"#,
        ))
        .unwrap()
}

#[tokio::test]
async fn oauth_token_call_answered_429_was_retried_without_waiting_for_its_retry_after() {
    let tokens: Arrivals = Arc::default();
    let log = tokens.clone();
    let router = axum::Router::new()
        .route(
            "/oauth/token",
            axum::routing::post(move || {
                let n = arrived(&log);
                async move {
                    if n == 1 {
                        rate_limited("1")
                    } else {
                        axum::response::IntoResponse::into_response(axum::Json(token_json()))
                    }
                }
            }),
        )
        .route(
            "/oauth/installedLocations",
            axum::routing::get(|| async { one_installed_location() }),
        );
    let dir = tempfile::tempdir().unwrap();
    let provider =
        expired_agency_provider(dir.path(), router, contacts_etl::auth::oauth_retry_policy()).await;
    let locations = provider.installed_locations(None).await.unwrap();
    assert_eq!(locations.len(), 1);
    let at = tokens.lock().unwrap().clone();
    assert_eq!(at.len(), 2, "the 429 was retried once");
    assert!(
        at[1] - at[0] >= Duration::from_secs(1),
        "the retry waited for the server's Retry-After (1 s): {:?}",
        at[1] - at[0]
    );
    let saved = stored(
        &dir.path().join("tokens.json"),
        &StoreKey::Company("co1".into()),
    );
    assert_eq!(
        saved
            .refresh_token
            .as_ref()
            .map(|s| s.expose().to_string())
            .as_deref(),
        Some("agency-refresh-new")
    );
}

#[tokio::test]
async fn installed_locations_answered_502_is_retried() {
    let hits: Arrivals = Arc::default();
    let log = hits.clone();
    let router = axum::Router::new().route(
        "/oauth/installedLocations",
        axum::routing::get(move || {
            let n = arrived(&log);
            async move {
                if n == 1 {
                    axum::response::IntoResponse::into_response((
                        axum::http::StatusCode::BAD_GATEWAY,
                        "<html>bad gateway</html>",
                    ))
                } else {
                    axum::response::IntoResponse::into_response(one_installed_location())
                }
            }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let provider = agency_provider(dir.path(), router).await;
    let locations = provider.installed_locations(None).await.unwrap();
    assert_eq!(locations.len(), 1);
    assert_eq!(hits.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn oauth_token_call_rate_limited_for_an_hour_stops_at_the_request_deadline() {
    let tokens: Arrivals = Arc::default();
    let log = tokens.clone();
    let router = axum::Router::new().route(
        "/oauth/token",
        axum::routing::post(move || {
            arrived(&log);
            async { rate_limited("3600") }
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let retry = contacts_etl::api::RetryPolicy {
        max_wait: Duration::from_secs(1),
        deadline: Duration::from_millis(2500),
        ..contacts_etl::auth::oauth_retry_policy()
    };
    let provider = expired_agency_provider(dir.path(), router, retry).await;
    let err = provider
        .installed_locations(None)
        .await
        .expect_err("gave up")
        .to_string();
    assert_eq!(
        tokens.lock().unwrap().len(),
        3,
        "attempts at 0, 1 and 2 s (one wait is capped at 1 s); a 4th would pass the 2.5 s deadline: {err}"
    );
    assert!(
        err.contains("POST /oauth/token (refresh_token grant): HTTP 429"),
        "{err}"
    );
    assert!(err.contains("request deadline"), "{err}");
    assert!(err.contains("the server asked to retry after"), "{err}");
    for secret in [
        "client-secret-xyz",
        "agency-refresh-old",
        "agency-access-old",
    ] {
        assert!(!err.contains(secret), "{err}");
    }
}
