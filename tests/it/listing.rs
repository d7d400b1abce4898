//! The contacts listing against servers that misbehave in ways real integrations have seen.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use contacts_etl::api::{Client, ClientConfig, Token};
use contacts_etl::extract::{self, ExtractError};
use futures::TryStreamExt;
use serde_json::{json, Value};

async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

fn client(base: String) -> Arc<Client> {
    let mut cfg = ClientConfig::new(base, Token::new("t").unwrap());
    cfg.rate_limit = None;
    Arc::new(Client::new(cfg).unwrap())
}

fn contact(i: usize, ms: i64) -> Value {
    json!({ "id": format!("c{i:04}"), "dateAdded": contacts_etl::timefmt::format_iso_millis(ms) })
}

#[tokio::test]
async fn repeated_cursor_is_an_error_not_an_endless_loop() {
    let calls = Arc::new(AtomicUsize::new(0));
    let router = Router::new()
        .route(
            "/contacts/",
            get(|State(calls): State<Arc<AtomicUsize>>| async move {
                calls.fetch_add(1, Ordering::SeqCst);
                // Always the same page and the same cursor: a server bug.
                let contacts: Vec<Value> = (0..100).map(|i| contact(i, 1_700_000_000_000)).collect();
                Json(json!({ "contacts": contacts, "meta": { "total": 1000, "startAfter": 1_700_000_000_000i64, "startAfterId": "c0099", "nextPage": 2 } }))
            }),
        )
        .with_state(calls.clone());
    let base = serve(router).await;
    let result: Result<Vec<_>, _> = extract::location_contacts(client(base), "L".into(), None, 100)
        .try_collect()
        .await;
    assert!(
        matches!(result, Err(ExtractError::CursorLoop { .. })),
        "{result:?}"
    );
    assert!(calls.load(Ordering::SeqCst) <= 3, "stopped promptly");
}

#[tokio::test]
async fn contacts_repeated_across_a_page_boundary_are_emitted_once() {
    // 250 contacts, newest first, several per millisecond. The server's cursor is
    // inclusive of the boundary millisecond, so the start of each page repeats the end of
    // the previous one.
    let all: Arc<Vec<Value>> = Arc::new(
        (0..250)
            .map(|i| contact(i, 1_700_000_000_000 - (i as i64 / 3)))
            .collect(),
    );
    let router = Router::new()
        .route(
            "/contacts/",
            get(|State(all): State<Arc<Vec<Value>>>, Query(q): Query<std::collections::HashMap<String, String>>| async move {
                let start = match q.get("startAfter").and_then(|s| s.parse::<i64>().ok()) {
                    // Inclusive: everything at or after (older than or equal to) the cursor ms.
                    Some(ms) => all.iter().position(|c| contacts_etl::timefmt::parse_iso_millis(c["dateAdded"].as_str().unwrap()).unwrap() <= ms).unwrap_or(all.len()),
                    None => 0,
                };
                let page: Vec<Value> = all.iter().skip(start).take(100).cloned().collect();
                let last = page.last().cloned();
                let more = start + page.len() < all.len();
                Json(json!({
                    "contacts": page,
                    "meta": {
                        "total": all.len(),
                        "startAfter": last.as_ref().map(|c| contacts_etl::timefmt::parse_iso_millis(c["dateAdded"].as_str().unwrap()).unwrap()),
                        "startAfterId": last.as_ref().map(|c| c["id"].clone()),
                        "nextPage": if more { json!(2) } else { Value::Null },
                    }
                }))
            }),
        )
        .with_state(all.clone());
    let base = serve(router).await;
    let pages: Vec<_> = extract::location_contacts(client(base), "L".into(), None, 100)
        .try_collect()
        .await
        .unwrap();
    let ids: Vec<String> = pages
        .iter()
        .flat_map(|p| {
            p.contacts.iter().map(|c| {
                serde_json::from_str::<Value>(c.get()).unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
        })
        .collect();
    let unique: std::collections::BTreeSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), 250, "every contact");
    assert_eq!(ids.len(), 250, "each exactly once");
}

