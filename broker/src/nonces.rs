//! Replay protection for signed agent requests: each nonce is accepted once while its request's
//! timestamp is inside the clock window.
//!
//! Seen nonces live in memory, so checking one costs no database write on the request's path;
//! they are written to SQLite in batches by the sweeper (every tick, at most a second apart) and
//! loaded again at start-up, so a restarted broker still refuses replays. Only the nonces of the
//! last tick before a crash can be lost, and a replay of those also needs a captured request.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::db::Db;

#[derive(Debug, Default)]
pub struct NonceGuard {
    /// (agent id, nonce) → when it may be forgotten (Unix ms).
    seen: Mutex<HashMap<(String, String), i64>>,
    /// Recorded but not yet written to the database.
    unsaved: Mutex<Vec<(String, String, i64)>>,
}

impl NonceGuard {
    /// The nonces the database holds that have not expired.
    pub async fn load(db: &Db, now_ms: i64) -> sqlx::Result<NonceGuard> {
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

    /// Records a nonce; false if it was seen before (a replay).
    pub fn record(&self, agent: &str, nonce: &str, expires_at_ms: i64) -> bool {
        let key = (agent.to_string(), nonce.to_string());
        let mut seen = self.seen.lock().expect("nonce map poisoned");
        if seen.contains_key(&key) {
            return false;
        }
        seen.insert(key, expires_at_ms);
        drop(seen);
        self.unsaved.lock().expect("nonce list poisoned").push((
            agent.to_string(),
            nonce.to_string(),
            expires_at_ms,
        ));
        true
    }

    /// Writes the nonces recorded since the last call and forgets expired ones.
    pub async fn persist(&self, db: &Db, now_ms: i64) -> sqlx::Result<()> {
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
