//! `spillway demo --load`: bounded synthetic traffic, so a newcomer watches
//! Spillway work in `spillway status` instead of reading about it.
//!
//! Three tenants send open-loop traffic (a request leaves on every tick,
//! whether or not the last one came back), as services do:
//!
//! | tenant  | weight | model  | rate    | wait for quota |
//! |---------|--------|--------|---------|----------------|
//! | chat    | 2      | Haiku  | 1.5 / s | 10 s (default), half streamed |
//! | search  | 1      | Haiku  | 1 / s   | 2 s            |
//! | reports | 1      | Sonnet | 0.25 / s| 10 s, longer prompts |
//!
//! Haiku gets 2.5 requests a second against 60 a minute in each of its two
//! regions: both fill within the first minute (the demo routes to the
//! region with the most room, so traffic spreads over us-central1 and
//! europe-west4; `quota.strategy = "ordered"` fills the first, then spills),
//! then requests queue and, past their wait, are refused with a 429 whose
//! `retry-after` says when room returns. `reports` also submits
//! a 40-item batch at the start; it runs on what interactive traffic leaves,
//! which is little until the load stops, and then drains.
//!
//! Every 10 s one line sums up what came back. The load stops after
//! `--load-secs`; the batch is followed until it ends. Nothing here is
//! special-cased in the gateway: these are ordinary HTTP clients.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const HAIKU: &str = "claude-3-haiku@20240307";
const SONNET: &str = "claude-3-sonnet@20240229";
/// Requests one tenant may have open at once; past it a tick is skipped
/// (and counted), so a stalled gateway cannot pile up unbounded work here.
const MAX_OPEN_PER_TENANT: usize = 64;
/// The batch `reports` submits, unless `--load-batch-items` says otherwise.
pub const BATCH_ITEMS: usize = 40;
const REPORT_EVERY: Duration = Duration::from_secs(10);
const BATCH_POLL: Duration = Duration::from_secs(1);

/// One synthetic tenant.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: &'static str,
    pub key: String,
    pub weight: f64,
    model: &'static str,
    per_second: f64,
    max_wait_ms: Option<u64>,
    prompt_chars: usize,
    stream_every: Option<u64>,
}

impl Tenant {
    /// The demo's three tenants, each with a fresh key.
    pub fn demo_set() -> Vec<Tenant> {
        let key = spillway_gateway::auth::new_client_key;
        vec![
            Tenant {
                name: "chat",
                key: key(),
                weight: 2.0,
                model: HAIKU,
                per_second: 1.5,
                max_wait_ms: None,
                prompt_chars: 400,
                stream_every: Some(2),
            },
            Tenant {
                name: "search",
                key: key(),
                weight: 1.0,
                model: HAIKU,
                per_second: 1.0,
                max_wait_ms: Some(2_000),
                prompt_chars: 200,
                stream_every: None,
            },
            Tenant {
                name: "reports",
                key: key(),
                weight: 1.0,
                model: SONNET,
                per_second: 0.25,
                max_wait_ms: None,
                prompt_chars: 6_000,
                stream_every: None,
            },
        ]
    }

    fn body(&self, n: u64) -> Value {
        const SENTENCE: &str = "The quarterly figures are in line with the plan. ";
        let filler = SENTENCE.repeat(self.prompt_chars / SENTENCE.len() + 1);
        let output = 40 + (n % 5) * 30;
        let mut body = json!({
            "model": self.model,
            "max_tokens": 512,
            "messages": [{
                "role": "user",
                "content": format!("{} Summarize request {n}. SIM_OUTPUT_TOKENS={output}", &filler[..self.prompt_chars]),
            }],
        });
        if self.stream_every.is_some_and(|k| n % k == 0) {
            body["stream"] = json!(true);
        }
        body
    }
}

/// What came back, summed over all tenants since the last report.
#[derive(Debug, Default)]
struct Tally {
    ok_by_region: BTreeMap<String, u64>,
    waited_over_1s: u64,
    refused: u64,
    /// The longest `retry-after` among the refusals, in seconds.
    retry_after_max: u64,
    other_errors: u64,
    skipped: u64,
}

