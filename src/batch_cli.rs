//! `spillway batch …`: batch jobs from the command line.
//!
//! - `submit FILE.jsonl [--wait]`: streams the file to
//!   `POST /v1/messages/batches` as JSONL (never reading it whole), with a
//!   progress bar of bytes sent; with `--wait`, then polls the batch with a
//!   progress bar of requests finished until it has ended.
//! - `status ID`, `cancel ID`: the batch object, as JSON.
//! - `results ID [--output FILE]`: the results JSONL, streamed.
//!
//! The gateway is `--url` (or `SPILLWAY_URL`), the client key `--key` (or
//! `SPILLWAY_KEY`), sent as `x-api-key`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use tokio::io::AsyncWriteExt;

#[derive(clap::Args)]
pub struct BatchArgs {
    /// The gateway's base URL.
    #[arg(long, env = "SPILLWAY_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The client key (none when the gateway runs without client auth).
    #[arg(long, env = "SPILLWAY_KEY", hide_env_values = true)]
    key: Option<String>,
    #[command(subcommand)]
    command: BatchCommand,
}

#[derive(Subcommand)]
enum BatchCommand {
    /// Submit a JSONL file, one {"custom_id", "params"} per line.
    Submit {
        file: PathBuf,
        /// Wait until the batch has ended, showing progress.
        #[arg(long)]
        wait: bool,
        /// Seconds between polls while waiting.
        #[arg(long, default_value_t = 2)]
        every: u64,
    },
    /// Print a batch (processing status and request counts).
    Status { id: String },
    /// Stream a batch's results (JSONL) to stdout or a file.
    Results {
        id: String,
        #[arg(long, short = 'o')]
        output: Option<PathBuf>,
    },
    /// Cancel a batch: what has not started is canceled.
    Cancel { id: String },
}

struct Client {
    http: reqwest::Client,
    url: String,
    key: Option<String>,
}

impl Client {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.url.trim_end_matches('/')));
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key);
        }
        request
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = request.send().await.context("calling the gateway")?;
        let status = response.status();
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("reading the gateway's answer ({status})"))?;
        if !status.is_success() {
            let message = body["error"]["message"].as_str().unwrap_or("(no message)");
            bail!("{status}: {message}");
        }
        Ok(body)
    }

    async fn batch(&self, id: &str) -> anyhow::Result<Value> {
        self.json(self.request(reqwest::Method::GET, &format!("/v1/messages/batches/{id}")))
            .await
    }
}

pub async fn run(args: BatchArgs) -> anyhow::Result<()> {
    let client = Client {
        http: spillway_gateway::tls::http_client_builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        url: args.url,
        key: args.key,
    };
    match args.command {
        BatchCommand::Submit { file, wait, every } => {
            let batch = submit(&client, &file).await?;
            let id = batch["id"].as_str().unwrap_or_default().to_string();
            if wait {
                let ended = wait_for(&client, &id, Duration::from_secs(every.max(1))).await?;
                println!("{}", serde_json::to_string_pretty(&ended)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&batch)?);
            }
        }
        BatchCommand::Status { id } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&client.batch(&id).await?)?
            );
        }
        BatchCommand::Cancel { id } => {
            let path = format!("/v1/messages/batches/{id}/cancel");
            let batch = client
                .json(client.request(reqwest::Method::POST, &path))
                .await?;
            println!("{}", serde_json::to_string_pretty(&batch)?);
        }
        BatchCommand::Results { id, output } => results(&client, &id, output).await?,
    }
    Ok(())
}

async fn submit(client: &Client, path: &std::path::Path) -> anyhow::Result<Value> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let size = file.metadata().await?.len();
    let bar = ProgressBar::new(size).with_style(
        ProgressStyle::with_template(
            "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    let progress = bar.clone();
    let body =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                progress.inc(chunk.len() as u64);
            }
        });
    let request = client
        .request(reqwest::Method::POST, "/v1/messages/batches")
        .header("content-type", "application/x-ndjson")
        .header("content-length", size)
        .body(reqwest::Body::wrap_stream(body));
    bar.set_message("validating");
    let result = client.json(request).await;
    bar.finish_and_clear();
    let batch = result?;
    eprintln!(
        "submitted {} ({} requests)",
        batch["id"].as_str().unwrap_or("?"),
        batch["request_counts"]["processing"]
    );
    Ok(batch)
}

fn finished(batch: &Value) -> u64 {
    let c = &batch["request_counts"];
    ["succeeded", "errored", "canceled", "expired"]
        .iter()
        .map(|k| c[k].as_u64().unwrap_or(0))
        .sum()
}

async fn wait_for(client: &Client, id: &str, every: Duration) -> anyhow::Result<Value> {
    let mut batch = client.batch(id).await?;
    let total = finished(&batch) + batch["request_counts"]["processing"].as_u64().unwrap_or(0);
    let bar = ProgressBar::new(total).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} requests {per_sec} eta {eta} {msg}")
            .expect("valid template"),
    );
    loop {
        bar.set_position(finished(&batch));
        let c = &batch["request_counts"];
        bar.set_message(format!(
            "{} ok, {} errored{}",
            c["succeeded"],
            c["errored"],
            match batch["processing_status"].as_str() {
                Some("canceling") => ", canceling",
                _ => "",
            }
        ));
        if batch["processing_status"] == "ended" {
            bar.finish();
            return Ok(batch);
        }
        tokio::time::sleep(every).await;
        batch = client.batch(id).await?;
    }
}

async fn results(client: &Client, id: &str, output: Option<PathBuf>) -> anyhow::Result<()> {
    let batch = client.batch(id).await?;
    let Some(url) = batch["results_url"].as_str() else {
        bail!(
            "batch {id} has not ended (processing_status: {})",
            batch["processing_status"]
        );
    };
    // The results URL is the gateway's own; fetch it with the same key.
    let mut request = client.http.get(url);
    if let Some(key) = &client.key {
        request = request.header("x-api-key", key);
    }
    let response = request.send().await.context("fetching results")?;
    if !response.status().is_success() {
        let status = response.status();
        let body: Value = response.json().await.unwrap_or_default();
        bail!("{status}: {}", body["error"]["message"]);
    }
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin + Send> = match output {
        Some(path) => Box::new(
            tokio::fs::File::create(&path)
                .await
                .with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(tokio::io::stdout()),
    };
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        out.write_all(&chunk.context("reading results")?).await?;
    }
    out.flush().await?;
    Ok(())
}
