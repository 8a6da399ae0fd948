//! `spillway-bench soak-client`: the load side of the soak, run as its own
//! process by `spillway-bench soak` (see `soak`), so that its 9,000 sockets,
//! its memory and its CPU are not the gateway's and do not share the
//! gateway's open-file limit.
//!
//! Each of `-n` slots opens its own TCP connection and sends one streaming
//! Messages request over raw HTTP/1.1, then reads the chunked SSE body to the
//! end. No HTTP library: a slot is a socket, a 2 KiB read buffer and a few
//! counters, so the client stays light beside 9,000 streams (a pooled client
//! would add its own buffers and channels per connection, which would be
//! measured nowhere but would slow the box the gateway runs on).
//!
//! Every request asks the simulator (`SIM_OUTPUT_TOKENS=`) for as many tokens
//! as there are pacing steps until the end of the soak, so all streams end
//! together at `ramp + duration` whether they were first opened or opened
//! again after a drop. Slots start at `--ramp-per-sec`; every
//! `--drop-every-secs` the client picks `--drop-percent` of the open streams
//! at random and closes their connections mid-stream (what a crashed or
//! impatient client does), and those slots reconnect at once with a new
//! request for the time left. A request that fails (non-200, connection
//! error, body ending before `message_stop`) is counted and retried after a
//! second.
//!
//! Progress goes to stdout as one JSON object a second (`"kind":"progress"`),
//! and a last one (`"kind":"final"`) when every slot is done; `soak` reads
//! them. Traffic goes only to the address given.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a soak client does (from its command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// The gateway (loopback).
    pub addr: SocketAddr,
    /// Concurrent streams.
    pub streams: usize,
    /// Seconds all streams are held once the ramp is done.
    pub duration: Duration,
    /// New streams opened per second while ramping.
    pub ramp_per_sec: u32,
    /// The simulator's pause between tokens (as configured by `soak`).
    pub pace: Duration,
    /// Share of open streams dropped at each drop tick, in percent.
    pub drop_percent: f64,
    /// Time between drop ticks.
    pub drop_every: Duration,
    /// Model asked for.
    pub model: String,
}

/// Counters shared by every slot.
#[derive(Default)]
struct Counters {
    /// Requests sent (first attempts, reconnects after drops, retries).
    requests: AtomicU64,
    /// Streams whose `message_start` arrived and that have not ended.
    open: AtomicU64,
    /// Most `open` seen.
    peak_open: AtomicU64,
    /// Streams read to `message_stop`.
    completed: AtomicU64,
    /// Streams closed on purpose mid-stream.
    dropped: AtomicU64,
    /// New requests sent after a drop.
    reconnected: AtomicU64,
    /// Non-200 answers.
    http_errors: AtomicU64,
    /// Connection errors, and bodies that ended without `message_stop`.
    stream_errors: AtomicU64,
    /// SSE events read, all streams.
    events: AtomicU64,
    /// Slots that gave up or were still running at the deadline.
    unfinished: AtomicU64,
    /// The first error's text, to make a failed run readable.
    first_error: Mutex<Option<String>>,
}

impl Counters {
    fn error(&self, counter: &AtomicU64, text: String) {
        counter.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(text);
    }

