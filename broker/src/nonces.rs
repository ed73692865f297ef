//! Replay protection for signed agent requests: each nonce is accepted once while its request's
//! timestamp is inside the clock window.
//!
//! Seen nonces live in memory, so checking one costs no database write on the request's path;
//! they are written to SQLite in batches by the sweeper (every tick, at most a second apart) and
//! loaded again at start-up, so a restarted broker still refuses replays. Only the nonces of the
//! last tick before a crash can be lost, and a replay of those also needs a captured request.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::store::{Store, StoreResult};

#[derive(Debug, Default)]
pub struct NonceGuard {
    /// (agent id, nonce) → when it may be forgotten (Unix ms).
    seen: Mutex<HashMap<(String, String), i64>>,
    /// Recorded but not yet written to the database.
    unsaved: Mutex<Vec<(String, String, i64)>>,
}

impl NonceGuard {
    /// The nonces the database holds that have not expired.
    pub async fn load(db: &dyn Store, now_ms: i64) -> StoreResult<NonceGuard> {
        let live = db.live_nonces(now_ms).await?;
        let seen = live
            .into_iter()
            .map(|(agent, nonce, expires)| ((agent, nonce), expires))
            .collect();
        Ok(NonceGuard {
            seen: Mutex::new(seen),
            unsaved: Mutex::default(),
        })
    }

    /// Records a nonce; false if it was seen before (a replay). With a database that other
    /// brokers share, the database decides, so a request replayed to another broker is refused
    /// too; otherwise this broker's memory does, and the nonce is saved with the next batch.
    pub async fn record(
        &self,
        db: &dyn Store,
        agent: &str,
        nonce: &str,
        expires_at_ms: i64,
    ) -> StoreResult<bool> {
        let key = (agent.to_string(), nonce.to_string());
        {
            let mut seen = self.seen.lock().expect("nonce map poisoned");
            if seen.contains_key(&key) {
                return Ok(false);
            }
            seen.insert(key, expires_at_ms);
        }
        if db.shared() {
            return db.use_nonce(agent, nonce, expires_at_ms).await;
        }
        self.unsaved.lock().expect("nonce list poisoned").push((
            agent.to_string(),
            nonce.to_string(),
            expires_at_ms,
        ));
        Ok(true)
    }

    /// Writes the nonces recorded since the last call and forgets expired ones.
    pub async fn persist(&self, db: &dyn Store, now_ms: i64) -> StoreResult<()> {
        let batch = std::mem::take(&mut *self.unsaved.lock().expect("nonce list poisoned"));
        if !batch.is_empty()
            && let Err(err) = db.insert_nonces(&batch).await
        {
            // Keep them for the next tick rather than lose them.
            self.unsaved
                .lock()
                .expect("nonce list poisoned")
                .extend(batch);
            return Err(err);
        }
        self.seen
            .lock()
            .expect("nonce map poisoned")
            .retain(|_, expires| *expires >= now_ms);
        Ok(())
    }
}
