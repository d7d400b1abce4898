//! End-to-end tests: a real server on 127.0.0.1:0 and a raw HTTP/1.1 client, so that
//! truncated bodies and dropped connections are seen exactly as a client would see them.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::{serve, Faults, Sim, SimConfig};

const LOC: &str = "demoLocation00000001";

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body had as many bytes as `Content-Length` announced.
    complete: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: bad JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

struct Client {
    addr: SocketAddr,
    token: Option<String>,
    version: Option<&'static str>,
    /// Dropping it shuts the server down.
    _stop: oneshot::Sender<()>,
}

impl Client {
    async fn send(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        self.send_raw(method, path, &body).await
    }

    /// The request as bytes, body as given.
    fn request(&self, method: &str, path: &str, body: &str) -> String {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        if let Some(t) = &self.token {
            req += &format!("Authorization: Bearer {t}\r\n");
        }
        if let Some(v) = self.version {
            req += &format!("Version: {v}\r\n");
        }
        req += &format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        req
    }

    async fn send_raw(&self, method: &str, path: &str, body: &str) -> Resp {
        let mut s = TcpStream::connect(self.addr)
            .await
            .expect("connect to the simulator");
        let req = self.request(method, path, body);
        s.write_all(req.as_bytes()).await.expect("send request");
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw).await; // a dropped connection may end in an error
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("response head");
        let head = String::from_utf8_lossy(&raw[..split]).to_string();
        let body = raw[split + 4..].to_vec();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .expect("status");
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let announced = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok());
        let complete = announced == Some(body.len());
        Resp {
            status,
            headers,
            body,
            complete,
        }
    }

    async fn get(&self, path: &str) -> Resp {
        self.send("GET", path, None).await
    }
}

async fn start(config: SimConfig) -> (Arc<Sim>, Client) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let sim = Sim::new(config);
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));
    let client = Client {
        addr,
        token: Some("pit-test-token".into()),
        version: Some("2021-07-28"),
        _stop: stop,
    };
    (sim, client)
}

fn unlimited(contacts: usize) -> SimConfig {
    SimConfig {
        contacts,
        rate_limit: None,
        daily_quota: None,
        ..SimConfig::default()
    }
}

/// Pages through a location with `limit`, following `meta`, checking the cursor chain.
async fn page_all(c: &Client, limit: usize) -> Vec<Value> {
    let mut out = Vec::new();
    let mut path = format!("/contacts/?locationId={LOC}&limit={limit}");
    for page in 1.. {
        let r = c.get(&path).await;
        assert_eq!(r.status, 200);
        let v = r.json();
        let contacts = v["contacts"].as_array().expect("contacts array").clone();
        assert_eq!(v["count"], contacts.len());
        let meta = &v["meta"];
        assert_eq!(meta["currentPage"], page);
        out.extend(contacts);
        if meta["nextPage"].is_null() {
            assert!(meta["startAfter"].is_null() && meta["startAfterId"].is_null());
            assert!(meta["nextPageUrl"].is_null());
            assert_eq!(meta["total"], out.len());
            return out;
        }
        assert_eq!(meta["nextPage"], page + 1);
        let last = out.last().expect("a full page before the end");
        assert_eq!(meta["startAfterId"], last["id"]);
        let url = meta["nextPageUrl"].as_str().expect("nextPageUrl");
        assert!(url.contains(&format!(
            "startAfterId={}",
            last["id"].as_str().unwrap_or_default()
        )));
        path = format!(
            "/contacts/?locationId={LOC}&limit={limit}&startAfter={}&startAfterId={}",
            meta["startAfter"],
            last["id"].as_str().unwrap_or_default()
        );
    }
    unreachable!()
}

#[tokio::test]
async fn paging_1037_contacts_yields_each_once_and_matches_truth() {
    let (sim, c) = start(unlimited(1037)).await;
    let served = page_all(&c, 100).await;
    let ids: HashSet<&str> = served.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(served.len(), 1037);
    assert_eq!(ids.len(), 1037);
    assert_eq!(served, sim.contacts(LOC));
    // Newest first, ties by id ascending.
    for w in served.windows(2) {
        let key = |v: &Value| {
            let ms = crate::timefmt::parse_iso_millis(v["dateAdded"].as_str().unwrap_or_default())
                .unwrap_or(0);
            (
                std::cmp::Reverse(ms),
                v["id"].as_str().unwrap_or_default().to_string(),
            )
        };
        assert!(key(&w[0]) < key(&w[1]));
    }
}

#[tokio::test]
async fn shared_millisecond_group_straddling_a_page_boundary_is_not_lost() {
    let (sim, c) = start(unlimited(1037)).await;
    let truth = sim.contacts(LOC);
    let straddles = |limit: usize| {
        (limit..truth.len())
            .step_by(limit)
            .any(|i| truth[i - 1]["dateAdded"] == truth[i]["dateAdded"])
    };
    let limit = (20..=100)
        .rev()
        .find(|&l| straddles(l))
        .expect("some page size splits a group");
    assert_eq!(page_all(&c, limit).await, truth);
    let groups = truth
        .windows(2)
        .filter(|w| w[0]["dateAdded"] == w[1]["dateAdded"])
        .count();
    assert!(
        groups > 100,
        "expected many shared milliseconds, got {groups}"
    );
}