    fn opened(&self) {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_open.fetch_max(now, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One line on stdout.
#[derive(Debug, Serialize)]
struct Line {
    kind: &'static str,
    elapsed_s: f64,
    /// Whether every slot has had its first stream opened (the ramp is over).
    ramped: bool,
    requests: u64,
    open: u64,
    peak_open: u64,
    completed: u64,
    dropped: u64,
    reconnected: u64,
    http_errors: u64,
    stream_errors: u64,
    events: u64,
    unfinished: u64,
    first_error: Option<String>,
}

/// A slot's handle, as the dropper sees it.
struct Slot {
    /// Whether the slot's stream is open (so a drop would cut it mid-stream).
    open: AtomicBool,
    /// Wakes the slot to close its connection.
    drop: Notify,
}

/// Runs the client to the end and prints its lines. Errors only if the
/// runtime cannot run it; failed requests are counted, not returned.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    anyhow::ensure!(opts.streams > 0, "-n must be at least 1");
    anyhow::ensure!(opts.ramp_per_sec > 0, "--ramp-per-sec must be at least 1");
    anyhow::ensure!(!opts.pace.is_zero(), "the pace must be above zero");
    let t0 = Instant::now();
    let ramp = Duration::from_secs_f64(opts.streams as f64 / f64::from(opts.ramp_per_sec));
    let end = t0 + ramp + opts.duration;
    let counters = Arc::new(Counters::default());
    let ramped = Arc::new(AtomicU64::new(0));
    let slots: Arc<Vec<Slot>> = Arc::new(
        (0..opts.streams)
            .map(|_| Slot {
                open: AtomicBool::new(false),
                drop: Notify::new(),
            })
            .collect(),
    );
    let opts = Arc::new(opts);

    let mut tasks = Vec::with_capacity(opts.streams);
    for i in 0..opts.streams {
        let start = t0 + Duration::from_secs_f64(i as f64 / f64::from(opts.ramp_per_sec));
        let (opts, counters, slots, ramped) = (
            Arc::clone(&opts),
            Arc::clone(&counters),
            Arc::clone(&slots),
            Arc::clone(&ramped),
        );
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            ramped.fetch_add(1, Ordering::Relaxed);
            run_slot(&opts, &counters, &slots[i], end).await;
        }));
    }

    let dropper = tokio::spawn(drop_ticks(Arc::clone(&opts), Arc::clone(&slots), t0, end));
    let reporter = {
        let (counters, ramped, n) = (Arc::clone(&counters), Arc::clone(&ramped), opts.streams);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let done = ramped.load(Ordering::Relaxed) as usize >= n;
                print_line("progress", t0, done, &counters);
            }
        })
    };

    // Every stream ends at `end`; past a minute more something is stuck,
    // and the slot is reported as unfinished rather than waited on forever.
    let deadline = end + Duration::from_secs(60);
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout_at(deadline, t).await.is_err() {
            abort.abort();
            counters.unfinished.fetch_add(1, Ordering::Relaxed);
        }
    }
    dropper.abort();
    reporter.abort();
    let done = ramped.load(Ordering::Relaxed) as usize >= opts.streams;
    print_line("final", t0, done, &counters);
    Ok(())
}

fn print_line(kind: &'static str, t0: Instant, ramped: bool, c: &Counters) {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let line = Line {
        kind,
        elapsed_s: t0.elapsed().as_secs_f64(),
        ramped,
        requests: get(&c.requests),
        open: get(&c.open),
        peak_open: get(&c.peak_open),
        completed: get(&c.completed),
        dropped: get(&c.dropped),
        reconnected: get(&c.reconnected),
        http_errors: get(&c.http_errors),
        stream_errors: get(&c.stream_errors),
        events: get(&c.events),
        unfinished: get(&c.unfinished),
        first_error: c
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    };
    if let Ok(text) = serde_json::to_string(&line) {
        println!("{text}");
    }
}

/// Every `drop_every`, closes `drop_percent` of the open streams, chosen at
/// random (a fixed-seed xorshift: the same run drops the same slots).
async fn drop_ticks(opts: Arc<Options>, slots: Arc<Vec<Slot>>, t0: Instant, end: Instant) {
    if opts.drop_percent <= 0.0 || opts.drop_every.is_zero() {
        return;
    }
    let per_tick = ((opts.streams as f64 * opts.drop_percent / 100.0).ceil() as usize).max(1);
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut at = t0 + opts.drop_every;
    // No drop in the last tick: a reconnect needs time to open before the end.
    while at + opts.drop_every < end {
        tokio::time::sleep_until(at).await;
        let mut picked = 0;
        // Closed or reconnecting slots are skipped; a few tries per pick.
        for _ in 0..per_tick * 4 {
            if picked == per_tick {
                break;
            }
            let slot = &slots[(next() % slots.len() as u64) as usize];
            if slot.open.swap(false, Ordering::AcqRel) {
                slot.drop.notify_one();
                picked += 1;
            }
        }
        at += opts.drop_every;
    }
}

/// How one request ended.
enum Ended {
    Completed,
    Dropped,
    Failed,
}

