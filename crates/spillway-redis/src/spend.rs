//! Tenants' spend totals in Redis, shared by every replica.
//!
//! Spend is not a window but a running sum per tenant and UTC period (a
//! day, a month), so it needs none of the ledger's machinery: one integer
//! key per (tenant, period), in nanodollars, moved with `INCRBY` (exact;
//! `INCRBYFLOAT` would round a sum of many small costs) and expiring a day
//! after its period ends. A replica does not call Redis per request: it
//! keeps its own spend since the last sync and, every `spend.sync_ms`, adds
//! it and reads every tenant's totals back in one script call ([`SPEND`]),
//! one round trip for the whole fleet's view.
//!
//! Keys: `{prefix}spend:{tenant}:day:2026-11-27` and
//! `{prefix}spend:{tenant}:month:2026-11`. Like the quota keys, they need
//! one Redis server (not Cluster). A Redis that restarts without
//! persistence forgets them: the period's caps start again from what each
//! replica still knew (see DEPLOYMENT.md, "Spend and caps").

use std::sync::Mutex;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Script};

use crate::StoreError;

/// Adds `ARGV` deltas to the first keys (each with its `EXPIREAT`), then
/// reads every key. `ARGV[1]` is how many keys are added to; then a
/// (delta, expire-at seconds) pair for each. Totals come back as strings
/// (Lua numbers are doubles; nanodollars may need all 63 bits).
const SPEND: &str = r#"
local n = tonumber(ARGV[1])
for i = 1, n do
  redis.call('INCRBY', KEYS[i], ARGV[2 * i])
  redis.call('EXPIREAT', KEYS[i], ARGV[2 * i + 1])
end
local out = {}
for i = n + 1, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i]) or '0'
end
return out
"#;

/// One key to add to: its name below the prefix, the nanodollars to add,
/// and when it may expire (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendAdd {
    pub key: String,
    pub nanodollars: i64,
    pub expire_at_secs: i64,
}

/// The spend keys of one deployment (one prefix) in one Redis.
pub struct RedisSpend {
    client: redis::Client,
    conn: Mutex<Option<MultiplexedConnection>>,
    prefix: String,
    timeout: Duration,
    script: Script,
}

impl RedisSpend {
    /// Keys are `{key_prefix}spend:…`; every call gives up after `timeout`
    /// (connecting included). Connects on first use. `ca_file`: for
    /// `rediss://`, trusted beside the system's roots, as the quota store does.
    pub fn new(
        url: &str,
        key_prefix: &str,
        timeout: Duration,
        ca_file: Option<&std::path::Path>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            client: crate::store::client(url, ca_file)?,
            conn: Mutex::new(None),
            prefix: format!("{key_prefix}spend:"),
            timeout,
            script: Script::new(SPEND),
        })
    }

    /// The full name of a spend key.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<MultiplexedConnection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn connection(&self) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = self.lock().clone() {
            return Ok(conn);
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout);
        let conn = tokio::time::timeout(
            self.timeout,
            self.client
                .get_multiplexed_async_connection_with_config(&config),
        )
        .await
        .map_err(|_| StoreError::Timeout)??;
        *self.lock() = Some(conn.clone());
        Ok(conn)
    }

    /// Adds each of `adds` and returns the totals of `reads` (key suffixes),
    /// after the adds, in nanodollars: one script call.
    pub async fn sync(&self, adds: &[SpendAdd], reads: &[String]) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.connection().await?;
        let mut call = self.script.prepare_invoke();
        for add in adds {
            call.key(self.key(&add.key));
        }
        for read in reads {
            call.key(self.key(read));
        }
        call.arg(adds.len());
        for add in adds {
            call.arg(add.nanodollars).arg(add.expire_at_secs);
        }
        let reply = tokio::time::timeout(self.timeout, call.invoke_async::<Vec<String>>(&mut conn))
            .await
            .map_err(|_| StoreError::Timeout)
            .and_then(|r| r.map_err(StoreError::from));
        let totals = match reply {
            Ok(totals) => totals,
            Err(e) => {
                // Reconnect on the next call.
                *self.lock() = None;
                return Err(e);
            }
        };
        totals
            .iter()
            .map(|t| {
                t.parse::<i64>()
                    .map_err(|_| StoreError::Protocol(format!("spend total {t:?}")))
            })
            .collect()
    }
}
