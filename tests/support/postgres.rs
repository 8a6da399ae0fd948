//! A PostgreSQL database of a test run's own, on the machine's server
//! (127.0.0.1:5432, or `SPILLWAY_TEST_POSTGRES_URL`), created with a random
//! name and dropped by `drop_now`. No server is a failure, never a skip.

use sqlx::Connection;

pub fn admin_url() -> String {
    std::env::var("SPILLWAY_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub struct TempDatabase {
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    /// Creates `{prefix}_{random}`.
    pub async fn create(prefix: &str) -> Self {
        let admin = admin_url();
        let name = format!(
            "{prefix}_{}",
            spillway_gateway::ids::random_id("", 12).to_ascii_lowercase()
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is required for this test: {e}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Self {
            url: format!("{base}/{name}"),
            name,
        }
    }

    /// Runs `scenario` with a fresh database's URL in a task of its own,
    /// so a failed assertion still drops the database (processes the
    /// scenario started are killed by their guards as its task unwinds);
    /// the failure is then raised here.
    pub async fn around<F>(prefix: &str, scenario: impl FnOnce(String) -> F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let db = Self::create(prefix).await;
        let outcome = tokio::spawn(scenario(db.url.clone())).await;
        db.drop_now().await;
        if let Err(e) = outcome {
            std::panic::resume_unwind(e.into_panic());
        }
    }

    pub async fn drop_now(&self) {
        let mut conn = sqlx::PgConnection::connect(&admin_url()).await.unwrap();
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .execute(&mut conn)
        .await
        .unwrap();
    }
}
