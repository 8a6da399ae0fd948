//! `spillway status`: the live quota table, who holds each pool, and each
//! tenant's spend today and this month against its caps, from the admin
//! API (`/admin/quotas`, `/admin/shares`, `/admin/tenants`), refreshed in
//! the terminal.

use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Limits {
    requests_per_min: u32,
    tokens_per_min: Option<u64>,
    #[serde(default)]
    input_tokens_per_min: Option<u64>,
    #[serde(default)]
    output_tokens_per_min: Option<u64>,
}

impl Limits {
    /// Input plus output tokens a window allows: the combined limit, or
    /// the split ones summed (Vertex's today, Anthropic's).
    fn tokens(&self) -> u64 {
        self.tokens_per_min.unwrap_or_else(|| {
            self.input_tokens_per_min.unwrap_or(0) + self.output_tokens_per_min.unwrap_or(0)
        })
    }
}

#[derive(Debug, Deserialize)]
struct Usage {
    requests: u32,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Debug, Deserialize)]
struct Quota {
    model: String,
    region: String,
    /// Absent from gateways older than the overflow provider: Vertex.
    #[serde(default = "vertex")]
    provider: String,
    configured: Limits,
    effective: Limits,
    used: Usage,
    in_flight: Usage,
    cooldown_ms: u64,
    drained: bool,
    queued_interactive: usize,
    queued_batch: usize,
}

fn vertex() -> String {
    "vertex".into()
}

#[derive(Debug, Deserialize)]
struct TenantShare {
    tenant: String,
    held: f64,
    demand: f64,
    share: f64,
}

#[derive(Debug, Deserialize)]
struct Pool {
    model: String,
    interactive_demand: f64,
    interactive_held: f64,
    batch_held: f64,
    tenants: Vec<TenantShare>,
}

/// A tenant's spend (from `/admin/tenants`).
#[derive(Debug, Deserialize)]
struct TenantSpend {
    name: String,
    #[serde(default)]
    spend_usd_today: f64,
    #[serde(default)]
    spend_usd_month: f64,
    spend_cap_usd_per_day: Option<f64>,
    spend_cap_usd_per_month: Option<f64>,
}

/// Spend per tenant today and this month (UTC), against its caps.
fn render_spend(tenants: &[TenantSpend]) -> String {
    if tenants.is_empty() {
        return String::new();
    }
    // Below a dollar, to the hundredth of a cent: a test load's spend shows.
    let money = |usd: f64| {
        if usd >= 1.0 || usd == 0.0 {
            format!("${usd:.2}")
        } else {
            format!("${usd:.4}")
        }
    };
    let against = |spent: f64, cap: Option<f64>| match cap {
        Some(cap) if cap > 0.0 => format!(
            "{:>11} / {:<11} {:>4.0}%",
            money(spent),
            money(cap),
            spent / cap * 100.0
        ),
        _ => format!("{:>11} / {:<11} {:>5}", money(spent), "-", ""),
    };
    let mut out = format!(
        "\n{:<20} {:>31} {:>31}\n",
        "TENANT", "SPEND TODAY / CAP (UTC)", "THIS MONTH / CAP"
    );
    for t in tenants {
        out.push_str(&format!(
            "{:<20} {:>31} {:>31}\n",
            t.name,
            against(t.spend_usd_today, t.spend_cap_usd_per_day),
            against(t.spend_usd_month, t.spend_cap_usd_per_month)
        ));
    }
    out
}

/// Who is using each model's pool (from `/admin/shares`).
fn render_shares(pools: &[Pool]) -> String {
    if pools.is_empty() {
        return String::new();
    }
    let pct = |f: f64| format!("{:>4.0}%", f * 100.0);
    let mut out = format!(
        "\n{:<28} {:<20} {:>6} {:>7} {:>6}\n",
        "POOL", "WHO", "HELD", "ASKED", "SHARE"
    );
    for p in pools {
        out.push_str(&format!(
            "{:<28} {:<20} {} {:>7} {:>6}\n",
            p.model,
            "interactive",
            pct(p.interactive_held),
            pct(p.interactive_demand),
            ""
        ));
        for t in &p.tenants {
            out.push_str(&format!(
                "{:<28} {:<20} {} {:>7} {:>6}\n",
                "",
                format!("  {}", t.tenant),
                pct(t.held),
                pct(t.demand),
                pct(t.share)
            ));
        }
        out.push_str(&format!(
            "{:<28} {:<20} {}\n",
            "",
            "batch",
            pct(p.batch_held)
        ));
    }
    out
}

fn percent(used: u64, limit: u64) -> String {
    if limit == 0 {
        return "-".into();
    }
    format!("{:>3}%", used * 100 / limit)
}

