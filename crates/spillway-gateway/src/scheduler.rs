//! Waiting for quota instead of failing: the admission scheduler.
//!
//! Every request asks the [`QuotaStore`] for a reservation. When no region
//! has room, the request waits — up to its deadline — in its requester's
//! queue (one per model: `ModelSpec::requester`) and is admitted as budget
//! frees. The queue decides *who goes next*:
//!
//! - **Interactive before batch.** A batch request is only considered when
//!   no interactive request of the same requester is waiting.
//! - **Weighted fair share between tenants.** Each waiter gets a virtual
//!   finish tag, `max(V, tenant's last tag) + cost / weight` (weighted fair
//!   queueing, cost = reserved tokens); the smallest tag goes first. A
//!   tenant with weight 3 thus gets three times the quota of a weight-1
//!   tenant while both are waiting, and anyone may use what is idle.
//! - **First come, first served within a tenant**, since its tags grow.
//! - **No starvation.** Only the head may reserve: a large request at the
//!   head is not overtaken by small ones behind it, it waits until its
//!   charge fits.
//!
//! - **Shares over the window** (`with_sharing`). The queue alone decides
//!   little: most admissions find room at once, and a sliding window frees
//!   room in the pattern it was filled. So each requester also keeps a
//!   [`PoolShares`]: while interactive demand exceeds the pool, a tenant
//!   holds at most its weighted max-min share of the window (across every
//!   location of the model; between tenants of different weights), and
//!   batch work holds at most what interactive demand leaves
//!   ([`InteractiveReserve`]). A waiter over its share lets
//!   the waiters behind it go first (work-conserving) and is looked at
//!   again when its oldest admissions leave the window.
//!
//! A request that cannot be admitted before its deadline — the store says
//! the earliest room comes later, or the deadline passes while waiting —
//! gets a [`Rejection`] carrying an honest retry time. A waiter is a future:
//! if the client goes away, the future is dropped and its guard takes it
//! out of the queue and wakes the next in line.
//!
//! **Shared buckets.** Models of one Vertex lineage share one bucket on
//! `global` and the multi-regions but not in regions, so two requesters'
//! candidates overlap in some budgets only, and no one queue can stand for
//! a bucket. Each requester waits in its own queue (fairness holds within
//! it; between requesters sharing a bucket, whichever head asks first
//! takes the room), and every settle wakes every queue's head: a refund
//! in a shared bucket is room for another model's waiters. Heads that find
//! nothing go back to sleep until their store-given retry time.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use spillway_core::capacity::GiveBack;
use spillway_core::ledger::Charge;
use spillway_core::shares::{InteractiveReserve, PoolShares, ShareDecision, TenantShare};
use spillway_core::store::{Denial, Grant, Outcome, QuotaStore, ReserveRequest, Strategy};
use spillway_core::QuotaGroup;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::fast_hash::FastHash;

/// Scheduling class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Interactive = 0,
    Batch = 1,
}

/// What one request asks for.
#[derive(Debug, Clone)]
pub struct Demand {
    /// The requester asking (a model's own key): its wait queue, and what
    /// the store maps to each location's bucket.
    pub group: QuotaGroup,
    pub regions: Vec<Arc<str>>,
    pub charge: Charge,
    pub strategy: Strategy,
    pub priority: Priority,
    pub tenant: Arc<str>,
    pub weight: f64,
    /// The request's part of its model's pool: the larger of its share of
    /// the requests and of the tokens of every location serving the model.
    pub share_cost: f64,
    /// One request's part of the pool's requests: the least it holds once
    /// sent, whatever tokens it used.
    pub share_floor: f64,
    /// Latest time to be admitted (tokio clock).
    pub deadline: Instant,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Rejection {
    /// No room before the deadline; room is expected after `retry_after`.
    NoRoom { retry_after: Duration },
    /// Too many requests already waiting for this requester.
    QueueFull { retry_after: Duration },
    /// The charge can never fit any candidate budget.
    NeverFits,
}

/// One requester's queue as operators see it ([`Scheduler::queue_state`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueState {
    pub interactive: usize,
    pub batch: usize,
    /// How long the longest-waiting interactive request has waited so far.
    pub longest_interactive: Option<Duration>,
    pub longest_batch: Option<Duration>,
}

/// Queue position: class, virtual finish tag (as ordered bits), arrival.
type Ticket = (Priority, u64, u64);