#[tokio::test]
async fn a_missing_meta_falls_back_to_the_last_contact_and_pages_to_an_empty_page() {
    let all: Arc<Vec<Value>> = Arc::new(
        (0..230)
            .map(|i| contact(i, 1_700_000_000_000 - i as i64))
            .collect(),
    );
    let router = Router::new()
        .route(
            "/contacts/",
            get(
                |State(all): State<Arc<Vec<Value>>>,
                 Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    let start = match q.get("startAfterId") {
                        Some(id) => all
                            .iter()
                            .position(|c| c["id"] == *id)
                            .map_or(all.len(), |p| p + 1),
                        None => 0,
                    };
                    // The shape the spec documents: no meta at all.
                    let page: Vec<Value> = all.iter().skip(start).take(100).cloned().collect();
                    Json(json!({ "contacts": page, "count": page.len() }))
                },
            ),
        )
        .with_state(all.clone());
    let base = serve(router).await;
    let pages: Vec<_> = extract::location_contacts(client(base), "L".into(), None, 100)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(pages.iter().map(|p| p.contacts.len()).sum::<usize>(), 230);
    // Without `meta.nextPage`, a short page proves nothing (the server may cap the limit):
    // the listing ends on the empty page after it.
    assert_eq!(pages.len(), 4);
    assert!(pages[3].contacts.is_empty());
}

#[tokio::test]
async fn a_server_capping_the_page_size_without_meta_still_yields_every_contact() {
    let all: Arc<Vec<Value>> = Arc::new(
        (0..230)
            .map(|i| contact(i, 1_700_000_000_000 - i as i64))
            .collect(),
    );
    let router = Router::new()
        .route(
            "/contacts/",
            get(
                |State(all): State<Arc<Vec<Value>>>,
                 Query(q): Query<std::collections::HashMap<String, String>>| async move {
                    let start = match q.get("startAfterId") {
                        Some(id) => all
                            .iter()
                            .position(|c| c["id"] == *id)
                            .map_or(all.len(), |p| p + 1),
                        None => 0,
                    };
                    // Asked for 100, answers 20: a short page that is not the last.
                    let page: Vec<Value> = all.iter().skip(start).take(20).cloned().collect();
                    Json(json!({ "contacts": page, "count": page.len() }))
                },
            ),
        )
        .with_state(all.clone());
    let base = serve(router).await;
    let pages: Vec<_> = extract::location_contacts(client(base), "L".into(), None, 100)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(pages.iter().map(|p| p.contacts.len()).sum::<usize>(), 230);
}

/// A search page that starts back inside the previous page (a server whose cursor is not
/// exclusive): the repeated contacts are dropped, the listing continues from the last
/// contact sent, and every contact comes once.
#[tokio::test]
async fn a_search_page_repeating_the_previous_pages_contacts_emits_each_once() {
    use axum::routing::post;
    // 12 contacts, newest first, pages of 5; the second page starts 5 back (it repeats the
    // whole first page), the third continues normally.
    let all: Vec<Value> = (0..12)
        .map(|i| contact(i, 1_700_000_000_000 - i as i64 * 1000))
        .collect();
    let router = Router::new().route(
        "/contacts/search",
        post(move |Json(body): Json<Value>| {
            let all = all.clone();
            async move {
                let after = body["searchAfter"][1].as_str().map(str::to_owned);
                let start = match after.as_deref() {
                    None => 0,
                    // After the first page (cursor c0004) the server starts back at c0001:
                    // four of its five contacts repeat the previous page.
                    Some("c0004") => 1,
                    Some(id) => all.iter().position(|c| c["id"] == id).unwrap() + 1,
                };
                let page: Vec<Value> = all.iter().skip(start).take(5).cloned().collect();
                Json(json!({ "contacts": page, "total": 12 }))
            }
        }),
    );
    let base = serve(router).await;
    let query = extract::SearchQuery {
        location_id: "L".into(),
        page_limit: 5,
        updated_since: None,
    };
    let pages: Vec<extract::Page> = extract::search_contacts(client(base), query, None, None)
        .try_collect()
        .await
        .expect("the listing continues after the repeated contacts");
    let ids: Vec<String> = pages
        .iter()
        .flat_map(|p| &p.contacts)
        .map(|c| {
            serde_json::from_str::<Value>(c.get()).unwrap()["id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let expected: Vec<String> = (0..12).map(|i| format!("c{i:04}")).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "each contact once: {ids:?}");
    assert_eq!(sorted, expected);
}