#[tokio::test]
async fn limit_is_clamped_and_defaults_to_20() {
    let (_sim, c) = start(unlimited(300)).await;
    let v = c.get(&format!("/contacts/?locationId={LOC}")).await.json();
    assert_eq!(v["count"], 20);
    let v = c
        .get(&format!("/contacts/?locationId={LOC}&limit=500"))
        .await
        .json();
    assert_eq!(v["count"], 100);
    let r = c
        .get(&format!("/contacts/?locationId={LOC}&limit=abc"))
        .await;
    assert_eq!(r.status, 422);
}

#[tokio::test]
async fn start_after_without_id_skips_the_whole_millisecond() {
    let (sim, c) = start(unlimited(300)).await;
    let truth = sim.contacts(LOC);
    let ms =
        |v: &Value| crate::timefmt::parse_iso_millis(v["dateAdded"].as_str().unwrap_or_default());
    let i = (1..truth.len())
        .find(|&i| ms(&truth[i - 1]) == ms(&truth[i]))
        .expect("a shared ms");
    let at = ms(&truth[i]).expect("dateAdded");
    let v = c
        .get(&format!(
            "/contacts/?locationId={LOC}&limit=5&startAfter={at}"
        ))
        .await
        .json();
    assert!(ms(&v["contacts"][0]).expect("dateAdded") < at);
}

#[tokio::test]
async fn children_and_single_contact_match_truth() {
    let (sim, c) = start(unlimited(200)).await;
    let truth = sim.contacts(LOC);
    let (mut tasks, mut notes, mut events) = (0, 0, 0);
    for contact in &truth {
        let id = contact["id"].as_str().expect("id");
        assert_eq!(
            &c.get(&format!("/contacts/{id}")).await.json()["contact"],
            contact
        );
        let t = c.get(&format!("/contacts/{id}/tasks")).await.json();
        assert_eq!(t["tasks"].as_array().expect("tasks"), &sim.tasks(id));
        let n = c.get(&format!("/contacts/{id}/notes")).await.json();
        assert_eq!(n["notes"].as_array().expect("notes"), &sim.notes(id));
        let e = c.get(&format!("/contacts/{id}/appointments")).await.json();
        assert_eq!(
            e["events"].as_array().expect("events"),
            &sim.appointments(id)
        );
        if let Some(task) = sim.tasks(id).first() {
            let one = c
                .get(&format!(
                    "/contacts/{id}/tasks/{}",
                    task["id"].as_str().unwrap_or_default()
                ))
                .await;
            assert_eq!(&one.json()["task"], task);
        }
        tasks += sim.tasks(id).len();
        notes += sim.notes(id).len();
        events += sim.appointments(id).len();
    }
    for (what, n) in [("tasks", tasks), ("notes", notes), ("events", events)] {
        assert!((100..=300).contains(&n), "{what}: {n} for 200 contacts");
    }
}

#[tokio::test]
async fn errors_have_the_real_status_and_shape() {
    let (_sim, mut c) = start(unlimited(10)).await;
    let r = c.get("/contacts/nosuchcontact0000000").await;
    assert_eq!(r.status, 400);
    assert_eq!(
        r.json()["message"],
        "Contact with id nosuchcontact0000000 not found"
    );
    assert!(r.json()["traceId"].is_string());
    let r = c.get("/contacts/?locationId=otherLocation").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.json()["message"],
        "The token does not have access to this location"
    );
    assert_eq!(c.get("/nope").await.status, 404);
    c.version = None;
    let r = c.get(&format!("/contacts/?locationId={LOC}")).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (400, Some("Version header is missing or invalid"))
    );
    c.token = None;
    assert_eq!(
        c.get(&format!("/contacts/?locationId={LOC}")).await.status,
        401
    );
}

#[tokio::test]
async fn rate_limit_answers_429_with_headers_after_max_in_window() {
    let config = SimConfig {
        contacts: 10,
        rate_limit: Some((100, Duration::from_secs(60))),
        daily_quota: Some(1000),
        ..SimConfig::default()
    };
    let (sim, mut c) = start(config).await;
    let path = format!("/contacts/?locationId={LOC}&limit=1");
    for i in 0..100u32 {
        let r = c.get(&path).await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some((99 - i).to_string().as_str())
        );
    }
    let r = c.get(&path).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["message"], "Too many requests");
    assert!(r.json().get("contacts").is_none());
    assert_eq!(r.header("x-ratelimit-max"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("x-ratelimit-interval-milliseconds"), Some("60000"));
    assert_eq!(r.header("x-ratelimit-limit-daily"), Some("1000"));
    assert_eq!(r.header("x-ratelimit-daily-remaining"), Some("900"));
    let wait: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&wait));
    // Limits are per token.
    c.token = Some("another-token".into());
    assert_eq!(c.get(&path).await.status, 200);
    let stats = sim.stats();
    assert_eq!(
        (stats.rate_limited, stats.max_in_window, stats.requests),
        (1, 100, 102)
    );
    assert_eq!(stats.by_route.get("GET /contacts/"), Some(&102));
}