fn render(quotas: &[Quota]) -> String {
    let mut out = format!(
        "{:<28} {:<16} {:<9} {:>13} {:>5} {:>19} {:>5} {:>9} {:>8} {:>7}\n",
        "MODEL", "REGION", "PROVIDER", "REQUESTS", "", "TOKENS", "", "IN FLIGHT", "QUEUED", "STATE"
    );
    for q in quotas {
        let tokens_used = q.used.input_tokens + q.used.output_tokens;
        let tokens_limit = q.effective.tokens();
        let state = if q.drained {
            "drained".to_string()
        } else if q.cooldown_ms > 0 {
            format!("cool {:.1}s", q.cooldown_ms as f64 / 1000.0)
        } else if q.effective.requests_per_min < q.configured.requests_per_min
            || q.effective.tokens() < q.configured.tokens()
        {
            "learned".to_string()
        } else {
            "ok".to_string()
        };
        out.push_str(&format!(
            "{:<28} {:<16} {:<9} {:>6}/{:<6} {:>5} {:>9}/{:<9} {:>5} {:>9} {:>3}+{:<4} {:>7}\n",
            q.model,
            q.region,
            q.provider,
            q.used.requests,
            q.effective.requests_per_min,
            percent(
                u64::from(q.used.requests),
                u64::from(q.effective.requests_per_min)
            ),
            tokens_used,
            tokens_limit,
            percent(tokens_used, tokens_limit),
            q.in_flight.requests,
            q.queued_interactive,
            q.queued_batch,
            state
        ));
    }
    out
}

pub async fn watch(url: String, admin_key: String, once: bool, every: u64) -> anyhow::Result<()> {
    let client = spillway_gateway::tls::http_client_builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let endpoint = format!("{}/admin/quotas", url.trim_end_matches('/'));
    loop {
        let response = client
            .get(&endpoint)
            .header("x-api-key", &admin_key)
            .send()
            .await
            .with_context(|| format!("cannot reach {endpoint}"))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            anyhow::bail!("{endpoint} answered {status}: {body}");
        }
        let quotas: Vec<Quota> = response
            .json()
            .await
            .context("unexpected admin API answer")?;
        let shares_endpoint = format!("{}/admin/shares", url.trim_end_matches('/'));
        // An older gateway has no /admin/shares: show the quotas alone.
        let pools: Vec<Pool> = match client
            .get(&shares_endpoint)
            .header("x-api-key", &admin_key)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            _ => Vec::new(),
        };
        let tenants_endpoint = format!("{}/admin/tenants", url.trim_end_matches('/'));
        // An older gateway reports no spend: the fields default to 0.
        let tenants: Vec<TenantSpend> = match client
            .get(&tenants_endpoint)
            .header("x-api-key", &admin_key)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
            _ => Vec::new(),
        };
        let table = render(&quotas) + &render_shares(&pools) + &render_spend(&tenants);
        if once {
            print!("{table}");
            return Ok(());
        }
        // Clear the screen and home the cursor, then redraw.
        print!("\x1b[2J\x1b[H{endpoint}  (every {every}s, Ctrl-C to stop)\n\n{table}");
        tokio::time::sleep(Duration::from_secs(every.max(1))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spend_shows_each_tenant_against_its_caps() {
        let tenants: Vec<TenantSpend> = serde_json::from_value(serde_json::json!([
            {"name": "search", "spend_usd_today": 12.5, "spend_usd_month": 310.0,
             "spend_cap_usd_per_day": 50.0, "spend_cap_usd_per_month": 1000.0},
            {"name": "reports", "spend_usd_today": 0.0312, "spend_usd_month": 1.0,
             "spend_cap_usd_per_day": null, "spend_cap_usd_per_month": null},
        ]))
        .unwrap();
        let table = render_spend(&tenants);
        let lines: Vec<&str> = table.lines().filter(|l| !l.is_empty()).collect();
        assert!(
            lines[0].starts_with("TENANT") && lines[0].contains("SPEND TODAY"),
            "{table}"
        );
        assert!(
            lines[1].starts_with("search")
                && lines[1].contains("$12.50 / $50.00")
                && lines[1].contains("25%")
                && lines[1].contains("$310.00 / $1000.00")
                && lines[1].contains("31%"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("reports") && lines[2].contains("$0.0312 / -"),
            "{table}"
        );
        assert_eq!(render_spend(&[]), "");
    }

    #[test]
    fn shares_show_who_holds_each_pool() {
        let pools: Vec<Pool> = serde_json::from_value(serde_json::json!([{
            "model": "claude-3-haiku@20240307",
            "interactive_demand": 6.0, "interactive_held": 0.96, "batch_held": 0.02,
            "tenants": [
                {"tenant": "a", "held": 0.72, "demand": 3.0, "share": 0.75},
                {"tenant": "b", "held": 0.24, "demand": 3.0, "share": 0.25},
            ],
        }]))
        .unwrap();
        let table = render_shares(&pools);
        let lines: Vec<&str> = table.lines().filter(|l| !l.is_empty()).collect();
        assert!(lines[0].starts_with("POOL"), "{table}");
        assert!(
            lines[1].contains("claude-3-haiku@20240307")
                && lines[1].contains("interactive")
                && lines[1].contains("96%"),
            "{table}"
        );
        assert!(
            lines[2].contains("  a") && lines[2].contains("72%") && lines[2].contains("75%"),
            "{table}"
        );
        assert!(
            lines[3].contains("  b") && lines[3].contains("24%") && lines[3].contains("25%"),
            "{table}"
        );
        assert!(
            lines[4].contains("batch") && lines[4].contains("2%"),
            "{table}"
        );
        assert_eq!(render_shares(&[]), "");
    }
}
