//! The SQLite store's reading connections: a few rusqlite connections, each lent to one read
//! at a time, which runs on tokio's blocking threads.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::Semaphore;

use crate::store::{StoreError, StoreResult};

/// Prepared statements each reading connection keeps: more than the store has reads.
const STATEMENT_CACHE: usize = 64;

pub(super) struct Readers {
    idle: Mutex<Vec<Connection>>,
    /// One per connection: reads beyond that many wait.
    permits: Semaphore,
    path: PathBuf,
}

impl Readers {
    /// Opens `connections` reading connections to the database at `path`.
    pub fn open(path: &Path, connections: usize) -> rusqlite::Result<Readers> {
        let idle = (0..connections)
            .map(|_| open_reader(path))
            .collect::<rusqlite::Result<_>>()?;
        Ok(Readers {
            idle: Mutex::new(idle),
            permits: Semaphore::new(connections),
            path: path.to_owned(),
        })
    }

    /// Runs `read` on a connection of its own. It sees every write committed before it began.
    pub async fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        let _permit = self.permits.acquire().await.map_err(|_| closed())?;
        let idle = self.idle.lock().expect("not poisoned").pop();
        // None when a read was dropped half-way, taking its connection with it.
        let conn = match idle {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = read(&conn);
            (conn, result)
        })
        .await
        .map_err(|err| StoreError::Internal(anyhow::anyhow!("A SQLite read failed: {err}")))?;
        self.idle.lock().expect("not poisoned").push(conn);
        Ok(result?)
    }

    /// Refuses further reads and closes the idle connections.
    pub fn close(&self) {
        self.permits.close();
        self.idle.lock().expect("not poisoned").clear();
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("the SQLite store is closed"))
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(super::BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    Ok(conn)
}
