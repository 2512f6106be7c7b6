//! Pins: restore points that a live session reads (a publication), recorded
//! in the repository so that `forget` refuses them and `gc` never removes a
//! chunk a session can read, whichever machine runs the session.
//!
//! A pin is an object `pins/<point id>/<holder>`; the holder names the
//! datastore and publication, so several servers can pin one point.

use bytes::Bytes;
use chrono::Utc;
use serde_json::json;

use super::{RepoError, Repository};

impl Repository {
    /// Records that `holder` reads restore point `point`.
    pub async fn pin(&self, point: &str, holder: &str) -> Result<(), RepoError> {
        self.point(point).await?;
        let body = json!({ "point": point, "holder": holder, "since": Utc::now() });
        let key = pin_key(point, holder)?;
        self.store()
            .put(&key, Bytes::from(body.to_string()))
            .await?;
        self.store().sync().await?;
        // A `forget` on another server may have deleted the manifest between
        // our first look and the pin: look again now that the pin is visible
        // (forget lists pins after deleting, so one of us sees the other).
        if let Err(e) = self.point(point).await {
            let _ = self.store().delete(&key).await;
            return Err(e);
        }
        Ok(())
    }

    /// Removes a pin (missing pins are fine).
    pub async fn unpin(&self, point: &str, holder: &str) -> Result<(), RepoError> {
        self.store().delete(&pin_key(point, holder)?).await?;
        Ok(())
    }

    /// Holders pinning `point`.
    pub async fn pins(&self, point: &str) -> Result<Vec<String>, RepoError> {
        let prefix = format!("pins/{point}/");
        Ok(self
            .store()
            .list(&prefix)
            .await?
            .into_iter()
            .filter_map(|m| m.key.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }
}

fn pin_key(point: &str, holder: &str) -> Result<String, RepoError> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            && s != "."
            && s != ".."
    };
    if ok(point) && ok(holder) {
        Ok(format!("pins/{point}/{holder}"))
    } else {
        Err(RepoError::BadPin {
            holder: holder.to_string(),
        })
    }
}