/// The defect: the limit was per token only, so one token used for several locations (a
/// pipeline's shared `[auth]` token) had one budget for all of them, where the API counts per
/// app per location. Each request counts against the location it names (query, search body,
/// path) or, for `/contacts/:id/...`, the contact's own location.
#[tokio::test]
async fn one_token_used_for_two_locations_gets_a_limit_at_each() {
    const OTHER: &str = "otherLocation0000002";
    let config = SimConfig {
        locations: vec![LOC.into(), OTHER.into()],
        contacts: 5,
        rate_limit: Some((3, Duration::from_secs(60))),
        daily_quota: Some(50),
        ..SimConfig::default()
    };
    let (sim, c) = start(config).await;
    let other_contact = sim.contacts(OTHER)[0]["id"].as_str().unwrap().to_string();
    for _ in 0..3 {
        assert_eq!(
            c.get(&format!("/contacts/?locationId={LOC}&limit=1"))
                .await
                .status,
            200
        );
    }
    // LOC's window is full, in every form a request can name LOC.
    assert_eq!(
        c.get(&format!("/contacts/?locationId={LOC}&limit=1"))
            .await
            .status,
        429
    );
    let search = json!({"locationId": LOC, "pageLimit": 1});
    assert_eq!(
        c.send("POST", "/contacts/search", Some(search))
            .await
            .status,
        429
    );
    assert_eq!(c.get(&format!("/locations/{LOC}")).await.status, 429);
    // OTHER has its own window and day, whichever way the request names it.
    let r = c.get(&format!("/contacts/{other_contact}/notes")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("2"));
    assert_eq!(r.header("x-ratelimit-daily-remaining"), Some("49"));
    let search = json!({"locationId": OTHER, "pageLimit": 1});
    let r = c.send("POST", "/contacts/search", Some(search)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("1"));
    let r = c.get(&format!("/locations/{OTHER}")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    assert_eq!(
        c.get(&format!("/contacts/?locationId={OTHER}&limit=1"))
            .await
            .status,
        429
    );
    let stats = sim.stats();
    assert_eq!((stats.rate_limited, stats.max_in_window), (4, 3));
}

#[tokio::test]
async fn daily_quota_exhausts_and_resets() {
    let config = SimConfig {
        contacts: 10,
        rate_limit: None,
        daily_quota: Some(3),
        ..SimConfig::default()
    };
    let (sim, c) = start(config).await;
    let path = format!("/contacts/?locationId={LOC}&limit=1");
    for _ in 0..3 {
        assert_eq!(c.get(&path).await.status, 200);
    }
    let r = c.get(&path).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.header("x-ratelimit-daily-remaining"), Some("0"));
    assert!(r.json()["message"]
        .as_str()
        .unwrap_or_default()
        .contains("Daily"));
    assert_eq!(sim.stats().quota_exceeded, 1);
    let reset = c.send("POST", "/_sim/reset-daily", None).await;
    assert_eq!(reset.status, 200);
    assert_eq!(c.get(&path).await.status, 200);
    let stats = c.get("/_sim/stats").await.json();
    assert_eq!(stats["quota_exceeded"], 1);
}

