//! Loading restore point manifests: all of them, one by id, or the one a
//! spec (`id`, id prefix, `NAME@latest`) names.

use super::manifest::{pick, PointSummary, RestorePoint};
use super::{RepoError, Repository};
use crate::store::StoreError;

impl Repository {
    /// Every restore point, oldest first.
    pub async fn points(&self) -> Result<Vec<RestorePoint>, RepoError> {
        let mut out = Vec::new();
        for id in self.point_ids().await? {
            match self.point(&id).await {
                Ok(p) => out.push(p),
                // Forgotten between list and get: not an error.
                Err(RepoError::PointNotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// Loads one manifest by its full id.
    pub async fn point(&self, id: &str) -> Result<RestorePoint, RepoError> {
        let key = RestorePoint::key_of(id);
        let raw = match self.store.get(&key).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) | Err(StoreError::InvalidKey { .. }) => {
                return Err(RepoError::PointNotFound { spec: id.into() })
            }
            Err(e) => return Err(e.into()),
        };
        RestorePoint::parse(id, &key, &raw)
    }

    /// Resolves a full id, a unique id prefix, or `NAME@latest`.
    ///
    /// A tree manifest lists thousands of entries: candidates are compared by
    /// the few fields resolution needs ([`PointSummary`]), and only the
    /// chosen manifest is parsed in full, so resolving stays cheap in a
    /// repository of hundreds of tree points.
    pub async fn resolve(&self, spec: &str) -> Result<RestorePoint, RepoError> {
        let mut summaries = Vec::new();
        for id in self.point_ids().await? {
            let key = RestorePoint::key_of(&id);
            match self.store.get(&key).await {
                Ok(raw) => summaries.push(PointSummary::parse(&key, &raw)?),
                // Forgotten between list and get: not an error.
                Err(StoreError::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let chosen = pick(&summaries, spec, |s| (&s.id, &s.vm, s.created))?;
        self.point(&chosen.id).await
    }

    /// Ids of every manifest in the store.
    async fn point_ids(&self) -> Result<Vec<String>, RepoError> {
        Ok(self
            .store
            .list("points/")
            .await?
            .into_iter()
            .filter_map(|meta| {
                meta.key
                    .strip_prefix("points/")
                    .and_then(|k| k.strip_suffix(".json"))
                    .map(str::to_string)
            })
            .collect())
    }
}
