//! Verify: re-reads every chunk that restore points use and checks its hash:
//! every index page and every chunk a VM point's files or a tree point's
//! files (inline chunk lists and pages alike) name.
//!
//! A problem names the object and every restore point that depends on it, so
//! an operator knows which backups are affected.

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use serde::Serialize;
use tracing::warn;

use super::chunk::ChunkId;
use super::manifest::RestorePoint;
use super::tree::IndexRef;
use super::{RepoError, Repository};
use crate::progress::Progress;

/// Chunks checked at once.
const CHUNKS_IN_FLIGHT: usize = 4;

/// What is wrong with an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "reason")]
pub enum ProblemKind {
    /// Not in the store.
    Missing,
    /// Present but wrong.
    Corrupt(String),
}

/// One damaged object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// Store key of the object (`chunks/…`, `pages/…`).
    pub object: String,
    /// What is wrong.
    pub problem: ProblemKind,
    /// Restore points that use it.
    pub points: Vec<String>,
}

/// Outcome of a verify run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VerifyReport {
    /// Restore points checked.
    pub points: usize,
    /// Distinct chunks read.
    pub chunks_checked: u64,
    /// Plain bytes checked.
    pub bytes_checked: u64,
    /// Damaged objects; empty when everything is sound.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Repository {
    /// Verifies the given restore points (all when `points` is empty).
    pub async fn verify(
        &self,
        points: &[RestorePoint],
        progress: &dyn Progress,
    ) -> Result<VerifyReport, RepoError> {
        let mut report = VerifyReport {
            points: points.len(),
            ..VerifyReport::default()
        };
        // chunk → indexes into `points` that use it
        let mut users: BTreeMap<ChunkId, BTreeSet<usize>> = BTreeMap::new();
        for (n, point) in points.iter().enumerate() {
            for (_, index) in point.file_indexes() {
                let pages = match index {
                    IndexRef::Inline(chunks) => {
                        for id in chunks.iter().filter(|id| !id.is_hole()) {
                            users.entry(*id).or_default().insert(n);
                        }
                        continue;
                    }
                    IndexRef::Pages(pages) => pages,
                };
                for page_id in pages {
                    match self.page(page_id).await {
                        Ok(page) => {
                            for id in page.entries.iter().filter(|id| !id.is_hole()) {
                                users.entry(*id).or_default().insert(n);
                            }
                        }
                        Err(RepoError::CorruptObject { key, reason }) => {
                            warn!(object = %key, point = %point.id, %reason, "damaged index page");
                            report.problems.push(Problem {
                                object: key,
                                problem: ProblemKind::Corrupt(reason),
                                points: vec![point.id.clone()],
                            });
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        progress.set_total(users.len() as u64);
        let mut results = stream::iter(users.keys().copied())
            .map(|id| async move { (id, self.read_chunk(&id).await) })
            .buffer_unordered(CHUNKS_IN_FLIGHT);
        while let Some((id, result)) = results.next().await {
            progress.advance(1);
            report.chunks_checked += 1;
            let problem = match result {
                Ok(data) => {
                    report.bytes_checked += data.len() as u64;
                    continue;
                }
                Err(RepoError::MissingChunk { .. }) => ProblemKind::Missing,
                Err(RepoError::CorruptChunk { reason, .. }) => ProblemKind::Corrupt(reason),
                Err(e) => return Err(e),
            };
            let affected: Vec<String> = users
                .get(&id)
                .map(|set| set.iter().map(|&n| points[n].id.clone()).collect())
                .unwrap_or_default();
            warn!(chunk = %id, problem = ?problem, points = ?affected, "damaged chunk");
            report.problems.push(Problem {
                object: id.key(),
                problem,
                points: affected,
            });
        }
        report.problems.sort_by(|a, b| a.object.cmp(&b.object));
        Ok(report)
    }
}