async fn run_slot(opts: &Options, counters: &Counters, slot: &Slot, end: Instant) {
    loop {
        let now = Instant::now();
        // Too close to the end for a stream worth opening.
        if now + opts.pace * 2 >= end {
            return;
        }
        // One token now, then one per pace until the end.
        let left = end.duration_since(now).as_secs_f64();
        let tokens = (left / opts.pace.as_secs_f64()).ceil() as u64 + 1;
        counters.requests.fetch_add(1, Ordering::Relaxed);
        match one_stream(opts, counters, slot, tokens).await {
            Ended::Completed => {
                counters.completed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Ended::Dropped => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                counters.reconnected.fetch_add(1, Ordering::Relaxed);
            }
            Ended::Failed => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

async fn one_stream(opts: &Options, counters: &Counters, slot: &Slot, tokens: u64) -> Ended {
    let body = format!(
        r#"{{"model":"{}","max_tokens":{tokens},"stream":true,"messages":[{{"role":"user","content":"Soak stream, hold it open. SIM_OUTPUT_TOKENS={tokens}"}}]}}"#,
        opts.model
    );
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\naccept: text/event-stream\r\ncontent-length: {}\r\n\r\n{body}",
        opts.addr,
        body.len()
    );
    let mut socket = match TcpStream::connect(opts.addr).await {
        Ok(s) => s,
        Err(e) => {
            counters.error(&counters.stream_errors, format!("connect: {e}"));
            return Ended::Failed;
        }
    };
    let _ = socket.set_nodelay(true);
    if let Err(e) = socket.write_all(request.as_bytes()).await {
        counters.error(&counters.stream_errors, format!("write: {e}"));
        return Ended::Failed;
    }

    let mut buf = [0u8; 2048];
    let mut filled = 0;
    // The head: status line and headers, then the body's first bytes.
    let body_start = loop {
        if filled == buf.len() {
            counters.error(&counters.stream_errors, "response head over 2 KiB".into());
            return Ended::Failed;
        }
        match socket.read(&mut buf[filled..]).await {
            Ok(0) => {
                counters.error(&counters.stream_errors, "closed before the head".into());
                return Ended::Failed;
            }
            Ok(n) => filled += n,
            Err(e) => {
                counters.error(&counters.stream_errors, format!("read head: {e}"));
                return Ended::Failed;
            }
        }
        if let Some(p) = find(&buf[..filled], b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..body_start]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        let status = head.lines().next().unwrap_or("").trim().to_string();
        let rest = String::from_utf8_lossy(&buf[body_start..filled]).into_owned();
        counters.error(&counters.http_errors, format!("{status}: {rest}"));
        return Ended::Failed;
    }
    if !head.contains("transfer-encoding: chunked") {
        counters.error(&counters.stream_errors, "200 without a chunked body".into());
        return Ended::Failed;
    }

    let mut body = BodyReader::default();
    let mut open = false;
    let mut pending = body_start..filled;
    loop {
        body.feed(&buf[pending.clone()]);
        counters
            .events
            .fetch_add(std::mem::take(&mut body.new_events), Ordering::Relaxed);
        if body.started && !open {
            open = true;
            counters.opened();
            slot.open.store(true, Ordering::Release);
        }
        if body.stopped || body.chunks_done {
            break;
        }
        let read = tokio::select! {
            // Only an open stream is dropped (the dropper checks `open`).
            _ = slot.drop.notified(), if open => {
                drop(socket);
                counters.closed();
                return Ended::Dropped;
            }
            read = socket.read(&mut buf) => read,
        };
        match read {
            Ok(0) => break,
            Ok(n) => pending = 0..n,
            Err(e) => {
                if open {
                    slot.open.store(false, Ordering::Release);
                    counters.closed();
                }
                counters.error(&counters.stream_errors, format!("read body: {e}"));
                return Ended::Failed;
            }
        }
    }
    if open {
        slot.open.store(false, Ordering::Release);
        counters.closed();
    }
    if body.stopped {
        Ended::Completed
    } else {
        let why = if body.error_event {
            "an error event"
        } else {
            "the body ended without message_stop"
        };
        counters.error(&counters.stream_errors, why.into());
        Ended::Failed
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where the chunked-encoding decoder is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (hex digits, maybe `;ext`, CRLF).
    #[default]
    Size,
    /// Skipping a chunk extension to the end of the size line.
    Extension,
    /// This many data bytes are left in the chunk.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// The last (zero-size) chunk was read.
    Done,
}

/// An HTTP/1.1 chunked body decoded on the fly, its SSE `event:` lines
/// counted. Keeps 32 bytes of each line: enough for an event's name.
#[derive(Default)]
struct BodyReader {
    chunk: Chunk,
    size: u64,
    line: [u8; 32],
    line_len: usize,
    new_events: u64,
    started: bool,
    stopped: bool,
    error_event: bool,
    chunks_done: bool,
}

impl BodyReader {
    fn feed(&mut self, mut bytes: &[u8]) {
        while let Some((&b, rest)) = bytes.split_first() {
            match self.chunk {
                Chunk::Size => match b {
                    b'\n' => self.size_line_read(),
                    b';' => self.chunk = Chunk::Extension,
                    _ => {
                        if let Some(d) = (b as char).to_digit(16) {
                            self.size = self.size.saturating_mul(16).saturating_add(u64::from(d));
                        }
                    }
                },
                Chunk::Extension => {
                    if b == b'\n' {
                        self.size_line_read();
                    }
                }
                Chunk::Data(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(bytes.len());
                    let (data, rest) = bytes.split_at(take);
                    self.lines(data);
                    let left = left - take as u64;
                    self.chunk = if left == 0 {
                        Chunk::DataEnd
                    } else {
                        Chunk::Data(left)
                    };
                    bytes = rest;
                    continue;
                }
                Chunk::DataEnd => {
                    if b == b'\n' {
                        self.chunk = Chunk::Size;
                    }
                }
                Chunk::Done => return,
            }
            bytes = rest;
        }
    }

    /// The end of a chunk-size line: its data next, or the body's end.
    fn size_line_read(&mut self) {
        self.chunk = if self.size == 0 {
            self.chunks_done = true;
            Chunk::Done
        } else {
            Chunk::Data(self.size)
        };
        self.size = 0;
    }

    /// Scans decoded body bytes line by line for `event: <name>`.
    fn lines(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                let line = &self.line[..self.line_len];
                if let Some(name) = line.strip_prefix(b"event:") {
                    self.new_events += 1;
                    match name.trim_ascii() {
                        b"message_start" => self.started = true,
                        b"message_stop" => self.stopped = true,
                        b"error" => self.error_event = true,
                        _ => {}
                    }
                }
                self.line_len = 0;
            } else if self.line_len < self.line.len() {
                self.line[self.line_len] = b;
                self.line_len += 1;
            }
        }
    }
}

/// `spillway-bench soak-client` (started by `soak`; see the module docs).
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The gateway, `IP:PORT` (loopback).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Concurrent streams.
    #[arg(short, default_value_t = 9000)]
    pub n: usize,
    /// Seconds the streams are held after the ramp.
    #[arg(long, default_value_t = 300)]
    pub duration_secs: u64,
    /// Streams opened per second while ramping.
    #[arg(long, default_value_t = 300)]
    pub ramp_per_sec: u32,
    /// The simulator's pause between tokens, in ms (as `soak` sets it).
    #[arg(long, default_value_t = 1000)]
    pub pace_ms: u64,
    /// Open streams dropped (and reconnected) at each drop tick, in percent.
    #[arg(long, default_value_t = 1.0)]
    pub drop_percent: f64,
    /// Seconds between drop ticks.
    #[arg(long, default_value_t = 10)]
    pub drop_every_secs: u64,
    /// Model asked for.
    #[arg(long, default_value = "claude-3-haiku@20240307")]
    pub model: String,
}