impl Tally {
    fn line(&self) -> String {
        let ok: u64 = self.ok_by_region.values().sum();
        let regions: Vec<String> = self
            .ok_by_region
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        let mut line = format!("{ok} ok");
        if !regions.is_empty() {
            line += &format!(" ({})", regions.join(", "));
        }
        line += &format!(", {} waited > 1 s for quota", self.waited_over_1s);
        line += &format!(", {} refused 429", self.refused);
        if self.refused > 0 {
            line += &format!(" (retry-after up to {} s)", self.retry_after_max);
        }
        if self.other_errors > 0 {
            line += &format!(", {} other errors", self.other_errors);
        }
        if self.skipped > 0 {
            line += &format!(", {} not sent (too many open)", self.skipped);
        }
        line
    }
}

/// Sends the load for `secs` seconds, reporting every 10 s, then follows the
/// batch to its end.
pub async fn run(url: String, tenants: Vec<Tenant>, secs: u64, items: usize) {
    let client = match spillway_gateway::tls::http_client_builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .build()
    {
        Ok(c) => c,
        Err(e) => return println!("load: cannot build an HTTP client: {e}"),
    };
    let tally = Arc::new(Mutex::new(Tally::default()));
    // (id, key): a batch is visible only to the tenant that submitted it.
    let batch = match tenants.iter().find(|t| t.name == "reports") {
        Some(t) => submit_batch(&client, &url, t, items)
            .await
            .map(|id| (id, t.key.clone())),
        None => None,
    };
    println!(
        "load: {} tenants for {secs} s{}",
        tenants.len(),
        batch
            .as_ref()
            .map(|(id, _)| format!(", batch {id} ({items} items) submitted"))
            .unwrap_or_default()
    );
    let until = Instant::now() + Duration::from_secs(secs);
    let senders: Vec<_> = tenants
        .into_iter()
        .map(|t| {
            tokio::spawn(send_until(
                client.clone(),
                url.clone(),
                t,
                until,
                Arc::clone(&tally),
            ))
        })
        .collect();
    let mut ticker = tokio::time::interval(REPORT_EVERY);
    ticker.tick().await;
    let started = Instant::now();
    let stop = tokio::time::sleep_until(until.into());
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticker.tick() => report(&client, &url, &tally, batch.as_ref(), items, started).await,
            _ = &mut stop => break,
        }
    }
    // Requests still waiting for quota come back within their wait.
    for s in senders {
        let _ = s.await;
    }
    report(&client, &url, &tally, batch.as_ref(), items, started).await;
    println!("load: stopped; interactive traffic is gone, so the batch gets the quota");
    let Some(batch) = batch else { return };
    let id = &batch.0;
    // Followed closely, reported when it moves (or every 10 s).
    let mut last = (None, Instant::now());
    loop {
        tokio::time::sleep(BATCH_POLL).await;
        match batch_progress(&client, &url, &batch).await {
            Some((status, done)) if status == "ended" => {
                println!("load: batch {id} ended: {done}/{items} items done");
                return;
            }
            Some((_, done)) if last.0 != Some(done) || last.1.elapsed() >= REPORT_EVERY => {
                println!("load: batch {id}: {done}/{items} done");
                last = (Some(done), Instant::now());
            }
            _ => {}
        }
    }
}

async fn report(
    client: &reqwest::Client,
    url: &str,
    tally: &Mutex<Tally>,
    batch: Option<&(String, String)>,
    items: usize,
    started: Instant,
) {
    let line = {
        let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *t).line()
    };
    let batch = match batch {
        Some(batch) => match batch_progress(client, url, batch).await {
            Some((_, done)) => format!("; batch {done}/{items}"),
            None => String::new(),
        },
        None => String::new(),
    };
    println!(
        "load +{:>3}s, last 10 s: {line}{batch}",
        started.elapsed().as_secs()
    );
}