/// What a waiter may do now ([`Scheduler::turn`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Turn {
    /// Try to reserve: as the first waiter under its share, or (not
    /// `under_share`) because nobody under their share can use the room.
    Head { under_share: bool },
    /// Over its share while others wait: look again after this long.
    HeldBack(Duration),
    /// Someone else goes first.
    Wait,
}

/// An admission's place in its pool's shares, until it settles.
struct Admitted {
    /// `None` for batch.
    tenant: Option<Arc<str>>,
    seq: u64,
    cost: f64,
    floor: f64,
    charge: Charge,
}

/// Who a waiting ticket belongs to, for share decisions on its behalf.
#[derive(Clone)]
struct Owner {
    tenant: Arc<str>,
    priority: Priority,
    cost: f64,
    /// When it joined the queue (for operators: the longest wait now).
    since: Instant,
}

#[derive(Default)]
struct WaitQueue {
    waiting: BTreeSet<Ticket>,
    owners: HashMap<u64, Owner, FastHash>,
    shares: PoolShares,
    /// Admissions not yet settled, by (location, store entry).
    admissions: HashMap<(Arc<str>, u64), Vec<Admitted>, FastHash>,
    /// The first waiter under its share last found no room for its
    /// charge (of this priority and pool cost): a smaller waiter over its
    /// share may backfill what room there is.
    head_blocked: Option<(Ticket, Priority, f64)>,
    /// Each tenant's last finish tag.
    tenant_tags: HashMap<Arc<str>, f64, FastHash>,
    /// Virtual time: the start tag of the last admitted waiter.
    virtual_time: f64,
    next_seq: u64,
}

impl WaitQueue {
    fn enqueue(&mut self, demand: &Demand) -> Ticket {
        let last = self.tenant_tags.get(&demand.tenant).copied().unwrap_or(0.0);
        let start = self.virtual_time.max(last);
        // Cost in tokens plus one, so zero-token requests still take turns.
        let finish = start + (demand.charge.total() as f64 + 1.0) / demand.weight.max(1e-6);
        self.tenant_tags.insert(Arc::clone(&demand.tenant), finish);
        self.next_seq += 1;
        let ticket = (demand.priority, finish.to_bits(), self.next_seq);
        self.waiting.insert(ticket);
        self.owners.insert(
            self.next_seq,
            Owner {
                tenant: Arc::clone(&demand.tenant),
                priority: demand.priority,
                cost: demand.share_cost,
                since: Instant::now(),
            },
        );
        ticket
    }

    fn remove(&mut self, ticket: &Ticket) {
        self.waiting.remove(ticket);
        self.owners.remove(&ticket.2);
        self.owners.give_back();
        if self.head_blocked.is_some_and(|(t, ..)| t == *ticket) {
            self.head_blocked = None;
        }
    }

    fn head(&self) -> Option<&Ticket> {
        self.waiting.first()
    }

    /// Whether a new request of this class would have to queue behind someone.
    fn has_waiters_at_or_above(&self, priority: Priority) -> bool {
        self.head().is_some_and(|t| t.0 <= priority)
    }

    fn admitted(&mut self, ticket: &Ticket, charge_cost: f64, weight: f64) {
        self.remove(ticket);
        let finish = f64::from_bits(ticket.1);
        self.virtual_time = self
            .virtual_time
            .max(finish - charge_cost / weight.max(1e-6));
        if self.waiting.is_empty() {
            // Idle: forget history, so nobody is penalized for past use.
            self.tenant_tags.clear();
        }
    }
}

struct GroupQueue {
    queue: Mutex<WaitQueue>,
    changed: Notify,
}

impl GroupQueue {
    fn lock(&self) -> MutexGuard<'_, WaitQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Removes a waiter from its queue however its future ends.
struct Waiting<'a> {
    queue: &'a GroupQueue,
    ticket: Option<Ticket>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(ticket) = self.ticket.take() {
            let mut q = self.queue.lock();
            q.remove(&ticket);
            if q.waiting.is_empty() {
                q.tenant_tags.clear();
            }
            drop(q);
            self.queue.changed.notify_waiters();
        }
    }
}

pub struct Scheduler {
    store: Arc<dyn QuotaStore>,
    /// One wait queue per requester (a model's key). Built once.
    queues: HashMap<QuotaGroup, GroupQueue, FastHash>,
    max_queue: usize,
    /// The admission-decision histogram's handle for each requester.
    decision_seconds: HashMap<QuotaGroup, prometheus::Histogram, FastHash>,
    sharing: Option<InteractiveReserve>,
    /// The origin of the times [`PoolShares`] is given.
    epoch: Instant,
}