impl From<Args> for Options {
    fn from(a: Args) -> Self {
        Options {
            addr: a.addr,
            streams: a.n,
            duration: Duration::from_secs(a.duration_secs),
            ramp_per_sec: a.ramp_per_sec,
            pace: Duration::from_millis(a.pace_ms),
            drop_percent: a.drop_percent,
            drop_every: Duration::from_secs(a.drop_every_secs),
            model: a.model,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &[&str]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(format!("{:x}\r\n{p}\r\n", p.len()).as_bytes());
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    #[test]
    fn events_are_counted_across_chunk_and_read_boundaries() {
        let body = chunked(&[
            "event: message_start\ndata: {}\n\nevent: ping\ndata: {}\n\nevent: content_",
            "block_delta\ndata: {\"x\":1}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"   }\n\n",
        ]);
        // Every split point of the raw bytes gives the same count.
        for split in 0..body.len() {
            let mut r = BodyReader::default();
            r.feed(&body[..split]);
            r.feed(&body[split..]);
            assert_eq!(r.new_events, 4, "split at {split}");
            assert!(r.started && r.stopped && r.chunks_done);
        }
    }

    #[test]
    fn a_body_cut_short_is_not_stopped() {
        let body = chunked(&["event: message_start\ndata: {}\n\nevent: error\ndata: {}\n\n"]);
        let mut r = BodyReader::default();
        r.feed(&body[..body.len() - 5]);
        assert!(r.started && !r.stopped && !r.chunks_done && r.error_event);
    }

    #[test]
    fn chunk_extensions_are_skipped() {
        let mut r = BodyReader::default();
        r.feed(b"15;name=v\r\nevent: message_stop\n\n\r\n0\r\n\r\n");
        assert!(r.stopped && r.chunks_done);
    }
}
