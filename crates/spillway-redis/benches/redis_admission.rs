//! Admission with shared budgets: one decision in Redis (one Lua function
//! call, one round trip) against the same decision in memory, and for
//! scale a bare PING (through the redis crate and on a raw socket) and a
//! function call of the same shape that does nothing. Two candidate regions
//! per model, 50 models.
//!
//! Uses `SPILLWAY_BENCH_REDIS` (default `redis://127.0.0.1:6379`) with a
//! fresh key prefix; keys expire by themselves. Run:
//! `cargo bench -p spillway-redis --bench redis_admission`.

mod fixture;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use fixture::{Fixture, USED as used};

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = Fixture::new(&rt);
    let (redis, memory, settings) = (&fx.redis, &fx.memory, &fx.settings);
    let request = |i: usize| fx.request(i);

    let mut i = 0usize;
    c.bench_function("memory: reserve (2 candidates)", |b| {
        b.iter(|| {
            i += 1;
            memory.reserve_now(request(i)).expect("room")
        })
    });
    c.bench_function("memory: reserve + settle", |b| {
        b.iter(|| {
            i += 1;
            let g = memory.reserve_now(request(i)).expect("room");
            memory.settle_now(&g, used);
        })
    });
    let client = redis::Client::open(settings.url.as_str()).unwrap();
    let mut conn = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    c.bench_function("redis: PING round trip", |b| {
        b.iter(|| {
            rt.block_on(async {
                let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
            })
        })
    });
    // The same round trip on a bare socket: tokio's own floor here.
    let redis::ConnectionAddr::Tcp(host, port) = &client.get_connection_info().addr else {
        panic!("SPILLWAY_BENCH_REDIS must be a redis://host:port URL");
    };
    let mut raw = rt
        .block_on(tokio::net::TcpStream::connect((host.as_str(), *port)))
        .unwrap();
    raw.set_nodelay(true).unwrap();
    c.bench_function("raw tokio: PING round trip", |b| {
        b.iter(|| {
            rt.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                raw.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
                let mut buf = [0u8; 16];
                let mut n = 0;
                while n < 7 {
                    n += raw.read(&mut buf[n..]).await.unwrap();
                }
            })
        })
    });
    let noop = fixture::noop_call(&rt, &mut conn);
    c.bench_function("redis: no-op function, same keys and args", |b| {
        b.iter(|| {
            rt.block_on(async {
                let _: Vec<i64> = noop.query_async(&mut conn).await.unwrap();
            })
        })
    });
    c.bench_function("redis: reserve (2 candidates, one function call)", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(redis.try_reserve(request(i)))
                .unwrap()
                .expect("room")
        })
    });
    c.bench_function("redis: reserve + settle", |b| {
        b.iter(|| {
            i += 1;
            rt.block_on(async {
                let g = redis.try_reserve(request(i)).await.unwrap().expect("room");
                redis.try_settle(&g, used).await.unwrap();
            })
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench
}
criterion_main!(benches);