impl Scheduler {
    /// A scheduler with a queue for each of `groups`, the requester keys.
    pub fn new(store: Arc<dyn QuotaStore>, groups: &[QuotaGroup], max_queue: usize) -> Self {
        let queues = groups
            .iter()
            .map(|g| {
                (
                    g.clone(),
                    GroupQueue {
                        queue: Mutex::new(WaitQueue::default()),
                        changed: Notify::new(),
                    },
                )
            })
            .collect();
        Self {
            store,
            queues,
            max_queue,
            decision_seconds: HashMap::default(),
            sharing: None,
            epoch: Instant::now(),
        }
    }

    /// Holds tenants to their weighted shares of each model's pool over
    /// `window`, and batch work to what interactive demand leaves.
    pub fn with_sharing(mut self, window: Duration, reserve: InteractiveReserve) -> Self {
        for queue in self.queues.values() {
            queue.lock().shares = PoolShares::new(window);
        }
        self.sharing = Some(reserve);
        self
    }

    fn now(&self) -> Duration {
        Instant::now().duration_since(self.epoch)
    }

    /// The part of the pool this replica shares out: all of it, or 1/N
    /// while replicas divide it.
    fn capacity(&self) -> f64 {
        1.0 / f64::from(self.store.replicas().max(1))
    }

    /// Whether shares let `owner` be admitted now.
    fn share_decision(&self, q: &mut WaitQueue, owner: &Owner) -> ShareDecision {
        let Some(reserve) = self.sharing else {
            return ShareDecision::Admit;
        };
        let decider = q.shares.decider(self.now(), self.capacity(), reserve);
        match owner.priority {
            Priority::Interactive => decider.decide(&owner.tenant, owner.cost),
            Priority::Batch => decider.decide_batch(owner.cost),
        }
    }

    fn note_admitted(&self, q: &mut WaitQueue, demand: &Demand, grant: &Grant) {
        if self.sharing.is_none() {
            return;
        }
        let now = self.now();
        let (seq, tenant) = match demand.priority {
            Priority::Interactive => {
                let (tenant, weight, cost) = (&demand.tenant, demand.weight, demand.share_cost);
                q.shares.asked(tenant, weight, cost, now);
                let seq = q.shares.admitted(tenant, weight, cost, now);
                (seq, Some(Arc::clone(tenant)))
            }
            Priority::Batch => (q.shares.admitted_batch(demand.share_cost, now), None),
        };
        q.admissions
            .entry((Arc::clone(&grant.region), grant.entry.raw()))
            .or_default()
            .push(Admitted {
                tenant,
                seq,
                cost: demand.share_cost,
                floor: demand.share_floor,
                charge: grant.charge,
            });
    }

    /// What a settled request holds of its pool: its share cost scaled to
    /// the tokens it used, never below one request's part (nothing, if it
    /// was never sent).
    fn settle_share(&self, grant: &Grant, outcome: Outcome) {
        if self.sharing.is_none() {
            return;
        }
        let Some(queue) = self.queues.get(&grant.group) else {
            return;
        };
        let mut q = queue.lock();
        let key = (Arc::clone(&grant.region), grant.entry.raw());
        let Some(list) = q.admissions.get_mut(&key) else {
            return;
        };
        // A lease names several grants by one entry: take one of this charge.
        let i = list
            .iter()
            .position(|a| a.charge == grant.charge)
            .unwrap_or(0);
        let a = list.swap_remove(i);
        if list.is_empty() {
            q.admissions.remove(&key);
            q.admissions.give_back();
        }
        let reserved = a.charge.total().max(1) as f64;
        let cost = match outcome {
            Outcome::Used(used) | Outcome::Broken(used) => {
                (a.cost * used.total() as f64 / reserved).max(a.floor)
            }
            Outcome::NotSent => 0.0,
            Outcome::RateLimited(_) | Outcome::Unavailable => a.floor,
        };
        q.shares.settled(a.tenant.as_ref(), a.seq, cost);
    }

