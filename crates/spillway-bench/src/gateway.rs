//! A real gateway in this process, over loopback, in front of a simulator:
//! the demo config, the simulator's URL for every location, and an overlay.

use std::collections::HashMap;

use spillway_gateway::config::{Settings, DEMO_TOML};
use spillway_gateway::Gateway;

/// A gateway serving until this is dropped.
pub struct RunningGateway {
    /// `http://127.0.0.1:PORT`
    pub url: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

/// Starts a gateway on a free loopback port with `overlay` over the demo
/// config, every location's upstream at `sim_url`.
pub async fn start(sim_url: &str, overlay: &str) -> anyhow::Result<RunningGateway> {
    let env: HashMap<String, String> = [
        ("SPILLWAY__UPSTREAM__REGIONAL_URL", sim_url),
        ("SPILLWAY__UPSTREAM__GLOBAL_URL", sim_url),
        ("SPILLWAY__SERVER__LISTEN", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let settings = Settings::load_layers(&[DEMO_TOML, overlay], &[], Some(env))?;
    let gateway = Gateway::new(settings).await?;
    let listener = gateway.bind().await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.serve(listener, async {
        let _ = stopped.await;
    }));
    Ok(RunningGateway { url, _stop: stop })
}
