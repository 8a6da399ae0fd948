//! The bounded queue and the export task.
//!
//! [`Queue::push`] is the request path's whole share: a `try_send` into a
//! channel of `queue_size` spans, which fails at once when it is full (the
//! span is dropped and counted). One task on the runtime takes what is
//! queued, `batch_size` spans at a time or whatever arrived within
//! `export_interval_ms` of the first, and awaits one OTLP/HTTP export,
//! bounded by `export_timeout_ms` (the exporter's own retries included);
//! a batch that fails or times out is dropped and counted. At shutdown the
//! task sends what is queued and stops; the caller bounds that with the
//! time the shutdown grace leaves, and anything still held when it runs out
//! is counted as dropped too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::TelemetrySettings;
use crate::metrics::Metrics;

/// What drops and exports are counted in.
#[derive(Clone)]
struct Counters {
    exported: IntCounter,
    queue_full: IntCounter,
    export_failed: IntCounter,
    shutdown: IntCounter,
}

impl Counters {
    fn of(metrics: &Metrics) -> Self {
        let dropped = |reason| metrics.trace_spans_dropped.with_label_values(&[reason]);
        Self {
            exported: metrics.trace_spans_exported.clone(),
            queue_full: dropped("queue_full"),
            export_failed: dropped("export_failed"),
            shutdown: dropped("shutdown"),
        }
    }
}

/// The request path's end of the queue.
pub(super) struct Queue {
    tx: mpsc::Sender<SpanData>,
    closed: AtomicBool,
    counters: Counters,
}

impl Queue {
    /// Queues a span, or drops and counts it: never waits.
    pub(super) fn push(&self, span: SpanData) {
        if self.closed.load(Ordering::Relaxed) {
            self.counters.shutdown.inc();
            return;
        }
        match self.tx.try_send(span) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.counters.queue_full.inc(),
            Err(TrySendError::Closed(_)) => self.counters.shutdown.inc(),
        }
    }

    /// Drops and counts `spans` spans without building them when the
    /// queue is full or closed: with the collector down the queue stays
    /// full, so a request then costs what it costs with traces off, not
    /// the building of spans that would be thrown away.
    pub(super) fn refuse_unbuilt(&self, spans: u64) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            self.counters.shutdown.inc_by(spans);
            true
        } else if self.tx.capacity() == 0 {
            self.counters.queue_full.inc_by(spans);
            true
        } else {
            false
        }
    }

    /// Takes no more spans (shutdown).
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// The export task, for stopping it.
pub(super) struct Handle {
    stop: CancellationToken,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Handle {
    /// Asks the task to send what is queued and stop, and waits for it at
    /// most `within`; past that it is aborted (what it held is counted as
    /// dropped by its guard).
    pub(super) async fn stop(&self, within: Duration) {
        self.stop.cancel();
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(mut task) = task else { return };
        if tokio::time::timeout(within, &mut task).await.is_err() {
            task.abort();
            let _ = task.await;
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "shutdown: spans still queued were dropped (the collector did not take them in time)"
            );
        }
    }
}

/// Builds the exporter and spawns its task.
pub(super) fn start(
    settings: &TelemetrySettings,
    resource: Resource,
    metrics: &Metrics,
) -> Result<(Queue, Handle), String> {
    let timeout = Duration::from_millis(settings.export_timeout_ms);
    // Our client: ring (no second TLS stack), no redirects (the headers are
    // credentials), every request bounded by the export timeout.
    let client = crate::tls::http_client_builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(5)))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("telemetry: building the exporter's HTTP client: {e}"))?;
    let headers: HashMap<String, String> = settings
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(settings.traces_url())
        .with_timeout(timeout)
        .with_headers(headers)
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    exporter.set_resource(&resource);
    let (tx, rx) = mpsc::channel(settings.queue_size);
    let counters = Counters::of(metrics);
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Exporting {
            rx,
            batch: Vec::with_capacity(settings.batch_size),
            batch_size: settings.batch_size,
            interval: Duration::from_millis(settings.export_interval_ms),
            timeout,
            counters: counters.clone(),
            failing: false,
            in_flight: 0,
        }
        .run(exporter, stop.clone()),
    );
    Ok((
        Queue {
            tx,
            closed: AtomicBool::new(false),
            counters,
        },
        Handle {
            stop,
            task: Mutex::new(Some(task)),
        },
    ))
}

/// The export task's state. Dropped (ended or aborted), it counts what it
/// still held as dropped at shutdown.
struct Exporting {
    rx: mpsc::Receiver<SpanData>,
    batch: Vec<SpanData>,
    batch_size: usize,
    interval: Duration,
    timeout: Duration,
    counters: Counters,
    /// The last export failed (logged once per outage, not per batch).
    failing: bool,
    /// Spans of the export under way (lost if the task is aborted).
    in_flight: usize,
}

impl Exporting {
    async fn run(mut self, exporter: opentelemetry_otlp::SpanExporter, stop: CancellationToken) {
        loop {
            // The first span of a batch (or the stop).
            tokio::select! {
                biased;
                n = self.rx.recv_many(&mut self.batch, self.batch_size) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = stop.cancelled() => break,
            }
            // The rest of it, until it is full or the interval is over.
            let deadline = tokio::time::Instant::now() + self.interval;
            while self.batch.len() < self.batch_size {
                let room = self.batch_size - self.batch.len();
                tokio::select! {
                    biased;
                    n = self.rx.recv_many(&mut self.batch, room) => {
                        if n == 0 {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => break,
                    _ = stop.cancelled() => break,
                }
            }
            self.export(&exporter).await;
            if stop.is_cancelled() {
                break;
            }
        }
        // Shutdown: what is queued goes out in batches; nothing more comes in.
        self.rx.close();
        loop {
            while self.batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(span) => self.batch.push(span),
                    Err(_) => break,
                }
            }
            if self.batch.is_empty() {
                break;
            }
            self.export(&exporter).await;
        }
    }

    /// Sends the batch in hand, counting its spans as exported or dropped.
    async fn export(&mut self, exporter: &opentelemetry_otlp::SpanExporter) {
        let spans = std::mem::replace(&mut self.batch, Vec::with_capacity(self.batch_size));
        let n = spans.len() as u64;
        if n == 0 {
            return;
        }
        self.in_flight = spans.len();
        let exported = tokio::time::timeout(self.timeout, exporter.export(spans)).await;
        self.in_flight = 0;
        let error = match exported {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!(
                "no answer within telemetry.export_timeout_ms ({} ms)",
                self.timeout.as_millis()
            )),
        };
        match error {
            None => {
                self.counters.exported.inc_by(n);
                if self.failing {
                    self.failing = false;
                    tracing::info!("trace export works again");
                }
            }
            Some(error) => {
                self.counters.export_failed.inc_by(n);
                if !self.failing {
                    self.failing = true;
                    tracing::warn!(
                        %error,
                        spans = n,
                        "trace export failed; spans are dropped (spillway_trace_spans_dropped_total{{reason=\"export_failed\"}}) until the collector takes them again; requests are not affected"
                    );
                }
            }
        }
    }
}

impl Drop for Exporting {
    fn drop(&mut self) {
        let held = self.batch.len() + self.in_flight + self.rx.len();
        if held > 0 {
            self.counters.shutdown.inc_by(held as u64);
        }
    }
}
