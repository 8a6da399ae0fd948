//! Cost of one admission decision: the scheduler's fast path over the
//! in-memory quota store, with 100 region-model budgets (50 models in 2
//! regions each) and 1,000 tenants taking turns.
//!
//! Each iteration is one reserve (choosing between the model's regions by
//! headroom) plus the settle that ends it, so the ledgers stay in a steady
//! state instead of growing. Run: `cargo bench -p spillway-gateway --bench admission`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use spillway_core::adaptive::AdaptiveConfig;
use spillway_core::ledger::{Charge, Limits};
use spillway_core::shares::InteractiveReserve;
use spillway_core::store::{
    BudgetConfig, Clock, MemoryStore, Outcome, QuotaStore, ReserveRequest, Strategy,
};
use spillway_core::QuotaGroup;
use spillway_gateway::scheduler::{Demand, Priority, Scheduler};

struct RealClock(std::time::Instant);
impl Clock for RealClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

const MODELS: usize = 50;
const TENANTS: usize = 1_000;

fn budgets() -> (Vec<BudgetConfig>, Vec<QuotaGroup>) {
    let mut budgets = Vec::new();
    let mut models = Vec::new();
    for m in 0..MODELS {
        let model = QuotaGroup::from(format!("claude-model-{m}@20250101"));
        for region in ["us-central1", "europe-west4"] {
            budgets.push(BudgetConfig {
                group: model.clone(),
                bucket: model.clone(),
                region: region.into(),
                // Large enough never to refuse: this measures the decision.
                limits: Limits::new(u32::MAX, u64::MAX / 4),
            });
        }
        models.push(model);
    }
    (budgets, models)
}

fn store() -> (Arc<MemoryStore<RealClock>>, Vec<QuotaGroup>) {
    let (budgets, models) = budgets();
    let store = MemoryStore::new(
        RealClock(std::time::Instant::now()),
        Duration::from_secs(60),
        AdaptiveConfig::default(),
        &budgets,
    );
    (Arc::new(store), models)
}

fn bench(c: &mut Criterion) {
    let regions: Vec<Arc<str>> = vec![Arc::from("us-central1"), Arc::from("europe-west4")];
    let charge = Charge {
        input: 1_200,
        output: 1_024,
    };

    let (memory, models) = store();
    let mut i = 0usize;
    c.bench_function("store: reserve + settle (100 budgets)", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let request = ReserveRequest {
                group: &models[i % MODELS],
                regions: &regions,
                charge,
                strategy: Strategy::MostHeadroom,
            };
            let grant = memory.reserve_now(request).expect("room");
            memory.settle_now(
                &grant,
                Outcome::Used(Charge {
                    input: 1_000,
                    output: 200,
                }),
            );
        })
    });

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (memory, models) = store();
    let store: Arc<dyn QuotaStore> = memory;
    let scheduler = rt.block_on(async { Scheduler::new(Arc::clone(&store), &models, 1024) });
    // The gateway's scheduler holds tenants to their shares of each pool.
    let sharing = rt.block_on(async {
        Scheduler::new(store, &models, 1024)
            .with_sharing(Duration::from_secs(60), InteractiveReserve::default())
    });
    let tenants: Vec<Arc<str>> = (0..TENANTS)
        .map(|t| Arc::from(format!("tenant-{t}").as_str()))
        .collect();
    let demands: Vec<Demand> = (0..TENANTS)
        .map(|t| Demand {
            group: models[t % MODELS].clone(),
            regions: regions.clone(),
            charge,
            strategy: Strategy::MostHeadroom,
            priority: Priority::Interactive,
            tenant: tenants[t].clone(),
            weight: 1.0 + (t % 3) as f64,
            share_cost: 1e-6,
            share_floor: 1e-7,
            deadline: rt.block_on(async { tokio::time::Instant::now() })
                + Duration::from_secs(3600),
        })
        .collect();
    for (name, scheduler) in [
        (
            "scheduler: admit + settle (100 budgets, 1000 tenants)",
            &scheduler,
        ),
        (
            "scheduler with shares: admit + settle (100 budgets, 1000 tenants)",
            &sharing,
        ),
    ] {
        let mut n = 0usize;
        c.bench_function(name, |b| {
            b.iter(|| {
                n = n.wrapping_add(1);
                let demand = &demands[n % TENANTS];
                rt.block_on(async {
                    let grant = scheduler.admit(demand).await.expect("room");
                    scheduler
                        .settle(
                            &grant,
                            Outcome::Used(Charge {
                                input: 1_000,
                                output: 200,
                            }),
                        )
                        .await;
                })
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