async fn send_until(
    client: reqwest::Client,
    url: String,
    tenant: Tenant,
    until: Instant,
    tally: Arc<Mutex<Tally>>,
) {
    let tenant = Arc::new(tenant);
    let open = Arc::new(tokio::sync::Semaphore::new(MAX_OPEN_PER_TENANT));
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / tenant.per_second));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u64;
    let mut inflight = tokio::task::JoinSet::new();
    while Instant::now() < until {
        ticker.tick().await;
        n += 1;
        let Ok(permit) = Arc::clone(&open).try_acquire_owned() else {
            tally.lock().unwrap_or_else(|p| p.into_inner()).skipped += 1;
            continue;
        };
        let (client, url, tenant, tally) = (
            client.clone(),
            url.clone(),
            Arc::clone(&tenant),
            Arc::clone(&tally),
        );
        inflight.spawn(async move {
            let _permit = permit;
            one_request(&client, &url, &tenant, n, &tally).await;
        });
        while inflight.try_join_next().is_some() {}
    }
    while inflight.join_next().await.is_some() {}
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    tenant: &Tenant,
    n: u64,
    tally: &Mutex<Tally>,
) {
    let sent = Instant::now();
    let mut request = client
        .post(format!("{url}/v1/messages"))
        .header("x-api-key", &tenant.key)
        .header("anthropic-version", "2023-06-01")
        .json(&tenant.body(n));
    if let Some(ms) = tenant.max_wait_ms {
        request = request.header("x-spillway-max-wait-ms", ms.to_string());
    }
    let outcome = match request.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let region = header("x-spillway-region");
            let retry_after = header("retry-after").and_then(|v| v.parse::<u64>().ok());
            // Drain the body (a stream ends when the answer does).
            let whole = resp.bytes().await.is_ok();
            (status, region, retry_after, whole)
        }
        Err(_) => (0, None, None, false),
    };
    let waited = sent.elapsed() > Duration::from_secs(1);
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    match outcome {
        (200, region, _, true) => {
            *t.ok_by_region
                .entry(region.unwrap_or_else(|| "?".into()))
                .or_default() += 1;
            t.waited_over_1s += u64::from(waited);
        }
        (429, _, retry_after, _) => {
            t.refused += 1;
            t.retry_after_max = t.retry_after_max.max(retry_after.unwrap_or(0));
        }
        _ => t.other_errors += 1,
    }
}

async fn submit_batch(
    client: &reqwest::Client,
    url: &str,
    tenant: &Tenant,
    items: usize,
) -> Option<String> {
    let requests: Vec<Value> = (0..items as u64)
        .map(|i| {
            let mut params = tenant.body(i);
            params["model"] = json!(HAIKU);
            params["max_tokens"] = json!(256);
            json!({ "custom_id": format!("report-{i}"), "params": params })
        })
        .collect();
    let resp = client
        .post(format!("{url}/v1/messages/batches"))
        .header("x-api-key", &tenant.key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({ "requests": requests }))
        .send()
        .await
        .ok()?;
    let body: Value = resp.json().await.ok()?;
    body["id"].as_str().map(str::to_owned)
}

/// A batch's processing status and how many items have ended.
async fn batch_progress(
    client: &reqwest::Client,
    url: &str,
    (id, key): &(String, String),
) -> Option<(String, u64)> {
    let body: Value = client
        .get(format!("{url}/v1/messages/batches/{id}"))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let counts = &body["request_counts"];
    let done = ["succeeded", "errored", "canceled", "expired"]
        .iter()
        .filter_map(|k| counts[*k].as_u64())
        .sum();
    Some((body["processing_status"].as_str()?.to_owned(), done))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_line_says_where_requests_went_and_why_some_were_refused() {
        let mut t = Tally::default();
        assert_eq!(t.line(), "0 ok, 0 waited > 1 s for quota, 0 refused 429");
        t.ok_by_region.insert("us-central1".into(), 12);
        t.ok_by_region.insert("europe-west4".into(), 3);
        t.refused = 2;
        t.retry_after_max = 17;
        assert_eq!(
            t.line(),
            "15 ok (europe-west4 3, us-central1 12), 0 waited > 1 s for quota, 2 refused 429 (retry-after up to 17 s)"
        );
    }

    #[test]
    fn bodies_are_valid_messages_and_half_of_chat_streams() {
        let tenants = Tenant::demo_set();
        let chat = &tenants[0];
        assert_eq!(chat.body(2)["stream"], json!(true));
        assert!(chat.body(3).get("stream").is_none());
        for t in &tenants {
            let text = t.body(1)["messages"][0]["content"]
                .as_str()
                .unwrap()
                .to_owned();
            assert!(text.len() >= t.prompt_chars);
            assert!(text.contains("SIM_OUTPUT_TOKENS="));
        }
        let keys: std::collections::HashSet<_> = tenants.iter().map(|t| &t.key).collect();
        assert_eq!(keys.len(), 3);
    }
}
