//! Results of verification boots, kept beside the restore point they prove:
//! `checks/<point id>/boot.json` and the console screenshot
//! `checks/<point id>/boot.png`. The point's manifest is never touched: a
//! result is a separate object, replaced by the next verification of the
//! same point, and removed with the point by `forget`.

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{RepoError, Repository};
use crate::store::StoreError;

/// Prefix of every verification result.
const CHECKS: &str = "checks/";

/// How a verification boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootVerdict {
    /// Every success signal was seen before the timeout.
    Ok,
    /// A signal was missing at the timeout, or the VM could not be started.
    Failed,
}

impl BootVerdict {
    /// `ok` or `failed`, as `revive points` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            BootVerdict::Ok => "ok",
            BootVerdict::Failed => "failed",
        }
    }
}

/// The result of one verification boot of a restore point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BootRecord {
    /// The restore point booted.
    pub point: String,
    /// Its VM.
    pub vm: String,
    /// Ok or failed.
    pub verdict: BootVerdict,
    /// Why it failed (the missing signal, or the step that failed); empty when ok.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    /// The signals that were seen, in the order they were seen.
    #[serde(default)]
    pub signals: Vec<String>,
    /// When the boot started.
    pub started: DateTime<Utc>,
    /// Seconds from power on to the verdict.
    pub seconds: f64,
    /// The host the VM booted on.
    pub host: String,
    /// A screenshot of the VGA console is stored beside the record.
    pub screenshot: bool,
}

fn record_key(point: &str) -> String {
    format!("{CHECKS}{point}/boot.json")
}

fn screenshot_key(point: &str) -> String {
    format!("{CHECKS}{point}/boot.png")
}

impl Repository {
    /// Stores the result of a verification boot (and its screenshot), replacing an older one.
    pub async fn record_boot(
        &self,
        record: &BootRecord,
        screenshot: Option<Bytes>,
    ) -> Result<(), RepoError> {
        // The point must exist: a result must not outlive a forgotten point.
        self.point(&record.point).await?;
        match screenshot {
            Some(png) => self.store.put(&screenshot_key(&record.point), png).await?,
            None => self.store.delete(&screenshot_key(&record.point)).await?,
        }
        let json = serde_json::to_vec_pretty(record).map_err(|e| RepoError::CorruptObject {
            key: record_key(&record.point),
            reason: e.to_string(),
        })?;
        // The record last: a reader that finds it finds its screenshot.
        self.store
            .put(&record_key(&record.point), Bytes::from(json))
            .await?;
        self.store.sync().await?;
        Ok(())
    }

    /// The last verification boot of `point`, if it was ever verified.
    pub async fn boot_record(&self, point: &str) -> Result<Option<BootRecord>, RepoError> {
        let raw = match self.store.get(&record_key(point)).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) | Err(StoreError::InvalidKey { .. }) => {
                return Ok(None)
            }
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&raw)
            .map(Some)
            .map_err(|e| RepoError::CorruptObject {
                key: record_key(point),
                reason: e.to_string(),
            })
    }

    /// The screenshot of the last verification boot of `point` (PNG).
    pub async fn boot_screenshot(&self, point: &str) -> Result<Option<Bytes>, RepoError> {
        match self.store.get(&screenshot_key(point)).await {
            Ok(png) => Ok(Some(png)),
            Err(StoreError::NotFound { .. }) | Err(StoreError::InvalidKey { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the verification results of a point (`forget` does this).
    pub(super) async fn drop_boot_record(&self, point: &str) -> Result<(), RepoError> {
        self.store.delete(&record_key(point)).await?;
        self.store.delete(&screenshot_key(point)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::repo::backup::{backup, BackupOptions};

    #[tokio::test]
    async fn a_record_sits_beside_its_point_and_goes_with_it() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = Repository::init(
            std::sync::Arc::new(crate::store::LocalStore::open(tmp.path().join("r")).unwrap()),
            1 << 16,
        )
        .await
        .unwrap();
        let vm = tmp.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        std::fs::write(vm.join("vm-flat.vmdk"), vec![7u8; 1 << 17]).unwrap();
        let point = backup(&repo, &vm, &BackupOptions::default(), &NoProgress)
            .await
            .unwrap();
        assert_eq!(repo.boot_record(&point.id).await.unwrap(), None);

        let record = BootRecord {
            point: point.id.clone(),
            vm: point.vm.clone(),
            verdict: BootVerdict::Failed,
            reason: "no console line matched 'login:' within 5 s".into(),
            signals: vec![],
            started: Utc::now(),
            seconds: 5.0,
            host: "lab".into(),
            screenshot: true,
        };
        let png = Bytes::from_static(b"\x89PNG\r\n\x1a\n");
        repo.record_boot(&record, Some(png.clone())).await.unwrap();
        assert_eq!(repo.boot_record(&point.id).await.unwrap(), Some(record));
        assert_eq!(repo.boot_screenshot(&point.id).await.unwrap(), Some(png));
        // The manifest is unchanged: the point reads back equal.
        assert_eq!(repo.point(&point.id).await.unwrap(), point);

        repo.forget(&point.id).await.unwrap();
        assert_eq!(repo.boot_record(&point.id).await.unwrap(), None);
        assert_eq!(repo.boot_screenshot(&point.id).await.unwrap(), None);
    }
}
