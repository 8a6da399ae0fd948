//! The live page (`GET /admin/`) and its data (`/admin/overview`,
//! `/admin/events`), over loopback: the page and its assets are public and
//! carry a strict CSP; the data needs the admin key; the overview and the
//! feed say what `/admin/quotas` says; the feed ends when the gateway
//! shuts down. `tests/ui` drives the same page in a real browser.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use spillway_gateway::auth::hash_key;
use support::*;

const ADMIN: &str = "sk-spw-admin-page-key";
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn with_admin(extra: &str) -> String {
    format!("[admin]\nkey_sha256 = \"{}\"\n{extra}", hash_key(ADMIN))
}

async fn get(h: &Harness, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = h.http.get(format!("{}{path}", h.url));
    if let Some(key) = key {
        r = r.header("authorization", format!("Bearer {key}"));
    }
    r.send().await.expect("gateway answers")
}

async fn get_json(h: &Harness, path: &str) -> Value {
    let r = get(h, path, Some(ADMIN)).await;
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} on {}", r.url()))
        .to_str()
        .unwrap()
}

fn assert_secured(r: &reqwest::Response) {
    assert_eq!(header(r, "content-security-policy"), CSP, "{}", r.url());
    assert_eq!(header(r, "x-content-type-options"), "nosniff");
    assert_eq!(header(r, "referrer-policy"), "no-referrer");
    assert_eq!(header(r, "cache-control"), "no-store");
    assert_eq!(header(r, "x-frame-options"), "DENY");
}

/// Every `attr="…"` value in `html`.
fn attribute_values<'a>(html: &'a str, attr: &str) -> Vec<&'a str> {
    let needle = format!(" {attr}=\"");
    html.match_indices(&needle)
        .map(|(at, _)| {
            let rest = &html[at + needle.len()..];
            &rest[..rest.find('"').unwrap()]
        })
        .collect()
}

#[tokio::test]
async fn the_page_and_its_assets_are_public_with_a_strict_policy() {
    // Public even with the admin API off: the page holds no data.
    for overlay in [with_admin(""), String::new()] {
        let h = Harness::start(&overlay).await;
        let page = get(&h, "/admin/", None).await;
        assert_eq!(page.status(), 200);
        assert_eq!(header(&page, "content-type"), "text/html; charset=utf-8");
        assert_secured(&page);
        let html = page.text().await.unwrap();
        assert!(html.contains("id=\"signin\""), "the sign-in form");

        // Nothing inline the CSP would block: every script has a src, no
        // <style>, no style or on* attributes.
        for (at, _) in html.match_indices("<script") {
            let tag = &html[at..at + html[at..].find('>').unwrap()];
            assert!(tag.contains(" src=\""), "inline script: {tag}");
        }
        assert!(!html.contains("<style"), "inline <style>");
        assert!(!html.contains(" style=\""), "inline style attribute");
        let lower = html.to_lowercase();
        for handler in [
            " onclick=",
            " onload=",
            " onsubmit=",
            " onerror=",
            "javascript:",
        ] {
            assert!(!lower.contains(handler), "inline handler {handler}");
        }

        // Every asset the page names is served, with its type and the policy.
        let mut assets: Vec<&str> = attribute_values(&html, "src");
        assets.extend(attribute_values(&html, "href"));
        assets.sort_unstable();
        assets.dedup();
        assert_eq!(
            assets,
            ["assets/icon.svg", "assets/page.css", "assets/page.js"]
        );
        for (asset, content_type) in [
            ("assets/page.js", "text/javascript; charset=utf-8"),
            ("assets/page.css", "text/css; charset=utf-8"),
            ("assets/icon.svg", "image/svg+xml"),
        ] {
            let r = get(&h, &format!("/admin/{asset}"), None).await;
            assert_eq!(r.status(), 200, "{asset}");
            assert_eq!(header(&r, "content-type"), content_type, "{asset}");
            assert_secured(&r);
            let body = r.text().await.unwrap();
            assert!(!body.is_empty());
            if asset.ends_with(".js") {
                // The script builds the page from text, never from markup.
                assert!(!body.contains("innerHTML") && !body.contains("eval("));
                assert!(body.contains("sessionStorage") && !body.contains("localStorage"));
                assert!(!body.contains("document.cookie"));
            }
        }

        // `/admin` is the page too.
        let no_redirect = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let r = no_redirect
            .get(format!("{}/admin", h.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 308);
        assert_eq!(header(&r, "location"), "/admin/");
        assert_secured(&r);
        let r = get(&h, "/admin/assets/missing.js", None).await;
        expect_error(r, 404, "not_found_error").await;
    }
}

#[tokio::test]
async fn the_page_data_needs_the_admin_key() {
    let h = Harness::start(&with_admin("")).await;
    for path in ["/admin/overview", "/admin/events"] {
        let r = get(&h, path, None).await;
        expect_error(r, 401, "authentication_error").await;
        let r = get(&h, path, Some("sk-spw-not-the-key")).await;
        let message = expect_error(r, 401, "authentication_error").await;
        assert_eq!(message, "invalid admin key");
        // x-api-key works as for the rest of the admin API.
        let r = h
            .http
            .get(format!("{}{path}", h.url))
            .header("x-api-key", ADMIN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "cache-control"), "no-store");
    }
    let h = Harness::start("").await;
    for path in ["/admin/overview", "/admin/events"] {
        let r = get(&h, path, Some(ADMIN)).await;
        let message = expect_error(r, 403, "permission_error").await;
        assert!(message.contains("admin.key_sha256"), "{message}");
    }
}

