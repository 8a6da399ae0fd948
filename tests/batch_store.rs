//! The batch store contract, run against both backends: SQLite (a temp
//! file) and PostgreSQL (a fresh database on 127.0.0.1:5432, created for
//! this run and dropped after). PostgreSQL is required, not optional: CI
//! and the development machine both run it; set SPILLWAY_TEST_POSTGRES_URL
//! to use another server (a URL to a database the test may CREATE/DROP
//! databases from).

use std::collections::HashSet;
use std::sync::Arc;

use spillway_gateway::batch::store::{
    BatchStore, DeleteOutcome, Finish, NewBatch, NewItem, OpenBatch, PageQuery, PgStore,
    SqliteStore,
};
use spillway_gateway::batch::ProcessingStatus;
use support::postgres::TempDatabase;

mod support;

const T0: i64 = 1_700_000_000_000;
const DAY: i64 = 86_400_000;

async fn new_batch(store: &dyn BatchStore, tenant: &str, id: &str, n: usize, at: i64) -> i64 {
    let seq = store
        .create(&NewBatch {
            id: id.into(),
            tenant: tenant.into(),
            created_at: at,
            expires_at: at + DAY,
            traceparent: None,
        })
        .await
        .unwrap();
    let items: Vec<NewItem> = (0..n)
        .map(|i| NewItem {
            custom_id: format!("c{i}"),
            params: format!("{{\"i\":{i}}}"),
        })
        .collect();
    // Two inserts, as an upload in chunks does.
    let (a, b) = items.split_at(n / 2);
    store.insert_items(seq, 0, a).await.unwrap();
    store.insert_items(seq, a.len() as i64, b).await.unwrap();
    store.activate(seq, n as i64).await.unwrap();
    seq
}

