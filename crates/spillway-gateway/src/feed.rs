//! A value recomputed on a tick while anyone watches it, shared by all
//! watchers: what the live page's event feed (`GET /admin/events`) sends.
//!
//! Why not build the overview once per connection per tick: a page left
//! open in five tabs, or by five operators, would read the stores and
//! serialize the same JSON five times a second. Here one producer task
//! does it once per tick and publishes the encoded frame (`Bytes`, so each
//! connection's copy is a reference count) on a `watch` channel; a
//! connection costs one receiver and the few bytes of its stream's state.
//!
//! The producer runs only while someone watches: the first subscriber
//! starts it, and it stops at the first tick that finds no receiver left
//! (a client that went away drops its receiver with its response body). It
//! then clears the value, so the next subscriber never gets a stale frame
//! from an earlier run. Start and stop are decided under one lock, so a
//! subscriber arriving as the producer stops still gets a producer.
//!
//! Knows nothing of HTTP, the gateway or what it carries: the frame is
//! whatever the producer function returns.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

/// One frame of the feed, as sent (already encoded).
pub type Frame = Bytes;

/// The shared feed; one per gateway.
pub struct Feed {
    tx: watch::Sender<Option<Frame>>,
    /// Whether a producer task is running; held while starting or stopping it.
    running: Mutex<bool>,
}

impl Default for Feed {
    fn default() -> Self {
        Self::new()
    }
}

impl Feed {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(None),
            running: Mutex::new(false),
        }
    }

    /// A receiver of the feed's frames, starting the producer if none runs.
    /// `produce` is called at once and then every `every` for as long as
    /// anyone is subscribed (`None` from it keeps the last frame); it is
    /// used only when this call starts the producer.
    pub fn subscribe<F, Fut>(
        self: &Arc<Self>,
        every: Duration,
        produce: F,
    ) -> watch::Receiver<Option<Frame>>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Option<Frame>> + Send + 'static,
    {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        if !*running {
            *running = true;
            let feed = Arc::clone(self);
            tokio::spawn(async move { feed.produce(every, produce).await });
        }
        rx
    }

    async fn produce<F, Fut>(self: Arc<Self>, every: Duration, produce: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Option<Frame>>,
    {
        let mut tick = tokio::time::interval(every);
        // A slow store delays a frame; it does not send a burst after it.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if self.tx.receiver_count() == 0 {
                let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
                if self.tx.receiver_count() == 0 {
                    self.tx.send_replace(None);
                    *running = false;
                    return;
                }
            }
            if let Some(frame) = produce().await {
                self.tx.send_replace(Some(frame));
            }
        }
    }

    /// Subscribers now (for tests and metrics).
    pub fn watchers(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Whether the producer task is running.
    pub fn is_running(&self) -> bool {
        *self.running.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TICK: Duration = Duration::from_secs(1);

    fn counting(
        calls: &Arc<AtomicUsize>,
    ) -> impl Fn() -> std::future::Ready<Option<Frame>> + Send + 'static {
        let calls = Arc::clone(calls);
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            std::future::ready(Some(Bytes::from(n.to_string())))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn one_producer_serves_every_watcher_and_stops_when_they_leave() {
        let feed = Arc::new(Feed::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let mut a = feed.subscribe(TICK, counting(&calls));
        let mut b = feed.subscribe(TICK, counting(&calls));
        a.changed().await.unwrap();
        assert_eq!(a.borrow_and_update().as_deref(), Some(&b"1"[..]));
        b.changed().await.unwrap();
        assert_eq!(b.borrow_and_update().as_deref(), Some(&b"1"[..]));
        tokio::time::sleep(TICK * 3 + TICK / 2).await;
        // One frame a tick for both: three more calls, not six.
        assert_eq!(calls.load(Ordering::SeqCst), 4);
        assert_eq!(feed.watchers(), 2);
        drop((a, b));
        tokio::time::sleep(TICK * 2).await;
        assert!(!feed.is_running());
        let stopped_at = calls.load(Ordering::SeqCst);
        tokio::time::sleep(TICK * 3).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            stopped_at,
            "no watcher, no work"
        );
        // The next watcher starts it again and never sees the old frame.
        let c = feed.subscribe(TICK, counting(&calls));
        assert!(c.borrow().is_none());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(feed.is_running());
        assert_eq!(
            c.borrow().as_deref(),
            Some(format!("{}", stopped_at + 1).as_bytes())
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_produce_keeps_the_last_frame() {
        let feed = Arc::new(Feed::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let mut rx = feed.subscribe(TICK, move || {
            let n = c.fetch_add(1, Ordering::SeqCst);
            std::future::ready((n == 0).then(|| Bytes::from_static(b"first")))
        });
        rx.changed().await.unwrap();
        tokio::time::sleep(TICK * 2 + TICK / 2).await;
        assert!(calls.load(Ordering::SeqCst) >= 3);
        assert_eq!(rx.borrow().as_deref(), Some(&b"first"[..]));
    }
}