/// `/admin/quotas`, by (model, region).
fn by_budget(list: &Value) -> Vec<(String, String, Value)> {
    let mut out: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["model"].as_str().unwrap().to_owned(),
                b["region"].as_str().unwrap().to_owned(),
                b.clone(),
            )
        })
        .collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// Asserts that `overview` says what `quotas` says: each budget carries
/// `/admin/quotas`'s fields as they are, and its bars add up to them.
fn assert_matches_quotas(overview: &Value, quotas: &Value) {
    let seen = by_budget(&overview["budgets"]);
    let want = by_budget(quotas);
    assert_eq!(seen.len(), want.len(), "{overview}");
    for ((model, region, o), (_, _, q)) in seen.iter().zip(&want) {
        let mut fields = o.clone();
        let extra = fields.as_object_mut().unwrap();
        let dims = extra.remove("dimensions").unwrap();
        extra.remove("models").unwrap();
        extra.remove("learned").unwrap();
        assert_eq!(&fields, q, "{model} in {region}");
        let dims = dims.as_array().unwrap();
        let dim = |name: &str| dims.iter().find(|d| d["name"] == name);
        let check = |d: &Value, limit: &Value, used: u64, in_flight: u64| {
            let n = |k: &str| d[k].as_u64().unwrap();
            assert_eq!(&d["limit"], limit, "{model} {region} {d}");
            assert_eq!(n("used") + n("reserved"), used, "{model} {region} {d}");
            assert_eq!(n("reserved"), in_flight, "{model} {region} {d}");
            assert_eq!(
                n("free"),
                n("limit").saturating_sub(used),
                "{model} {region} {d}"
            );
        };
        let u = |k: &str, f: &str| q[k][f].as_u64().unwrap();
        check(
            dim("requests").expect("a requests bar"),
            &q["effective"]["requests_per_min"],
            u("used", "requests"),
            u("in_flight", "requests"),
        );
        match dim("tokens") {
            Some(d) => check(
                d,
                &q["effective"]["tokens_per_min"],
                u("used", "input_tokens") + u("used", "output_tokens"),
                u("in_flight", "input_tokens") + u("in_flight", "output_tokens"),
            ),
            None => assert!(q["configured"]["tokens_per_min"].is_null()),
        }
        for side in ["input", "output"] {
            let limit = &q["effective"][format!("{side}_tokens_per_min")];
            match dim(&format!("{side}_tokens")) {
                Some(d) => check(
                    d,
                    limit,
                    u("used", &format!("{side}_tokens")),
                    u("in_flight", &format!("{side}_tokens")),
                ),
                None => assert!(limit.is_null()),
            }
        }
    }
}

