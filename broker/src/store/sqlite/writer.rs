//! The SQLite store's writer: a thread of its own that owns the writing connection and commits
//! every write waiting in its queue as one transaction (group commit).
//!
//! A write is a closure run against the batch's [`Transaction`], inside a savepoint of its own:
//! released when the write succeeds, rolled back when it fails, so one failing write undoes
//! nothing of the others in its batch. Each caller is answered once the batch is committed, with
//! its own result. The thread, not a tokio task, owns the connection because each hand-off
//! between threads costs a wake-up: a statement of sqlx's SQLite driver crosses to its worker
//! thread and back, a write here crosses once per batch (docs/performance.md).

use std::panic::AssertUnwindSafe;
use std::sync::{Mutex, mpsc};
use std::thread::JoinHandle;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::store::{StoreError, StoreResult};

/// At most this many writes share a transaction, which bounds how long the first of them waits
/// for its commit behind the others.
const MAX_BATCH: usize = 256;

/// A write as the writer thread runs it: given the batch's transaction (or why there is none),
/// it says whether to keep its changes and how to answer its caller once the batch has ended.
type Op = Box<dyn FnOnce(Result<&Transaction<'_>, &rusqlite::Error>) -> Ran + Send>;

/// Answers a write's caller, told whether the batch was committed.
type Answer = Box<dyn FnOnce(Result<(), &rusqlite::Error>) + Send>;

/// A write that has run.
struct Ran {
    keep: bool,
    answer: Answer,
}

/// The handle on the writer thread. Dropping it ends the thread once the queue is drained.
pub(super) struct Writer {
    queue: Mutex<Option<mpsc::Sender<Op>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Writer {
    /// Starts the thread that owns `conn`; `committed` is called after every batch.
    pub fn start(
        conn: Connection,
        committed: impl Fn() + Send + 'static,
    ) -> std::io::Result<Writer> {
        let (queue, ops) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || write_loop(conn, &ops, &committed))?;
        Ok(Writer {
            queue: Mutex::new(Some(queue)),
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Runs `op` in the next batch. Its changes are kept if it returns `Ok`, undone if it
    /// returns an error (which its caller gets).
    pub async fn write<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<T> + Send + 'static,
    ) -> StoreResult<T> {
        self.run(move |tx| {
            let result = op(tx);
            (result.is_ok(), result.map_err(StoreError::from))
        })
        .await
    }

    /// Like [`Writer::write`], but a refusal (`Ok(Err(_))`) undoes the op's changes too, for a
    /// state change that finds out only half-way that it must not happen.
    pub async fn write_or_undo<T: Send + 'static, U: Send + 'static>(
        &self,
        op: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<Result<T, U>> + Send + 'static,
    ) -> StoreResult<Result<T, U>> {
        self.run(move |tx| {
            let result = op(tx);
            (
                matches!(result, Ok(Ok(_))),
                result.map_err(StoreError::from),
            )
        })
        .await
    }

    async fn run<T: Send + 'static>(
        &self,
        op: impl FnOnce(&Transaction<'_>) -> (bool, StoreResult<T>) + Send + 'static,
    ) -> StoreResult<T> {
        let (op, answered) = queued(op);
        self.queue
            .lock()
            .expect("not poisoned")
            .as_ref()
            .ok_or_else(closed)?
            .send(op)
            .map_err(|_| closed())?;
        // Dropped unanswered: the op panicked, or the thread is gone.
        answered.await.map_err(|_| closed())?
    }

    /// Takes no more writes, runs those queued and waits for the thread to end.
    pub async fn close(&self) {
        drop(self.queue.lock().expect("not poisoned").take());
        let thread = self.thread.lock().expect("not poisoned").take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// An op for the queue, and where its caller's answer arrives.
fn queued<T: Send + 'static>(
    op: impl FnOnce(&Transaction<'_>) -> (bool, StoreResult<T>) + Send + 'static,
) -> (Op, tokio::sync::oneshot::Receiver<StoreResult<T>>) {
    let (answer, answered) = tokio::sync::oneshot::channel();
    let op: Op = Box::new(move |tx| match tx {
        Err(err) => {
            let _ = answer.send(Err(batch_error(err)));
            Ran {
                keep: false,
                answer: Box::new(|_| {}),
            }
        }
        Ok(tx) => {
            let (keep, result) = op(tx);
            Ran {
                keep,
                answer: Box::new(move |committed| {
                    let _ = answer.send(committed.map_err(batch_error).and(result));
                }),
            }
        }
    });
    (op, answered)
}

fn closed() -> StoreError {
    StoreError::Unavailable(anyhow::anyhow!("the SQLite writer is closed"))
}

/// The error of a batch, for each of its callers (a `rusqlite::Error` is not `Clone`).
fn batch_error(err: &rusqlite::Error) -> StoreError {
    let unavailable = unavailable(err);
    let err = anyhow::anyhow!("{err}").context("Cannot commit to the database");
    if unavailable {
        StoreError::Unavailable(err)
    } else {
        StoreError::Internal(err)
    }
}

/// Whether an error says the database cannot be written now, rather than that a statement
/// failed.
fn unavailable(err: &rusqlite::Error) -> bool {
    use rusqlite::ErrorCode::*;
    matches!(
        err.sqlite_error_code(),
        Some(DatabaseBusy | DatabaseLocked | CannotOpen | SystemIoFailure | DiskFull | ReadOnly)
    )
}

impl From<rusqlite::Error> for StoreError {
    fn from(err: rusqlite::Error) -> Self {
        if unavailable(&err) {
            StoreError::Unavailable(anyhow::Error::new(err))
        } else {
            StoreError::Internal(anyhow::Error::new(err).context("Database error"))
        }
    }
}

fn write_loop(mut conn: Connection, ops: &mpsc::Receiver<Op>, committed: &dyn Fn()) {
    // Ends when every sender is gone and the queue is empty.
    while let Ok(first) = ops.recv() {
        let batch: Vec<Op> = std::iter::once(first)
            .chain(ops.try_iter().take(MAX_BATCH - 1))
            .collect();
        run_batch(&mut conn, batch);
        committed();
    }
    if let Err((_, err)) = conn.close() {
        tracing::warn!(%err, "Cannot close the SQLite writing connection.");
    }
}

fn run_batch(conn: &mut Connection, batch: Vec<Op>) {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(err) => {
            for op in batch {
                op(Err(&err));
            }
            return;
        }
    };
    let mut answers = Vec::with_capacity(batch.len());
    // A savepoint that cannot be ended leaves the transaction in doubt: none of it is kept.
    let mut broken = None;
    for op in batch {
        if let Err(err) = execute(&tx, "SAVEPOINT write") {
            op(Err(&err));
            continue;
        }
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| op(Ok(&tx))));
        let keep = matches!(ran, Ok(Ran { keep: true, .. }));
        let ended = if keep {
            execute(&tx, "RELEASE write")
        } else {
            execute(&tx, "ROLLBACK TO write").and_then(|()| execute(&tx, "RELEASE write"))
        };
        if let Err(err) = ended {
            broken.get_or_insert(err);
        }
        match ran {
            Ok(ran) => answers.push(ran.answer),
            // The op's answer went with it: its caller learns that the write failed.
            Err(_) => tracing::error!("A SQLite write panicked; its changes were undone."),
        }
    }
    let committed = match broken {
        Some(err) => Err(err), // Dropping `tx` rolls it back.
        None => tx.commit(),
    };
    for answer in answers {
        answer(committed.as_ref().map(|_| ()));
    }
}

fn execute(tx: &Transaction<'_>, sql: &str) -> rusqlite::Result<()> {
    tx.prepare_cached(sql)?.execute([])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn connection() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch("CREATE TABLE t (n INTEGER PRIMARY KEY)")
            .unwrap();
        conn
    }

    fn insert(n: i64) -> impl FnOnce(&Transaction<'_>) -> (bool, StoreResult<()>) {
        move |tx| {
            let result = tx.execute("INSERT INTO t (n) VALUES (?1)", [n]).map(drop);
            (result.is_ok(), result.map_err(StoreError::from))
        }
    }

    fn rows(conn: &Connection) -> Vec<i64> {
        conn.prepare("SELECT n FROM t ORDER BY n")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    }

    /// One write of a batch fails (half-way: its first row went in), one panics: the others are
    /// committed, the failed ones leave nothing, and each caller gets its own answer.
    #[tokio::test]
    async fn a_failing_write_undoes_only_itself() {
        let mut conn = connection();
        let (first, first_answer) = queued(insert(1));
        let (failing, failing_answer) = queued(|tx| {
            tx.execute("INSERT INTO t (n) VALUES (2)", []).unwrap();
            let result = tx.execute("INSERT INTO t (n) VALUES (1)", []).map(drop);
            (result.is_ok(), result.map_err(StoreError::from))
        });
        let (panicking, panicking_answer) = queued(|tx| -> (bool, StoreResult<()>) {
            tx.execute("INSERT INTO t (n) VALUES (3)", []).unwrap();
            panic!("a bug in a write")
        });
        let (last, last_answer) = queued(insert(4));
        run_batch(&mut conn, vec![first, failing, panicking, last]);
        assert!(first_answer.await.unwrap().is_ok());
        assert!(matches!(
            failing_answer.await.unwrap(),
            Err(StoreError::Internal(_))
        ));
        assert!(panicking_answer.await.is_err());
        assert!(last_answer.await.unwrap().is_ok());
        assert_eq!(rows(&conn), [1, 4]);
    }

    /// `close` answers every write queued before it, then the thread ends; later writes are
    /// refused as unavailable.
    #[tokio::test]
    async fn closing_drains_the_queue_and_ends_the_thread() {
        let writer = Writer::start(connection(), || {}).unwrap();
        let writes: Vec<_> = (0..100).map(|n| Box::pin(writer.run(insert(n)))).collect();
        // Polled once, each write is in the queue (the thread may answer some at once).
        let mut pending = Vec::new();
        for mut write in writes {
            match futures_util::poll!(&mut write) {
                std::task::Poll::Ready(result) => result.unwrap(),
                std::task::Poll::Pending => pending.push(write),
            }
        }
        writer.close().await;
        assert!(writer.thread.lock().unwrap().is_none());
        for write in pending {
            write.await.unwrap();
        }
        assert!(matches!(
            writer.run(insert(1000)).await,
            Err(StoreError::Unavailable(_))
        ));
    }

    /// Dropping the writer ends its thread (which drops what it holds).
    #[tokio::test]
    async fn dropping_the_writer_ends_its_thread() {
        let held = Arc::new(());
        let writer = Writer::start(connection(), {
            let held = held.clone();
            move || assert!(Arc::strong_count(&held) > 1)
        })
        .unwrap();
        writer.run(insert(1)).await.unwrap();
        drop(writer);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Arc::strong_count(&held) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "the thread did not end"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