    /// A request refused because its tenant was over its share: demand it
    /// could have used. (Refusals for room are not counted: a tenant whose
    /// requests cannot fit must not keep a share nobody can use.)
    fn note_held_back(&self, queue: &GroupQueue, demand: &Demand) {
        if self.sharing.is_some() && demand.priority == Priority::Interactive {
            let now = self.now();
            queue
                .lock()
                .shares
                .asked(&demand.tenant, demand.weight, demand.share_cost, now);
        }
    }

    /// Each model's pool as tenants and batch hold it, for operators:
    /// (requester, tenants, batch held, interactive demand).
    pub fn shares(&self) -> Vec<(QuotaGroup, Vec<TenantShare>, f64, f64)> {
        if self.sharing.is_none() {
            return Vec::new();
        }
        let (now, capacity) = (self.now(), self.capacity());
        let mut out: Vec<_> = self
            .queues
            .iter()
            .map(|(group, queue)| {
                let mut q = queue.lock();
                let tenants = q.shares.report(now, capacity);
                let batch = q.shares.batch_held(now);
                let demand = q.shares.interactive_demand(now);
                (group.clone(), tenants, batch, demand)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Observes the time of each admission decision in `histogram`.
    /// Times every admission decision into `histogram`, by requester
    /// (its one label).
    pub fn with_decision_histogram(mut self, histogram: prometheus::HistogramVec) -> Self {
        self.decision_seconds = self
            .queues
            .keys()
            .map(|g| (g.clone(), histogram.with_label_values(&[g.as_str()])))
            .collect();
        self
    }

    /// One timed call to the store.
    async fn reserve(&self, request: ReserveRequest<'_>) -> Result<Grant, Denial> {
        let started = std::time::Instant::now();
        let result = self.store.reserve(request).await;
        if let Some(h) = self.decision_seconds.get(request.group) {
            h.observe(started.elapsed().as_secs_f64());
        }
        result
    }

    pub fn store(&self) -> &Arc<dyn QuotaStore> {
        &self.store
    }

    /// A store time as a tokio instant. Only the distance from the store's
    /// own `now()` is used, so the store's epoch (process start, or a Redis
    /// server's Unix time) and clock skew between hosts do not matter.
    fn to_instant(&self, store_time: Duration) -> Instant {
        Instant::now() + store_time.saturating_sub(self.store.now())
    }

    /// Requests of requester `group` waiting, by class.
    pub fn queue_depth(&self, group: &QuotaGroup) -> (usize, usize) {
        self.queues.get(group).map_or((0, 0), |q| {
            let q = q.lock();
            let interactive = q
                .waiting
                .iter()
                .filter(|t| t.0 == Priority::Interactive)
                .count();
            (interactive, q.waiting.len() - interactive)
        })
    }

    /// Requester `group`'s queue for operators: how many wait in each class
    /// and how long the longest-waiting of each has been there.
    pub fn queue_state(&self, group: &QuotaGroup) -> QueueState {
        let mut state = QueueState::default();
        let Some(queue) = self.queues.get(group) else {
            return state;
        };
        let now = Instant::now();
        let q = queue.lock();
        for owner in q.owners.values() {
            let waited = now.saturating_duration_since(owner.since);
            let (count, longest) = match owner.priority {
                Priority::Interactive => (&mut state.interactive, &mut state.longest_interactive),
                Priority::Batch => (&mut state.batch, &mut state.longest_batch),
            };
            *count += 1;
            *longest = Some(longest.map_or(waited, |l| l.max(waited)));
        }
        state
    }

    fn retry_after(&self, retry_at: Duration) -> Duration {
        retry_at.saturating_sub(self.store.now())
    }

    /// Admits `demand` now or when budget frees, or rejects it.
    pub async fn admit(&self, demand: &Demand) -> Result<Grant, Rejection> {
        let Some(queue) = self.queues.get(&demand.group) else {
            return Err(Rejection::NeverFits);
        };
        let request = ReserveRequest {
            group: &demand.group,
            regions: &demand.regions,
            charge: demand.charge,
            strategy: demand.strategy,
        };
        let owner = Owner {
            tenant: Arc::clone(&demand.tenant),
            priority: demand.priority,
            cost: demand.share_cost,
            since: Instant::now(),
        };
        // Fast path: nobody ahead of us, and within our share.
        let fast = {
            let mut q = queue.lock();
            !q.has_waiters_at_or_above(demand.priority)
                && self.share_decision(&mut q, &owner) == ShareDecision::Admit
        };
        if fast {
            match self.reserve(request).await {
                Ok(grant) => {
                    self.note_admitted(&mut queue.lock(), demand, &grant);
                    return Ok(grant);
                }
                Err(Denial::Never) => return Err(Rejection::NeverFits),
                Err(Denial::Later { retry_at }) => {
                    if self.to_instant(retry_at) > demand.deadline {
                        return Err(Rejection::NoRoom {
                            retry_after: self.retry_after(retry_at),
                        });
                    }
                }
            }
        } else if Instant::now() >= demand.deadline {
            // Fail fast without jumping the queue.
            return Err(Rejection::NoRoom {
                retry_after: self.estimate_wait(request).await,
            });
        }

        self.wait_in_line(queue, demand, request).await
    }

    /// Queues `demand` (fairly: class, then finish tag) and admits it when
    /// it is at the head and its charge fits, or rejects it at its deadline.
    async fn wait_in_line(
        &self,
        queue: &GroupQueue,
        demand: &Demand,
        request: ReserveRequest<'_>,
    ) -> Result<Grant, Rejection> {
        let ticket = {
            let mut q = queue.lock();
            (q.waiting.len() < self.max_queue).then(|| q.enqueue(demand))
        };
        let Some(ticket) = ticket else {
            return Err(Rejection::QueueFull {
                retry_after: self.estimate_wait(request).await,
            });
        };
        let mut waiting = Waiting {
            queue,
            ticket: Some(ticket),
        };
        loop {
            let changed = queue.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let turn = self.turn(queue, &ticket);
            let wake_at = if let Turn::HeldBack(after) = turn {
                // Over our share: others go first; look again when our
                // oldest admissions leave the window.
                (Instant::now() + after).min(demand.deadline)
            } else if let Turn::Head { under_share } = turn {
                match self.reserve(request).await {
                    Ok(grant) => {
                        let cost = demand.charge.total() as f64 + 1.0;
                        let mut q = queue.lock();
                        q.admitted(&ticket, cost, demand.weight);
                        self.note_admitted(&mut q, demand, &grant);
                        drop(q);
                        waiting.ticket = None;
                        queue.changed.notify_waiters();
                        return Ok(grant);
                    }
                    Err(Denial::Never) => return Err(Rejection::NeverFits),
                    Err(Denial::Later { retry_at }) => {
                        if under_share {
                            queue.lock().head_blocked =
                                Some((ticket, demand.priority, demand.share_cost));
                        }
                        let at = self.to_instant(retry_at);
                        if at > demand.deadline {
                            return Err(Rejection::NoRoom {
                                retry_after: self.retry_after(retry_at),
                            });
                        }
                        // A shared store is also freed by other replicas'
                        // refunds, which wake nobody here: look again soon.
                        match self.store.recheck_after() {
                            Some(every) => at.min(Instant::now() + every),
                            None => at,
                        }
                    }
                }
            } else {
                demand.deadline
            };
            tokio::select! {
                _ = &mut changed => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            let turn = self.turn(queue, &ticket);
            if Instant::now() >= demand.deadline && !matches!(turn, Turn::Head { .. }) {
                let retry_after = match turn {
                    Turn::HeldBack(after) => {
                        self.note_held_back(queue, demand);
                        after.max(Duration::from_millis(1))
                    }
                    _ => self.estimate_wait(request).await,
                };
                return Err(Rejection::NoRoom { retry_after });
            }
        }
    }

    /// Whether `ticket` may try now:
    /// - the first waiter, in queue order, under its share goes next (so a
    ///   tenant over its share never blocks the others);
    /// - while that one finds no room (a large request waiting for a whole
    ///   window), the first smaller waiter over its share may take what
    ///   room there is, so the pool does not idle behind it;
    /// - a waiter over its share otherwise waits for its own share, even
    ///   with nobody queued ahead: the tenants whose demand set the shares
    ///   are arriving, and the room is theirs.
    fn turn(&self, queue: &GroupQueue, ticket: &Ticket) -> Turn {
        let mut q = queue.lock();
        let Some(reserve) = self.sharing else {
            return if q.head() == Some(ticket) {
                Turn::Head { under_share: true }
            } else {
                Turn::Wait
            };
        };
        let (now, capacity) = (self.now(), self.capacity());
        let WaitQueue {
            waiting,
            owners,
            shares,
            head_blocked,
            ..
        } = &mut *q;
        let decider = shares.decider(now, capacity, reserve);
        let (mut first_under, mut first_over, mut mine) = (None, None, None);
        let mut any_oversized = false;
        for t in waiting.iter() {
            let Some(owner) = owners.get(&t.2) else {
                continue;
            };
            let decision = match owner.priority {
                Priority::Interactive => decider.decide(&owner.tenant, owner.cost),
                Priority::Batch => decider.decide_batch(owner.cost),
            };
            if t == ticket {
                mine = Some(decision);
            }
            match decision {
                ShareDecision::Admit => {
                    first_under.get_or_insert(*t);
                }
                ShareDecision::HeldBack(_) => {
                    first_over.get_or_insert(*t);
                }
                ShareDecision::Oversized(_) => any_oversized = true,
            }
            if first_under.is_some() && first_over.is_some() && mine.is_some() {
                break;
            }
        }
        let first = waiting.first().copied();
        // Backfill takes only room the blocked head cannot use: a smaller
        // request, and never batch ahead of interactive.
        let backfills = head_blocked.is_some_and(|(_, priority, cost)| {
            first_over == Some(*ticket)
                && owners.get(&ticket.2).is_some_and(|me| {
                    me.cost < cost
                        && !(me.priority == Priority::Batch && priority == Priority::Interactive)
                })
        });
        match (first_under, mine) {
            (Some(u), _) if u == *ticket => Turn::Head { under_share: true },
            (Some(_), _) if backfills => Turn::Head { under_share: false },
            (Some(_), Some(ShareDecision::HeldBack(after) | ShareDecision::Oversized(after))) => {
                Turn::HeldBack(after)
            }
            (Some(_), _) => Turn::Wait,
            // Nobody waiting can go by its share, but a tenant under its
            // share waits on a request too large for it: its share is idle,
            // and the first waiter over its share may borrow it.
            (None, _) if any_oversized && first_over == Some(*ticket) => {
                Turn::Head { under_share: false }
            }
            // Everyone waiting is over their share: the room is kept for
            // the tenants whose demand made the shares (they are arriving,
            // not queued); each looks again when its own share allows.
            (None, Some(ShareDecision::HeldBack(after) | ShareDecision::Oversized(after))) => {
                Turn::HeldBack(after)
            }
            (None, _) if first == Some(*ticket) => Turn::Head { under_share: false },
            (None, _) => Turn::Wait,
        }
    }

    /// When room is expected for `request`, ignoring anyone queued ahead.
    async fn estimate_wait(&self, request: ReserveRequest<'_>) -> Duration {
        match self.store.probe(request).await {
            // Room now, but others are ahead: about one admission's worth.
            Ok(()) => Duration::from_secs(1),
            Err(Denial::Later { retry_at }) => {
                self.retry_after(retry_at).max(Duration::from_millis(1))
            }
            Err(Denial::Never) => Duration::from_secs(60),
        }
    }

    /// Ends a reservation and lets waiters try again (a refund may make
    /// room). Every queue, not only the grant's requester's: its bucket may
    /// be shared with other requesters (a lineage on `global`).
    pub async fn settle(&self, grant: &Grant, outcome: Outcome) {
        self.store.settle(grant, outcome).await;
        self.settle_share(grant, outcome);
        for queue in self.queues.values() {
            queue.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spillway_core::adaptive::AdaptiveConfig;
    use spillway_core::ledger::Limits;
    use spillway_core::store::{BudgetConfig, Clock, MemoryStore};

    struct TokioClock(Instant);
    impl Clock for TokioClock {
        fn now(&self) -> Duration {
            Instant::now().duration_since(self.0)
        }
    }

    const S45: &str = "claude-sonnet-4-5@20250929";
    const S46: &str = "claude-sonnet-4-6@20260101";

    fn demand(group: &str) -> Demand {
        Demand {
            group: group.into(),
            regions: vec![Arc::from("global")],
            charge: Charge {
                input: 10,
                output: 10,
            },
            strategy: Strategy::Ordered,
            priority: Priority::Interactive,
            tenant: Arc::from("t"),
            weight: 1.0,
            share_cost: 0.01,
            share_floor: 0.01,
            deadline: Instant::now() + Duration::from_secs(90),
        }
    }

    /// A refund through one requester wakes another requester's waiter
    /// sharing the bucket, long before the window would have freed it.
    #[tokio::test(start_paused = true)]
    async fn a_refund_in_a_shared_bucket_wakes_the_other_models_waiters() {
        let configs = [S45, S46].map(|model| BudgetConfig {
            group: model.into(),
            bucket: "anthropic-claude-sonnet".into(),
            region: "global".into(),
            limits: Limits::new(1, 1_000),
        });
        let store = MemoryStore::new(
            TokioClock(Instant::now()),
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &configs,
        );
        let scheduler = Arc::new(Scheduler::new(
            Arc::new(store),
            &[S45.into(), S46.into()],
            8,
        ));
        let first = scheduler.admit(&demand(S45)).await.unwrap();
        let waiter = {
            let scheduler = Arc::clone(&scheduler);
            tokio::spawn(async move {
                let started = Instant::now();
                let grant = scheduler.admit(&demand(S46)).await;
                (grant.is_ok(), started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(scheduler.queue_depth(&S46.into()), (1, 0));
        scheduler.settle(&first, Outcome::NotSent).await;
        let (admitted, waited) = waiter.await.unwrap();
        assert!(admitted);
        assert!(
            waited < Duration::from_secs(2),
            "woken by the refund, waited {waited:?}"
        );
    }

    /// A store with one Sonnet 4.5 budget on `global`.
    fn one_budget(limits: Limits) -> MemoryStore<TokioClock> {
        let configs = [BudgetConfig {
            group: S45.into(),
            bucket: S45.into(),
            region: "global".into(),
            limits,
        }];
        MemoryStore::new(
            TokioClock(Instant::now()),
            Duration::from_secs(60),
            AdaptiveConfig::default(),
            &configs,
        )
    }

    /// A peak of unsettled admissions leaves no capacity behind once they
    /// settle (BENCHMARKS.md, "Soak": 896 KiB after 9,000 streams).
    #[tokio::test(start_paused = true)]
    async fn settled_admissions_give_their_room_back() {
        let store = one_budget(Limits::new(100_000, 100_000_000));
        let scheduler = Scheduler::new(Arc::new(store), &[S45.into()], 8)
            .with_sharing(Duration::from_secs(60), InteractiveReserve::default());
        let mut grants = Vec::new();
        for _ in 0..5_000 {
            grants.push(scheduler.admit(&demand(S45)).await.unwrap());
        }
        let room = |s: &Scheduler| {
            s.queues[&QuotaGroup::from(S45)]
                .lock()
                .admissions
                .capacity()
        };
        let peak = room(&scheduler);
        assert!(peak >= 5_000);
        for grant in &grants[10..] {
            let used = Charge {
                input: 5,
                output: 5,
            };
            scheduler.settle(grant, Outcome::Used(used)).await;
        }
        assert!(room(&scheduler) <= 64, "{peak} -> {}", room(&scheduler));
        for grant in &grants[..10] {
            scheduler.settle(grant, Outcome::NotSent).await;
        }
        assert_eq!(
            scheduler.queues[&QuotaGroup::from(S45)]
                .lock()
                .admissions
                .len(),
            0
        );
    }

    /// Operators see how many wait in each class and for how long the
    /// longest has; a waiter that leaves is no longer counted.
    #[tokio::test(start_paused = true)]
    async fn queue_state_counts_waiters_and_their_longest_wait() {
        let store = one_budget(Limits::new(1, 1_000));
        let scheduler = Arc::new(Scheduler::new(Arc::new(store), &[S45.into()], 8));
        assert_eq!(scheduler.queue_state(&S45.into()), QueueState::default());
        let _first = scheduler.admit(&demand(S45)).await.unwrap();
        let spawn = |priority| {
            let scheduler = Arc::clone(&scheduler);
            tokio::spawn(async move {
                let mut d = demand(S45);
                d.priority = priority;
                scheduler.admit(&d).await.is_ok()
            })
        };
        let early = spawn(Priority::Interactive);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let _late = spawn(Priority::Interactive);
        let _batch = spawn(Priority::Batch);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let state = scheduler.queue_state(&S45.into());
        assert_eq!((state.interactive, state.batch), (2, 1));
        assert_eq!(state.longest_interactive, Some(Duration::from_secs(4)));
        assert_eq!(state.longest_batch, Some(Duration::from_secs(1)));
        early.abort();
        let _ = early.await;
        let state = scheduler.queue_state(&S45.into());
        assert_eq!(state.interactive, 1);
        assert_eq!(state.longest_interactive, Some(Duration::from_secs(1)));
        assert_eq!(
            scheduler.queue_state(&"unknown".into()),
            QueueState::default()
        );
    }
}