#[tokio::test]
async fn create_validates_strictly_and_rejects_duplicates() {
    let (sim, c) = start(unlimited(50)).await;
    let r = c
        .send(
            "POST",
            "/contacts/",
            Some(json!({"locationId": LOC, "nickname": "x"})),
        )
        .await;
    assert_eq!(r.status, 422);
    assert_eq!(
        r.json()["message"],
        json!(["property nickname should not exist"])
    );
    assert_eq!(r.json()["error"], "Unprocessable Entity");

    let body = json!({"locationId": LOC, "firstName": "Ada", "lastName": "Lovelace", "email": "Ada@Example.com",
        "phone": "+15550001111", "tags": ["a", "b"], "customFields": [{"key": "employees", "field_value": 12}]});
    let r = c.send("POST", "/contacts/", Some(body.clone())).await;
    assert_eq!(r.status, 201);
    let created = r.json()["contact"].clone();
    let id = created["id"].as_str().expect("new id").to_string();
    assert_eq!(created["emailLowerCase"], "ada@example.com");
    assert_eq!(created["dateAdded"], created["dateUpdated"]);
    assert_eq!(sim.contacts(LOC).first(), Some(&created), "newest first");
    assert_eq!(
        c.get(&format!("/contacts/{id}")).await.json()["contact"],
        created
    );

    let again = json!({"locationId": LOC, "email": "ADA@example.COM"});
    let r = c.send("POST", "/contacts/", Some(again)).await;
    assert_eq!(r.status, 400);
    let v = r.json();
    assert_eq!(
        v["message"],
        "This location does not allow duplicated contacts."
    );
    assert_eq!(v["meta"]["contactId"], id.as_str());
    assert_eq!(v["meta"]["matchingField"], "email");
    let r = c
        .send(
            "POST",
            "/contacts/",
            Some(json!({"locationId": LOC, "phone": "+15550001111"})),
        )
        .await;
    assert_eq!(r.json()["meta"]["matchingField"], "phone");

    let dup = c
        .get(&format!(
            "/contacts/search/duplicate?locationId={LOC}&email=ada%40EXAMPLE.com"
        ))
        .await;
    assert_eq!(dup.json()["contact"]["id"], id.as_str());
    let none = c
        .get(&format!(
            "/contacts/search/duplicate?locationId={LOC}&email=nobody%40x.y"
        ))
        .await;
    assert!(none.json()["contact"].is_null());

    let r = c
        .send(
            "POST",
            "/contacts/upsert",
            Some(json!({"locationId": LOC, "email": "ada@example.com", "city": "Paris"})),
        )
        .await;
    let v = r.json();
    assert_eq!(
        (v["new"].as_bool(), v["contact"]["city"].as_str()),
        (Some(false), Some("Paris"))
    );
    assert!(v["traceId"].is_string());
    assert_eq!(sim.contacts(LOC).len(), 51);
}

#[tokio::test]
async fn put_replaces_tags_and_post_tags_adds() {
    let (sim, c) = start(unlimited(20)).await;
    let before = sim.contacts(LOC)[3].clone();
    let id = before["id"].as_str().expect("id").to_string();
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}"),
            Some(json!({"locationId": LOC})),
        )
        .await;
    assert_eq!(r.status, 422);

    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}"),
            Some(json!({"tags": ["x", "y"]})),
        )
        .await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["succeded"], true);
    assert_eq!(v["contact"]["tags"], json!(["x", "y"]));
    assert!(v["contact"]["dateUpdated"].as_str() > before["dateUpdated"].as_str());

    let r = c
        .send(
            "POST",
            &format!("/contacts/{id}/tags"),
            Some(json!({"tags": ["y", "z"]})),
        )
        .await;
    assert_eq!(
        (r.status, r.json()["tags"].clone()),
        (201, json!(["x", "y", "z"]))
    );
    let r = c
        .send(
            "DELETE",
            &format!("/contacts/{id}/tags"),
            Some(json!({"tags": ["x"]})),
        )
        .await;
    assert_eq!(r.json()["tags"], json!(["y", "z"]));
    let truth = sim.contacts(LOC);
    assert_eq!(truth[3]["tags"], json!(["y", "z"]));
    assert_eq!(
        c.get(&format!("/contacts/{id}")).await.json()["contact"],
        truth[3]
    );

    let r = c.send("DELETE", &format!("/contacts/{id}"), None).await;
    assert_eq!(r.json()["succeded"], true);
    assert_eq!(c.get(&format!("/contacts/{id}")).await.status, 400);
    assert_eq!(sim.contacts(LOC).len(), 19);
}

