//! `spillway demo`: the gateway in front of the bundled Vertex simulator,
//! with everything a newcomer wants to look at switched on.
//!
//! - The simulator enforces Vertex's default quotas (60 requests and 50,000
//!   tokens a minute per region and model), so what Spillway does about
//!   them is real: nothing here is mocked on Spillway's side.
//! - The admin API is on, with a key made for this run (or
//!   `$SPILLWAY_ADMIN_KEY`), and the demo prints the live page's URL
//!   (`/admin/`, where that key signs in) and a `spillway status` line
//!   that works as pasted.
//! - `--load` adds bounded synthetic traffic from three tenants (see
//!   [`load`]): enough to fill Haiku's budgets in both its regions, queue,
//!   refuse with an honest `retry-after`, and then drain a batch once the
//!   interactive traffic stops.
//!
//! Client auth stays off (loopback only), so the printed curl line needs no
//! key; the load's tenants present keys of their own and are counted as
//! themselves (`server.auth = "none"` still names a tenant whose key it knows).

pub mod load;

use std::net::SocketAddr;

use anyhow::Context;
use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;
use spillway_sim::{SimConfig, Simulator};

/// What `spillway demo` was asked for.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the gateway listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where the simulator listens (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub sim_listen: SocketAddr,
    /// The admin API's key for this run; unset, a new one is printed.
    #[arg(long, env = "SPILLWAY_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,
    /// Send bounded synthetic traffic from three tenants (and a batch).
    #[arg(long)]
    pub load: bool,
    /// How long `--load` sends, in seconds.
    #[arg(long, default_value_t = 120, requires = "load")]
    pub load_secs: u64,
    /// Items in the batch `--load` submits.
    #[arg(long, default_value_t = load::BATCH_ITEMS, requires = "load")]
    pub load_batch_items: usize,
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let mut sim_config = SimConfig::vertex_defaults();
    sim_config.bearer_token = Some("demo-upstream-token".into());
    let sim = Simulator::start(sim_config, args.sim_listen)
        .await
        .context("starting the Vertex simulator")?;
    let sim_url = sim.base_url();
    let admin_key = args
        .admin_key
        .filter(|k| !k.is_empty())
        .unwrap_or_else(spillway_gateway::auth::new_client_key);
    let tenants = if args.load {
        load::Tenant::demo_set()
    } else {
        Vec::new()
    };
    let mut env: Vec<(String, String)> = vec![
        ("SPILLWAY__UPSTREAM__REGIONAL_URL".into(), sim_url.clone()),
        ("SPILLWAY__UPSTREAM__GLOBAL_URL".into(), sim_url.clone()),
        (
            "SPILLWAY__ADMIN__KEY_SHA256".into(),
            spillway_gateway::auth::hash_key(&admin_key),
        ),
    ];
    for t in &tenants {
        let name = t.name.to_uppercase();
        env.push((
            format!("SPILLWAY__TENANTS__{name}__KEY_SHA256"),
            spillway_gateway::auth::hash_key(&t.key),
        ));
        env.push((
            format!("SPILLWAY__TENANTS__{name}__WEIGHT"),
            t.weight.to_string(),
        ));
    }
    let env = env
        .into_iter()
        .chain(std::env::vars().filter(|(k, _)| k.starts_with("SPILLWAY__")))
        .chain([(
            "SPILLWAY__SERVER__LISTEN".to_string(),
            args.listen.to_string(),
        )])
        .collect();
    let settings = Settings::load_layers(&[DEMO_TOML], &[], Some(env))?;
    let _flush_logs = crate::init_logging(settings.server.log_format);
    let gateway = Gateway::new(settings).await?;
    let listener = gateway.bind().await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "spillway".into());
    println!("Spillway demo: gateway on {url}, simulated Vertex AI on {sim_url}");
    println!("Try:");
    println!(
        "  curl -s {url}/v1/messages -H 'content-type: application/json' \\\n    -d '{{\"model\":\"claude-3-haiku@20240307\",\"max_tokens\":64,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello, Claude\"}}]}}'"
    );
    println!("Watch the budgets live in a browser: {url}/admin/");
    println!("  sign in there with this run's admin key: {admin_key}");
    println!("or in a terminal (the admin key is this run's own):");
    println!("  {exe} status --url {url} --admin-key {admin_key}");
    if !args.load {
        println!("Add --load for synthetic traffic that fills, spills, queues, refuses and drains a batch.");
    }
    println!("Press Ctrl-C to stop.");
    let load = args.load.then(|| {
        tokio::spawn(load::run(
            url.clone(),
            tenants,
            args.load_secs,
            args.load_batch_items,
        ))
    });
    gateway.serve(listener, crate::shutdown_signal()).await?;
    if let Some(load) = load {
        load.abort();
    }
    sim.shutdown().await;
    Ok(())
}