async fn contract(store: Arc<dyn BatchStore>) {
    let s = &*store;
    // Staging batches are invisible until activated; discard removes them.
    let staging = s
        .create(&NewBatch {
            id: "msgbatch_staging".into(),
            tenant: "t".into(),
            created_at: T0,
            expires_at: T0 + DAY,
            traceparent: None,
        })
        .await
        .unwrap();
    assert!(s.get("t", "msgbatch_staging").await.unwrap().is_none());
    assert!(s.claim("o", T0, T0 + 1000, 10).await.unwrap().is_empty());
    s.discard(staging).await.unwrap();

    // A batch of 10: visible to its tenant only, counts exact.
    new_batch(s, "t", "msgbatch_a", 10, T0).await;
    let a = s.get("t", "msgbatch_a").await.unwrap().unwrap();
    assert_eq!(a.status, ProcessingStatus::InProgress);
    assert_eq!((a.counts.processing, a.total()), (10, 10));
    assert!(s.get("other", "msgbatch_a").await.unwrap().is_none());

    // Claims: bounded, in order, leased; nobody else gets leased items.
    let first = s.claim("o1", T0, T0 + 30_000, 4).await.unwrap();
    let idx: Vec<i64> = first.iter().map(|i| i.key.idx).collect();
    assert_eq!(idx, [0, 1, 2, 3]);
    assert!(first.iter().all(|i| i.attempts == 1 && i.tenant == "t"));
    assert_eq!(first[0].custom_id, "c0");
    assert_eq!(first[0].params, "{\"i\":0}");
    assert_eq!(first[0].batch_id, "msgbatch_a");
    let second = s.claim("o2", T0, T0 + 30_000, 100).await.unwrap();
    assert_eq!(second.len(), 6);

    // Complete: only the holder; exactly once.
    assert!(!s
        .complete(first[0].key, "o2", Finish::Succeeded, "{}", T0)
        .await
        .unwrap());
    assert!(s
        .complete(
            first[0].key,
            "o1",
            Finish::Succeeded,
            "{\"type\":\"succeeded\"}",
            T0
        )
        .await
        .unwrap());
    assert!(!s
        .complete(first[0].key, "o1", Finish::Succeeded, "{}", T0)
        .await
        .unwrap());
    // Errored, and counts move while the batch runs.
    assert!(s
        .complete(
            first[1].key,
            "o1",
            Finish::Errored,
            "{\"type\":\"errored\"}",
            T0
        )
        .await
        .unwrap());
    let a = s.get("t", "msgbatch_a").await.unwrap().unwrap();
    assert_eq!(
        (a.counts.succeeded, a.counts.errored, a.counts.processing),
        (1, 1, 8)
    );
    // The live page's list of open batches, counts as they are.
    let open = s.stats().await.unwrap().open;
    let listed = |o: &[OpenBatch]| -> Vec<(String, String, String, i64, i64, i64)> {
        o.iter()
            .map(|b| {
                let p = &b.progress;
                (
                    b.id.clone(),
                    b.tenant.clone(),
                    b.status.clone(),
                    p.total,
                    p.succeeded + p.errored,
                    p.processing(),
                )
            })
            .collect()
    };
    assert_eq!(
        listed(&open),
        [(
            "msgbatch_a".into(),
            "t".into(),
            "in_progress".into(),
            10,
            2,
            8
        )]
    );

    // Release: back to pending at not_before; a refund keeps the attempt count.
    assert!(s
        .release(first[2].key, "o1", T0 + 5_000, true)
        .await
        .unwrap());
    assert!(s
        .release(first[3].key, "o1", T0 + 5_000, false)
        .await
        .unwrap());
    assert!(s
        .claim("o3", T0 + 1_000, T0 + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    let again = s.claim("o3", T0 + 5_000, T0 + 60_000, 10).await.unwrap();
    let attempts: Vec<(i64, i64)> = again.iter().map(|i| (i.key.idx, i.attempts)).collect();
    assert_eq!(attempts, [(2, 1), (3, 2)]);

    // A lease that ran out (its owner died) is taken over; renewals prevent it.
    assert_eq!(s.renew("o2", T0 + 90_000).await.unwrap(), 6);
    // At 70 s o3's leases (to 60 s) are out, o2's (renewed to 90 s) are not.
    let o4 = s.claim("o4", T0 + 70_000, T0 + 100_000, 10).await.unwrap();
    assert_eq!(o4.len(), 2);
    let taken = s.claim("o5", T0 + 95_000, T0 + 200_000, 10).await.unwrap();
    assert_eq!(taken.len(), 6, "o2's expired leases, not o4's live ones");
    for item in &o4 {
        assert!(s
            .complete(
                item.key,
                "o4",
                Finish::Succeeded,
                "{\"type\":\"succeeded\"}",
                T0
            )
            .await
            .unwrap());
    }
    assert!(!s
        .complete(second[0].key, "o2", Finish::Succeeded, "{}", T0)
        .await
        .unwrap());
    for item in &taken {
        assert!(s
            .complete(
                item.key,
                "o5",
                Finish::Succeeded,
                "{\"type\":\"succeeded\"}",
                T0 + 96_000
            )
            .await
            .unwrap());
    }
    let a = s.get("t", "msgbatch_a").await.unwrap().unwrap();
    assert_eq!(a.status, ProcessingStatus::Ended, "{a:?}");
    assert_eq!(a.counts.succeeded + a.counts.errored, 10);
    assert_eq!(a.ended_at, Some(T0 + 96_000));
    let rows = s.results_page(
        s.seq_of("t", "msgbatch_a").await.unwrap().unwrap(),
        -1,
        1000,
    );
    let rows = rows.await.unwrap();
    assert_eq!(rows.len(), 10);
    let ids: HashSet<_> = rows.iter().map(|r| r.custom_id.clone()).collect();
    assert_eq!(ids.len(), 10);

    // Cancel: pending items are canceled at once; in-flight ones finish.
    new_batch(s, "t", "msgbatch_b", 6, T0 + 1).await;
    let running = s.claim("o6", T0 + 1, T0 + 60_000, 2).await.unwrap();
    let b = s.cancel("t", "msgbatch_b", T0 + 2).await.unwrap().unwrap();
    assert_eq!(b.status, ProcessingStatus::Canceling);
    assert_eq!((b.counts.canceled, b.counts.processing), (4, 2));
    assert_eq!(b.cancel_initiated_at, Some(T0 + 2));
    let open = s.stats().await.unwrap().open;
    assert_eq!(
        listed(&open),
        [("msgbatch_b".into(), "t".into(), "canceling".into(), 6, 0, 2)]
    );
    assert!(s
        .claim("o7", T0 + 3, T0 + 60_000, 10)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.delete("t", "msgbatch_b").await.unwrap(),
        DeleteOutcome::NotEnded
    );
    for item in &running {
        s.complete(item.key, "o6", Finish::Succeeded, "{}", T0 + 4)
            .await
            .unwrap();
    }
    let b = s.get("t", "msgbatch_b").await.unwrap().unwrap();
    assert_eq!(b.status, ProcessingStatus::Ended);
    assert_eq!((b.counts.succeeded, b.counts.canceled), (2, 4));
    assert!(s.cancel("other", "msgbatch_b", T0).await.unwrap().is_none());

    // An item handed back after a cancel is canceled by maintenance.
    new_batch(s, "t", "msgbatch_c", 3, T0 + 2).await;
    let c_items = s.claim("o8", T0 + 2, T0 + 60_000, 3).await.unwrap();
    s.cancel("t", "msgbatch_c", T0 + 3).await.unwrap();
    for item in &c_items {
        s.release(item.key, "o8", T0 + 3, true).await.unwrap();
    }
    let report = s.maintain(T0 + 4, 0, 0).await.unwrap();
    assert_eq!(report.canceled_items, 3);
    let c = s.get("t", "msgbatch_c").await.unwrap().unwrap();
    assert_eq!((c.status, c.counts.canceled), (ProcessingStatus::Ended, 3));

    // Expiry: what is left 24 h after creation is expired.
    new_batch(s, "t", "msgbatch_d", 5, T0 + 3).await;
    let d_items = s.claim("o9", T0 + 3, T0 + 60_000, 1).await.unwrap();
    s.complete(d_items[0].key, "o9", Finish::Succeeded, "{}", T0 + 4)
        .await
        .unwrap();
    assert!(!s
        .batch_active(d_items[0].key.batch_seq, T0 + 3 + DAY)
        .await
        .unwrap());
    assert!(s
        .batch_active(d_items[0].key.batch_seq, T0 + 4)
        .await
        .unwrap());
    let report = s.maintain(T0 + 3 + DAY, 0, 0).await.unwrap();
    assert_eq!(report.expired_items, 4);
    let d = s.get("t", "msgbatch_d").await.unwrap().unwrap();
    assert_eq!(
        (d.status, d.counts.succeeded, d.counts.expired),
        (ProcessingStatus::Ended, 1, 4)
    );

    // Listing: newest first, both directions, tenant-scoped.
    let page = |before: Option<&str>, after: Option<&str>, limit| PageQuery {
        before_id: before.map(str::to_string),
        after_id: after.map(str::to_string),
        limit,
    };
    let ids = |records: &[spillway_gateway::batch::BatchRecord]| {
        records.iter().map(|r| r.id.clone()).collect::<Vec<_>>()
    };
    let (first, more) = s.list("t", &page(None, None, 2)).await.unwrap().unwrap();
    assert_eq!(
        (ids(&first), more),
        (vec!["msgbatch_d".into(), "msgbatch_c".into()], true)
    );
    let (next, more) = s
        .list("t", &page(None, Some("msgbatch_c"), 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ids(&next), more),
        (vec!["msgbatch_b".into(), "msgbatch_a".into()], false)
    );
    let (back, more) = s
        .list("t", &page(Some("msgbatch_a"), None, 2))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ids(&back), more),
        (vec!["msgbatch_c".into(), "msgbatch_b".into()], true)
    );
    assert!(s
        .list("other", &page(None, Some("msgbatch_c"), 2))
        .await
        .unwrap()
        .is_none());
    let (none, _) = s
        .list("other", &page(None, None, 20))
        .await
        .unwrap()
        .unwrap();
    assert!(none.is_empty());

    // Stats, then retention: ended batches older than the cutoff are purged.
    assert!(s.size_bytes().await.unwrap() > 0);
    let stats = s.stats().await.unwrap();
    assert_eq!(
        stats.batches,
        vec![("in_progress", 0), ("canceling", 0), ("ended", 4)]
    );
    assert_eq!(stats.open_items, 0);
    assert_eq!(
        s.delete("other", "msgbatch_a").await.unwrap(),
        DeleteOutcome::NotFound
    );
    assert_eq!(
        s.delete("t", "msgbatch_a").await.unwrap(),
        DeleteOutcome::Deleted
    );
    let report = s.maintain(T0 + 30 * DAY, T0 + 29 * DAY, 0).await.unwrap();
    assert_eq!(report.purged_batches, 3);
    let (left, _) = s.list("t", &page(None, None, 20)).await.unwrap().unwrap();
    assert!(left.is_empty());

    // Abandoned uploads are dropped.
    s.create(&NewBatch {
        id: "msgbatch_abandoned".into(),
        tenant: "t".into(),
        created_at: T0,
        expires_at: T0 + DAY,
        traceparent: None,
    })
    .await
    .unwrap();
    let report = s.maintain(T0 + 30 * DAY, 0, T0 + 1).await.unwrap();
    assert_eq!(report.dropped_uploads, 1);

    // The creating request's trace context comes back with each claimed
    // item (traces link items to it); a batch without one has none.
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let seq = s
        .create(&NewBatch {
            id: "msgbatch_traced".into(),
            tenant: "t".into(),
            created_at: T0,
            expires_at: T0 + 40 * DAY,
            traceparent: Some(traceparent.into()),
        })
        .await
        .unwrap();
    let item = NewItem {
        custom_id: "only".into(),
        params: "{}".into(),
    };
    s.insert_items(seq, 0, std::slice::from_ref(&item))
        .await
        .unwrap();
    s.activate(seq, 1).await.unwrap();
    let claimed = s
        .claim("o", T0 + 30 * DAY, T0 + 31 * DAY, 10)
        .await
        .unwrap();
    let traced: Vec<_> = claimed
        .iter()
        .map(|i| (i.batch_id.as_str(), i.batch_traceparent.as_deref()))
        .collect();
    assert!(
        traced.contains(&("msgbatch_traced", Some(traceparent))),
        "{traced:?}"
    );
}