#[tokio::test]
async fn task_and_note_writes() {
    let (sim, c) = start(unlimited(20)).await;
    let id = sim.contacts(LOC)[0]["id"].as_str().expect("id").to_string();
    let base = sim.tasks(&id).len();
    let r = c
        .send(
            "POST",
            &format!("/contacts/{id}/tasks"),
            Some(json!({"title": "Call", "completed": false})),
        )
        .await;
    assert_eq!(r.status, 422);
    let body = json!({"title": "Call", "dueDate": "2025-07-01T10:00:00.000Z", "completed": false});
    let r = c
        .send("POST", &format!("/contacts/{id}/tasks"), Some(body))
        .await;
    assert_eq!(r.status, 201);
    let task = r.json()["task"].clone();
    let tid = task["id"].as_str().expect("task id").to_string();
    assert_eq!(sim.tasks(&id).len(), base + 1);
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}/tasks/{tid}/completed"),
            Some(json!({"completed": true})),
        )
        .await;
    assert_eq!(r.json()["task"]["completed"], true);
    let r = c
        .send("DELETE", &format!("/contacts/{id}/tasks/{tid}"), None)
        .await;
    assert_eq!(r.json()["succeded"], true);
    assert_eq!(sim.tasks(&id).len(), base);

    let r = c
        .send(
            "POST",
            &format!("/contacts/{id}/notes"),
            Some(json!({"body": "hi", "locationId": LOC})),
        )
        .await;
    assert_eq!(r.status, 422);
    let r = c
        .send(
            "POST",
            &format!("/contacts/{id}/notes"),
            Some(json!({"body": "hi\nthere"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let note = r.json()["note"].clone();
    assert_eq!(sim.notes(&id).last(), Some(&note));
    let nid = note["id"].as_str().expect("note id");
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}/notes/{nid}"),
            Some(json!({"body": "edited"})),
        )
        .await;
    assert_eq!(r.json()["note"]["body"], "edited");
}

#[tokio::test]
async fn faults_break_replies_as_configured() {
    let (sim, c) = start(unlimited(20)).await;
    let path = format!("/contacts/?locationId={LOC}&limit=5");

    sim.set_faults(Faults {
        error_rate: 1.0,
        ..Faults::default()
    });
    let r = c.get(&path).await;
    assert!([500, 502, 503, 504].contains(&r.status));
    assert_eq!(r.json()["statusCode"], r.status);

    sim.set_faults(Faults {
        truncate_rate: 1.0,
        ..Faults::default()
    });
    let r = c.get(&path).await;
    assert_eq!(r.status, 200);
    assert!(r.complete, "Content-Length matches the cut body");
    assert!(serde_json::from_slice::<Value>(&r.body).is_err());

    sim.set_faults(Faults {
        drop_rate: 1.0,
        ..Faults::default()
    });
    let r = c.get(&path).await;
    assert!(
        !r.complete,
        "the connection breaks before the announced length"
    );

    sim.set_faults(Faults {
        ambiguous_write_rate: 1.0,
        ..Faults::default()
    });
    let id = sim.contacts(LOC)[0]["id"].as_str().expect("id").to_string();
    let r = c
        .send(
            "POST",
            &format!("/contacts/{id}/tags"),
            Some(json!({"tags": ["applied"]})),
        )
        .await;
    assert_eq!(r.status, 502);
    assert!(sim.contacts(LOC)[0]["tags"]
        .as_array()
        .expect("tags")
        .contains(&json!("applied")));

    sim.set_faults(Faults {
        slow_rate: 1.0,
        slow_delay: Duration::from_millis(50),
        ..Faults::default()
    });
    let t = std::time::Instant::now();
    assert_eq!(c.get(&path).await.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(50));
    assert_eq!(sim.stats().faults_injected, 5);
}

#[tokio::test]
async fn mutate_moves_date_updated_and_deletes() {
    let (sim, c) = start(unlimited(500)).await;
    let before = sim.contacts(LOC);
    let (changed, deleted) = sim.mutate(LOC, 0.1, 7, 99);
    assert!((20..=80).contains(&changed.len()), "{}", changed.len());
    assert_eq!(deleted.len(), 7);
    let after = sim.contacts(LOC);
    assert_eq!(after.len(), 493);
    for id in &changed {
        let old = before
            .iter()
            .find(|v| v["id"] == id.as_str())
            .expect("was there");
        let new = after
            .iter()
            .find(|v| v["id"] == id.as_str())
            .expect("still there");
        assert!(new["dateUpdated"].as_str() > old["dateUpdated"].as_str());
        assert_ne!(new["city"], old["city"]);
    }
    for id in &deleted {
        assert_eq!(c.get(&format!("/contacts/{id}")).await.status, 400);
    }
    assert_eq!(page_all(&c, 100).await, after);
}

#[tokio::test]
async fn business_listing_pages_by_skip() {
    let (sim, c) = start(unlimited(600)).await;
    let truth = sim.contacts(LOC);
    let biz = truth
        .iter()
        .find_map(|v| v["businessId"].as_str())
        .expect("some business")
        .to_string();
    let members: Vec<&Value> = truth
        .iter()
        .filter(|v| v["businessId"] == biz.as_str())
        .collect();
    let r = c
        .get(&format!(
            "/contacts/business/{biz}?locationId={LOC}&limit=3&skip=1"
        ))
        .await
        .json();
    assert_eq!(r["count"], members.len());
    let page: Vec<&Value> = r["contacts"].as_array().expect("contacts").iter().collect();
    assert_eq!(
        page,
        members.iter().skip(1).take(3).copied().collect::<Vec<_>>()
    );
    let with_business = truth.iter().filter(|v| v["businessId"].is_string()).count();
    assert!((120..=280).contains(&with_business), "{with_business}");
}

#[test]
fn data_is_deterministic_and_adversarial() {
    let a = Sim::new(unlimited(3000));
    let b = Sim::new(unlimited(3000));
    let contacts = a.contacts(LOC);
    assert_eq!(contacts, b.contacts(LOC));
    let text = serde_json::to_string(&contacts).unwrap_or_default();
    for needle in [
        "\\n",
        "\\r\\n",
        "\\\"",
        "\\t",
        "\\\\",
        "=HYPERLINK",
        "👩‍👩‍👧‍👦",
        "שלום",
        "李小龍",
        "visitorId",
        "someFutureField",
    ] {
        assert!(text.contains(needle), "no {needle}");
    }
    let has = |f: &dyn Fn(&serde_json::Map<String, Value>) -> bool| {
        contacts.iter().filter_map(Value::as_object).any(f)
    };
    assert!(has(&|o| o.get("email").is_some_and(Value::is_null)));
    assert!(has(&|o| !o.contains_key("email")));
    assert!(has(&|o| o
        .values()
        .any(|v| v.as_str().is_some_and(|s| s.len() >= 10_000))));
    assert!(has(&|o| o["customFields"]
        .as_array()
        .is_some_and(|cf| cf.iter().any(|f| f["value"].is_object()))));
    assert!(has(&|o| o["customFields"]
        .as_array()
        .is_some_and(|cf| cf.iter().any(|f| f["value"].is_f64()))));
    for v in &contacts {
        let id = v["id"].as_str().unwrap_or_default();
        assert!(id.len() == 20 && id.bytes().all(|c| c.is_ascii_alphanumeric()));
    }
    let other_seed = Sim::new(SimConfig {
        seed: 7,
        ..unlimited(3000)
    });
    assert_ne!(other_seed.contacts(LOC)[0], contacts[0]);
}

#[tokio::test]
async fn a_million_contacts_list_from_the_middle() {
    let (_sim, c) = start(unlimited(1_000_000)).await;
    let first = c
        .get(&format!("/contacts/?locationId={LOC}&limit=100"))
        .await
        .json();
    assert_eq!(first["meta"]["total"], 1_000_000);
    let last = &first["contacts"][99];
    let next = c
        .get(&format!(
            "/contacts/?locationId={LOC}&limit=100&startAfter={}&startAfterId={}",
            first["meta"]["startAfter"],
            last["id"].as_str().unwrap_or_default()
        ))
        .await
        .json();
    assert_eq!(next["count"], 100);
    assert_eq!(next["meta"]["currentPage"], 2);
    assert_ne!(next["contacts"][0]["id"], last["id"]);
}

/// Prints build time, RSS and per-page serving cost; run with
/// `cargo test --release --lib sim::tests::footprint -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measurement, not a check"]
async fn footprint() {
    fn rss_mb() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let kb: f64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        kb / 1024.0
    }
    for n in [100_000, 1_000_000] {
        let t = std::time::Instant::now();
        let (sim, c) = start(unlimited(n)).await;
        println!(
            "{n} contacts: built in {:?}, RSS {:.0} MB",
            t.elapsed(),
            rss_mb()
        );
        let t = std::time::Instant::now();
        let mut path = format!("/contacts/?locationId={LOC}&limit=100");
        let mut bytes = 0;
        let mut ids = Vec::new();
        for _ in 0..200 {
            let v = c.get(&path).await;
            bytes += v.body.len();
            let v = v.json();
            let last = v["contacts"][99]["id"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            ids.extend(
                v["contacts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["id"].as_str().map(String::from)),
            );
            path = format!(
                "/contacts/?locationId={LOC}&limit=100&startAfter={}&startAfterId={last}",
                v["meta"]["startAfter"]
            );
        }
        let el = t.elapsed();
        println!(
            "  200 pages of 100 over HTTP (client parse included): {el:?}, {} KB/page",
            bytes / 200 / 1024
        );
        let t = std::time::Instant::now();
        for id in ids.iter().take(3000) {
            let _ = c.get(&format!("/contacts/{id}/tasks")).await;
        }
        println!("  3000 child requests: {:?}", t.elapsed());
        // Direct cost, no HTTP: serialise 200 pages.
        let lock = sim.store.location(LOC).expect("location");
        let t = std::time::Instant::now();
        let l = super::store::read(lock);
        let mut total = 0;
        for p in 0..200 {
            let page: Vec<_> = l.listing()[p * 100..(p + 1) * 100]
                .iter()
                .map(|&s| l.contact(s))
                .collect();
            total += serde_json::to_vec(&page).map_or(0, |b| b.len());
        }
        println!(
            "  200 pages generated+serialised in-process: {:?} ({total} bytes)",
            t.elapsed()
        );
        drop(l);
        sim.mutate(LOC, 0.1, 100, 1);
        println!("  after mutating 10%: RSS {:.0} MB", rss_mb());
    }
}

/// Whether the simulator holds a contact with this email (as written).
fn has_email(sim: &Sim, email: &str) -> bool {
    sim.contacts(LOC).iter().any(|c| c["email"] == email)
}

fn search_path(email: &str) -> String {
    format!("/contacts/search/duplicate?locationId={LOC}&email={email}")
}

#[tokio::test(start_paused = true)]
async fn a_create_whose_client_dies_in_flight_still_lands_after_the_latency() {
    let latency = Duration::from_secs(2);
    let (sim, c) = start(SimConfig {
        write_latency: latency..=latency,
        ..unlimited(10)
    })
    .await;
    // The client sends a create, and dies before the reply (as a SIGKILLed importer would).
    let mut s = TcpStream::connect(c.addr).await.expect("connect");
    let body = json!({"locationId": LOC, "email": "gone@example.com"}).to_string();
    s.write_all(c.request("POST", "/contacts/", &body).as_bytes())
        .await
        .expect("send");
    while sim.writes_in_flight() == 0 {
        tokio::task::yield_now().await; // the server reads the request
    }
    drop(s);
    for _ in 0..20 {
        tokio::task::yield_now().await; // the server sees the connection close
    }
    assert!(
        !has_email(&sim, "gone@example.com"),
        "not applied before the latency"
    );
    assert_eq!(sim.writes_in_flight(), 1);

    sim.settle().await;
    assert!(
        has_email(&sim, "gone@example.com"),
        "applied although the client is gone"
    );
    let stats = sim.stats();
    assert_eq!((stats.writes_in_flight, stats.writes_abandoned), (0, 1));
}

#[tokio::test]
async fn writes_with_latency_reply_after_the_apply_dated_at_the_apply() {
    let latency = Duration::from_millis(60);
    let (sim, c) = start(SimConfig {
        write_latency: latency..=latency,
        ..unlimited(10)
    })
    .await;
    let sent = super::now_ms();
    let r = c
        .send(
            "POST",
            "/contacts/",
            Some(json!({"locationId": LOC, "email": "late@example.com"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let created = r.json()["contact"].clone();
    let added = crate::timefmt::parse_iso_millis(created["dateAdded"].as_str().expect("date"))
        .expect("ISO date");
    assert!(
        added >= sent + 60,
        "dateAdded {added} is the apply time, sent at {sent}"
    );
    assert_eq!(sim.contacts(LOC).first(), Some(&created));

    // An ambiguous write fault still applies the write, then answers 502.
    sim.set_faults(Faults {
        ambiguous_write_rate: 1.0,
        ..Faults::default()
    });
    let id = created["id"].as_str().expect("id");
    let sent = super::now_ms();
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}"),
            Some(json!({"city": "Lisbon"})),
        )
        .await;
    assert_eq!(r.status, 502);
    let now = &sim.contacts(LOC)[0];
    assert_eq!(now["city"], "Lisbon");
    let updated = crate::timefmt::parse_iso_millis(now["dateUpdated"].as_str().expect("date"))
        .expect("ISO date");
    assert!(updated >= sent + 60);
    assert_eq!(sim.stats().writes_in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn duplicate_search_sees_a_write_only_after_the_search_lag() {
    // An hour, so that no auto-advance of paused time while waiting on a socket gets near it.
    let lag = Duration::from_secs(3600);
    let (sim, c) = start(SimConfig {
        search_lag: lag,
        ..unlimited(10)
    })
    .await;
    let r = c
        .send(
            "POST",
            "/contacts/",
            Some(json!({"locationId": LOC, "email": "new@example.com"})),
        )
        .await;
    assert_eq!(r.status, 201);
    let id = r.json()["contact"]["id"].as_str().expect("id").to_string();
    let found = |r: Resp| r.json()["contact"]["id"].as_str().map(str::to_string);

    assert_eq!(found(c.get(&search_path("new%40example.com")).await), None);
    // The create rule, the listing and reads see the contact at once.
    let again = json!({"locationId": LOC, "email": "NEW@example.com"});
    assert_eq!(c.send("POST", "/contacts/", Some(again)).await.status, 400);
    assert_eq!(c.get(&format!("/contacts/{id}")).await.status, 200);
    assert!(has_email(&sim, "new@example.com"));

    tokio::time::advance(lag / 2).await;
    assert_eq!(found(c.get(&search_path("new%40example.com")).await), None);
    tokio::time::advance(lag / 2 + Duration::from_secs(1)).await;
    assert_eq!(
        found(c.get(&search_path("new%40example.com")).await),
        Some(id.clone())
    );

    // An update's new email is found only after the lag; until then the old one is.
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{id}"),
            Some(json!({"email": "renamed@example.com"})),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        found(c.get(&search_path("renamed%40example.com")).await),
        None
    );
    assert_eq!(
        found(c.get(&search_path("new%40example.com")).await),
        Some(id.clone())
    );
    tokio::time::advance(lag + Duration::from_secs(1)).await;
    assert_eq!(
        found(c.get(&search_path("renamed%40example.com")).await),
        Some(id.clone())
    );
    assert_eq!(found(c.get(&search_path("new%40example.com")).await), None);

    // A delete leaves the search at once.
    assert_eq!(
        c.send("DELETE", &format!("/contacts/{id}"), None)
            .await
            .status,
        200
    );
    assert_eq!(
        found(c.get(&search_path("renamed%40example.com")).await),
        None
    );
}

#[tokio::test]
async fn allow_duplicates_lets_two_creates_with_the_same_email_both_succeed() {
    let (sim, c) = start(SimConfig {
        allow_duplicates: true,
        ..unlimited(10)
    })
    .await;
    let mut ids = Vec::new();
    for first in ["First", "Second"] {
        let body = json!({"locationId": LOC, "firstName": first, "email": "twin@example.com"});
        let r = c.send("POST", "/contacts/", Some(body)).await;
        assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
        ids.push(r.json()["contact"]["id"].as_str().expect("id").to_string());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(sim.contacts(LOC).len(), 12);

    // The duplicate search answers the oldest of them.
    let r = c.get(&search_path("TWIN%40example.com")).await;
    assert_eq!(r.json()["contact"]["id"], ids[0].as_str());

    // An update to another contact's email is not refused either.
    let other = sim.contacts(LOC)[5]["id"].as_str().expect("id").to_string();
    let r = c
        .send(
            "PUT",
            &format!("/contacts/{other}"),
            Some(json!({"email": "twin@example.com"})),
        )
        .await;
    assert_eq!(r.status, 200);

    // Upsert updates the oldest match (by dateAdded: now the base contact), or creates when
    // asked to.
    let r = c
        .send(
            "POST",
            "/contacts/upsert",
            Some(json!({"locationId": LOC, "email": "twin@example.com", "city": "Oslo"})),
        )
        .await;
    let v = r.json();
    assert_eq!(v["new"], false);
    assert_eq!(v["contact"]["id"], other.as_str());
    let r = c.get(&search_path("twin%40example.com")).await;
    assert_eq!(r.json()["contact"]["id"], other.as_str());
    let r = c
        .send(
            "POST",
            "/contacts/upsert",
            Some(json!({"locationId": LOC, "email": "twin@example.com", "createNewIfDuplicateAllowed": true})),
        )
        .await;
    assert_eq!((r.status, r.json()["new"].clone()), (201, json!(true)));
    assert_eq!(sim.contacts(LOC).len(), 13);
}

#[tokio::test]
async fn location_endpoint_serves_the_configured_country_and_403s_an_unknown_location() {
    let (_sim, c) = start(SimConfig {
        country: "DE".into(),
        ..unlimited(1)
    })
    .await;
    let r = c.get(&format!("/locations/{LOC}")).await;
    assert_eq!(r.status, 200);
    let l = &r.json()["location"];
    assert_eq!(
        (
            l["id"].as_str(),
            l["country"].as_str(),
            l["timezone"].as_str()
        ),
        (Some(LOC), Some("DE"), Some("Europe/Berlin"))
    );
    assert_eq!(l["settings"]["allowDuplicateContact"], false);

    let r = c.get("/locations/someoneElsesLocation1").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["statusCode"], 403);

    let (_sim, c) = start(unlimited(1)).await;
    let r = c.get(&format!("/locations/{LOC}")).await;
    assert_eq!(r.json()["location"]["country"], "US", "the default");
}

/// A location access token from the simulator's consent flow, with `scope`.
async fn oauth_token(sim: &Sim, c: &Client, scope: &str) -> String {
    let o = &sim.config().oauth;
    let r = c
        .get(&format!(
            "/oauth/chooselocation?client_id={}&response_type=code&redirect_uri=http%3A%2F%2F127.0.0.1%2Fcb&scope={}",
            o.client_id,
            scope.replace(' ', "%20")
        ))
        .await;
    let to = r.header("location").expect("redirect");
    let code = to
        .split("code=")
        .nth(1)
        .expect("code")
        .split('&')
        .next()
        .expect("code");
    let form = format!(
        "client_id={}&client_secret={}&grant_type=authorization_code&code={code}&user_type=Location&redirect_uri=http%3A%2F%2F127.0.0.1%2Fcb",
        o.client_id, o.client_secret
    );
    let r = c.send_raw("POST", "/oauth/token", &form).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()["access_token"]
        .as_str()
        .expect("token")
        .to_string()
}

#[tokio::test]
async fn location_endpoint_needs_the_locations_readonly_scope_in_oauth_mode() {
    let mut config = unlimited(1);
    config.oauth.required = true;
    let (sim, mut c) = start(config).await;
    let path = format!("/locations/{LOC}");

    c.token = Some(oauth_token(&sim, &c, "contacts.readonly contacts.write").await);
    let r = c.get(&path).await;
    assert_eq!(r.status, 401);
    assert_eq!(
        r.json()["message"],
        "The token is not authorized for this scope."
    );
    assert_eq!(
        c.get(&format!("/contacts/?locationId={LOC}")).await.status,
        200,
        "a contacts read needs only contacts.readonly"
    );

    c.token = Some(oauth_token(&sim, &c, "contacts.readonly locations.readonly").await);
    assert_eq!(c.get(&path).await.status, 200);
    assert_eq!(c.get("/locations/someoneElsesLocation1").await.status, 403);
}

/// The issue-13 routes: search, location-wide children, custom fields, scopes, churn.
#[path = "tests_search.rs"]
mod search;
