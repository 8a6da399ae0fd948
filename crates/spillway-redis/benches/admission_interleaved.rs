//! Admission latency with Redis, each decision timed against a bare round
//! trip taken right beside it.
//!
//! On a virtual machine a loopback round trip drifts by tens of
//! microseconds from one second to the next, so two figures measured one
//! after the other (as criterion does, benchmark by benchmark) cannot be
//! subtracted. Here every round runs each case once, in turn, and the
//! report gives each case's percentiles over the same stretch of time, and
//! per round the difference to the `PING` beside it.
//!
//! Cases: a `PING` through the redis crate and on a raw socket; a function
//! call that does nothing, with the reserve's keys and arguments; the
//! reserve itself (two candidate regions, 50 models, a 1-s window so the
//! logs are at steady state); a settle; the same reserve in memory; and
//! a reserve and settle by a store that leases (`lease.rs`, 50 ms), all
//! for one model, as a busy gateway's traffic: most are answered from a
//! lease without a round trip, the rest are the reserve that takes one.
//!
//! Run: `cargo bench -p spillway-redis --bench admission_interleaved`
//! (`SPILLWAY_BENCH_REDIS`, default `redis://127.0.0.1:6379`; `ROUNDS`,
//! default 20000).

mod fixture;

use std::time::Instant;

use fixture::{Fixture, USED as used, WINDOW as window};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn percentile(sorted: &[i64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

fn report(name: &str, mut ns: Vec<i64>) {
    ns.sort_unstable();
    println!(
        "{name:<52} p10 {:>7.1}  p50 {:>7.1}  p90 {:>7.1}  p99 {:>7.1} µs",
        percentile(&ns, 0.10),
        percentile(&ns, 0.50),
        percentile(&ns, 0.90),
        percentile(&ns, 0.99),
    );
}

fn main() {
    // `cargo test --benches` runs bench targets with no arguments: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let fx = Fixture::new(&rt);
    let (redis, memory, settings) = (&fx.redis, &fx.memory, &fx.settings);
    let request = |i: usize| fx.request(i);

    let client = redis::Client::open(settings.url.as_str()).unwrap();
    let mut conn = rt
        .block_on(client.get_multiplexed_async_connection())
        .unwrap();
    let redis::ConnectionAddr::Tcp(host, port) = &client.get_connection_info().addr else {
        panic!("SPILLWAY_BENCH_REDIS must be a redis://host:port URL");
    };
    let mut raw = rt
        .block_on(tokio::net::TcpStream::connect((host.as_str(), *port)))
        .unwrap();
    raw.set_nodelay(true).unwrap();
    let noop = fixture::noop_call(&rt, &mut conn);
    let leasing = fx.leasing(&rt, std::time::Duration::from_millis(50));

    // Warm up: fills the logs to their steady state (one window).
    let warm = Instant::now();
    let mut i = 0usize;
    while warm.elapsed() < window * 2 {
        i += 1;
        rt.block_on(redis.try_reserve(request(i))).unwrap().unwrap();
    }

    const CASES: usize = 7;
    let names = [
        "memory: reserve + settle (2 candidates)",
        "redis crate: PING",
        "raw socket: PING",
        "redis: no-op function, same keys, args, reply",
        "redis: reserve (2 candidates, one function call)",
        "redis: settle (one function call)",
        "redis, leases: reserve + settle (one model)",
    ];
    let mut samples: Vec<Vec<i64>> = (0..CASES).map(|_| Vec::with_capacity(rounds)).collect();
    let mut over_ping: Vec<i64> = Vec::with_capacity(rounds);
    for round in 0..rounds {
        let mut took = [0i64; CASES];
        let mut grant = None;
        // Rotate the order so no case always follows the same one.
        for step in 0..CASES {
            let case = (round + step) % CASES;
            i += 1;
            let start = Instant::now();
            match case {
                0 => {
                    let g = memory.reserve_now(request(i)).expect("room");
                    memory.settle_now(&g, used);
                }
                1 => rt.block_on(async {
                    let _: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
                }),
                2 => rt.block_on(async {
                    raw.write_all(b"*1\r\n$4\r\nPING\r\n").await.unwrap();
                    let mut buf = [0u8; 16];
                    let mut n = 0;
                    while n < 7 {
                        n += raw.read(&mut buf[n..]).await.unwrap();
                    }
                }),
                3 => rt.block_on(async {
                    let _: Vec<i64> = noop.query_async(&mut conn).await.unwrap();
                }),
                4 => {
                    grant = Some(
                        rt.block_on(redis.try_reserve(request(i)))
                            .unwrap()
                            .expect("room"),
                    )
                }
                6 => {
                    let g = rt
                        .block_on(leasing.try_reserve(request(0)))
                        .unwrap()
                        .expect("room");
                    rt.block_on(leasing.try_settle(&g, used)).unwrap();
                }
                _ => match grant.take() {
                    Some(g) => rt.block_on(redis.try_settle(&g, used)).unwrap(),
                    // The reserve comes later in this round: settle one now.
                    None => {
                        let g = rt
                            .block_on(redis.try_reserve(request(i)))
                            .unwrap()
                            .expect("room");
                        let start = Instant::now();
                        rt.block_on(redis.try_settle(&g, used)).unwrap();
                        took[case] = start.elapsed().as_nanos() as i64;
                        continue;
                    }
                },
            }
            took[case] = start.elapsed().as_nanos() as i64;
        }
        for (case, ns) in took.into_iter().enumerate() {
            samples[case].push(ns);
        }
        over_ping.push(took[4] - took[1]);
    }
    println!("{rounds} rounds, each case once per round");
    let trips = samples[6].iter().filter(|&&ns| ns > 20_000).count();
    println!(
        "leases: {trips} of {rounds} admissions over 20 µs (a round trip to Redis: a lease granted, or closed beside it)"
    );
    for (name, ns) in names.iter().zip(samples) {
        report(name, ns);
    }
    report("reserve minus the PING of the same round", over_ping);
}