/// Waits until nothing is in flight, so two reads see the same state.
async fn settled(h: &Harness) -> Value {
    for _ in 0..200 {
        let quotas = get_json(h, "/admin/quotas").await;
        let busy = quotas
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["in_flight"]["requests"] != 0);
        if !busy {
            return quotas;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("requests stayed in flight");
}

/// One location of Haiku with split token quotas: every kind of bar.
const SPLIT: &str = "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\" }, { name = \"europe-west4\", input_tokens_per_min = 40000, output_tokens_per_min = 8000 }]\n";

#[tokio::test]
async fn the_overview_says_what_admin_quotas_says() {
    let h = Harness::start(&with_admin(SPLIT)).await;
    for model in [HAIKU, HAIKU, HAIKU, SONNET] {
        assert_eq!(
            h.post_json("/v1/messages", &hello(model)).await.status(),
            200
        );
    }
    let quotas = settled(&h).await;
    let overview = get_json(&h, "/admin/overview").await;
    assert_matches_quotas(&overview, &quotas);

    let budgets = overview["budgets"].as_array().unwrap();
    let used: u64 = budgets
        .iter()
        .filter(|b| b["model"] == HAIKU)
        .map(|b| b["used"]["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(used, 3);
    let split = budgets
        .iter()
        .find(|b| b["model"] == HAIKU && b["region"] == "europe-west4")
        .unwrap();
    let names: Vec<&str> = split["dimensions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["requests", "input_tokens", "output_tokens"]);
    assert_eq!(split["models"], json!([HAIKU]));
    assert_eq!(split["learned"], false);
    assert_eq!(overview["window_secs"], 60);
    assert!(overview["generated_at"].as_str().unwrap().ends_with('Z'));

    // Queues, one per model; shares of the pools used; batches on.
    let queues = overview["queues"].as_array().unwrap();
    assert!(queues
        .iter()
        .any(|q| q["model"] == HAIKU && q["interactive"] == 0));
    let pools = overview["pools"].as_array().unwrap();
    let haiku = pools.iter().find(|p| p["model"] == HAIKU).unwrap();
    assert!(haiku["interactive_held"].as_f64().unwrap() > 0.0, "{haiku}");
    let shares = get_json(&h, "/admin/shares").await;
    let models = |v: &Value| -> Vec<Value> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|p| p["model"].clone())
            .collect()
    };
    assert_eq!(models(&overview["pools"]), models(&shares));
    assert_eq!(overview["batches"]["in_progress"], 0);
    assert_eq!(overview["batches"]["running"], json!([]));
}

/// Reads SSE events from `response` until `want` of them named `name`
/// came, or the stream ends; returns every (name, data) read.
async fn read_until(
    response: &mut reqwest::Response,
    name: &str,
    want: usize,
    within: Duration,
) -> Vec<(String, Value)> {
    let mut text = String::new();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let events = parse_events(&text[..text.rfind("\n\n").map_or(0, |i| i + 2)]);
        if events.iter().filter(|(n, _)| n == name).count() >= want {
            return events;
        }
        match tokio::time::timeout_at(deadline, response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(Ok(None)) => return parse_events(&text),
            Ok(Err(e)) => panic!("feed broke: {e}"),
            Err(_) => panic!("no {want} {name} events within {within:?}; read:\n{text}"),
        }
    }
}

#[tokio::test]
async fn the_feed_pushes_the_overview_every_second_and_ends_at_shutdown() {
    let h = Harness::start(&with_admin("")).await;
    assert_eq!(
        h.post_json("/v1/messages", &hello(HAIKU)).await.status(),
        200
    );
    let quotas = settled(&h).await;
    let mut feed = get(&h, "/admin/events", Some(ADMIN)).await;
    assert_eq!(feed.status(), 200);
    assert_eq!(header(&feed, "content-type"), "text/event-stream");
    assert_eq!(header(&feed, "cache-control"), "no-store");
    let events = read_until(&mut feed, "overview", 2, Duration::from_secs(10)).await;
    let overviews: Vec<&Value> = events
        .iter()
        .filter(|(n, _)| n == "overview")
        .map(|(_, v)| v)
        .collect();
    assert_matches_quotas(overviews[0], &quotas);
    assert_matches_quotas(overviews[1], &quotas);
    let apart = overviews[1]["generated_at_ms"].as_i64().unwrap()
        - overviews[0]["generated_at_ms"].as_i64().unwrap();
    // About a second apart (loose: a loaded machine delays a tick).
    assert!(
        (500..=3_000).contains(&apart),
        "a frame a second: {apart} ms"
    );

    // A second viewer gets the current frame at once, not a tick later:
    // the one the first viewer just got (or, on a machine so slow the next
    // tick came first, within well under a tick).
    let started = std::time::Instant::now();
    let mut second = get(&h, "/admin/events", Some(ADMIN)).await;
    let first_seen = read_until(&mut second, "overview", 1, Duration::from_secs(5)).await;
    let elapsed = started.elapsed();
    assert!(
        first_seen[0].1["generated_at_ms"] == overviews[1]["generated_at_ms"]
            || elapsed < Duration::from_millis(700),
        "{elapsed:?}"
    );

    // Shutting down: each feed says so and ends, so connections can close.
    drop(h);
    for stream in [&mut feed, &mut second] {
        let rest = read_until(stream, "closing", 1, Duration::from_secs(5)).await;
        assert_eq!(rest.last().unwrap().0, "closing", "{rest:?}");
        let end = tokio::time::timeout(Duration::from_secs(5), stream.chunk()).await;
        assert!(matches!(end, Ok(Ok(None))), "the stream ends after closing");
    }
}

fn batch_item(i: usize) -> Value {
    json!({
        "custom_id": format!("item-{i}"),
        "params": {
            "model": HAIKU,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": format!("SIM_OUTPUT_TOKENS=3 item {i}")}]
        }
    })
}

#[tokio::test]
async fn running_batches_show_their_progress_and_an_eta_from_the_recent_rate() {
    // One location at 120 requests a minute: the runner paces items about
    // 0.5 s apart, so a 10-item batch takes ~5 s.
    let h = Harness::start(&with_admin(
        "[models.\"claude-3-haiku@20240307\"]\nregions = [{ name = \"us-central1\", requests_per_min = 120 }]\n",
    ))
    .await;
    let r = h
        .http
        .post(format!("{}/v1/messages/batches", h.url))
        .json(&json!({ "requests": (0..10).map(batch_item).collect::<Vec<_>>() }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let mut with_eta = None;
    for _ in 0..60 {
        let overview = get_json(&h, "/admin/overview").await;
        let batches = &overview["batches"];
        if let Some(b) = batches["running"].as_array().unwrap().first() {
            assert_eq!(b["id"], id.as_str());
            assert_eq!(b["total"], 10);
            assert_eq!(b["processing_status"], "in_progress");
            let done = ["succeeded", "errored", "canceled", "expired"]
                .iter()
                .map(|k| b[k].as_i64().unwrap())
                .sum::<i64>();
            assert_eq!(b["processing"].as_i64().unwrap(), 10 - done, "{b}");
            if b["eta_secs"].is_number() && b["processing"].as_i64().unwrap() > 0 {
                with_eta = Some(overview.clone());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let overview = with_eta.expect("an ETA while the batch runs");
    let batches = &overview["batches"];
    let rate = batches["items_per_sec"].as_f64().unwrap();
    assert!(rate > 0.0, "{batches}");
    let b = &batches["running"][0];
    let eta = b["eta_secs"].as_f64().unwrap();
    let expected = b["processing"].as_f64().unwrap() / rate;
    assert!(
        (eta - expected).abs() <= 0.1 + expected * 0.01,
        "eta {eta} for {expected}"
    );
    assert_eq!(batches["open_items"], b["processing"]);
    assert_eq!(batches["in_progress"], 1);

    // Once it ends it is no longer listed.
    let mut ended = false;
    for _ in 0..120 {
        let overview = get_json(&h, "/admin/overview").await;
        if overview["batches"]["running"] == json!([]) {
            assert_eq!(overview["batches"]["in_progress"], 0);
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(ended, "the batch ended");
}