/// Several claimers at once never get the same item.
async fn concurrent_claims_are_disjoint(store: Arc<dyn BatchStore>) {
    new_batch(&*store, "t", "msgbatch_many", 400, T0).await;
    let claimers = (0..4).map(|k| {
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let owner = format!("owner-{k}");
            let mut mine = Vec::new();
            loop {
                let got = store.claim(&owner, T0, T0 + 60_000, 7).await.unwrap();
                if got.is_empty() {
                    return mine;
                }
                for item in got {
                    assert!(store
                        .complete(item.key, &owner, Finish::Succeeded, "{}", T0)
                        .await
                        .unwrap());
                    mine.push(item.key.idx);
                }
            }
        })
    });
    let mut all = Vec::new();
    for claimer in claimers {
        all.extend(claimer.await.unwrap());
    }
    all.sort();
    assert_eq!(all, (0..400).collect::<Vec<i64>>());
    let b = store.get("t", "msgbatch_many").await.unwrap().unwrap();
    assert_eq!(
        (b.status, b.counts.succeeded),
        (ProcessingStatus::Ended, 400)
    );
}

/// Spend totals (`spend`) in the batch store's database: upserted sums per
/// (tenant, period), read back after the adds, exact under concurrent
/// writers (two replicas on one database).
async fn spend_contract(a: Arc<dyn BatchStore>, b: Arc<dyn BatchStore>) {
    let row = |t: &str, p: &str| (t.to_string(), p.to_string());
    let add = |t: &str, p: &str, n: i64| (t.to_string(), p.to_string(), n);
    let reads = [
        row("t", "day:2026-11-27"),
        row("t", "month:2026-11"),
        row("u", "day:2026-11-27"),
    ];
    assert_eq!(a.spend_sync(&[], &reads, T0).await.unwrap(), [0, 0, 0]);
    let first = [add("t", "day:2026-11-27", 5), add("t", "month:2026-11", 5)];
    assert_eq!(a.spend_sync(&first, &reads, T0).await.unwrap(), [5, 5, 0]);
    // Two writers at once, 50 adds each: nothing lost.
    let writer = |store: Arc<dyn BatchStore>, n: i64| async move {
        for _ in 0..50 {
            store
                .spend_sync(&[add("u", "day:2026-11-27", n)], &[], T0)
                .await
                .unwrap();
        }
    };
    tokio::join!(writer(a.clone(), 1), writer(b.clone(), 1_000_000_000_000));
    assert_eq!(
        b.spend_sync(&[], &reads, T0).await.unwrap(),
        [5, 5, 50 + 50 * 1_000_000_000_000]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_spend_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.sqlite3");
    let store: Arc<dyn BatchStore> =
        Arc::new(SqliteStore::open(path.to_str().unwrap()).await.unwrap());
    spend_contract(store.clone(), store).await;
    // Reopened, the totals are there.
    let reopened = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    let total = reopened
        .spend_sync(&[], &[("t".into(), "month:2026-11".into())], T0)
        .await
        .unwrap();
    assert_eq!(total, [5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_spend_contract_across_two_replicas() {
    let db = TempDatabase::create("spillway_spend").await;
    let a: Arc<dyn BatchStore> = Arc::new(PgStore::connect(&db.url, 4).await.unwrap());
    let b: Arc<dyn BatchStore> = Arc::new(PgStore::connect(&db.url, 4).await.unwrap());
    spend_contract(a.clone(), b.clone()).await;
    drop((a, b));
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("batches.sqlite3");
    let store = Arc::new(SqliteStore::open(path.to_str().unwrap()).await.unwrap());
    contract(store.clone()).await;
    concurrent_claims_are_disjoint(store).await;
    // Reopening finds everything (and migrations are not re-applied).
    let reopened = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
    assert!(reopened.get("t", "msgbatch_many").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_in_memory_store_keeps_the_contract() {
    let store = Arc::new(SqliteStore::open(":memory:").await.unwrap());
    contract(store.clone()).await;
    concurrent_claims_are_disjoint(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_keeps_the_contract() {
    let db = TempDatabase::create("spillway_test").await;
    let store = Arc::new(PgStore::connect(&db.url, 8).await.unwrap());
    contract(store.clone()).await;
    concurrent_claims_are_disjoint(store.clone()).await;
    // A second replica connecting to the same database finds the schema.
    let replica = PgStore::connect(&db.url, 2).await.unwrap();
    assert!(replica.get("t", "msgbatch_many").await.unwrap().is_some());
    drop((store, replica));
    db.drop_now().await;
}
