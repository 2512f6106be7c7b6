//! The power-loss model test: test builds record every data write, data
//! `fdatasync`, bitmap page write, journal append, sync and reset, and every
//! acknowledged stable write; a model replays them and fails if a page ever
//! publishes a block whose data no completed `fdatasync` covered, if the
//! journal is emptied while a record in it is not yet covered by durable
//! data and bitmap, or if a write is acknowledged before it is durable (in
//! a synced journal record, or in synced data with its bit synced).
//! `kill -9` (see `tests/cache_crash.rs`) cannot show this ordering, since the
//! page cache survives it; this test can.

use std::sync::Arc;

use bytes::Bytes;

use super::commit::Event;
use super::*;

/// A base of one repeated byte.
struct Fill(u8);

impl BaseRead for Fill {
    async fn read_base(&self, _offset: u64, len: usize) -> std::io::Result<Bytes> {
        Ok(Bytes::from(vec![self.0; len]))
    }
}

/// What the model saw: bitmap pages checked, journal syncs, journal resets,
/// acknowledgements checked.
#[derive(Debug, Default)]
struct Seen {
    pages: usize,
    journal_syncs: usize,
    resets: usize,
    acks: usize,
}

/// Replays the recorded I/O events against a model of power loss: data is
/// durable once an `fdatasync` that started after its write has returned;
/// bitmap bits once the map's `fdatasync` returned after their page write;
/// journal records once the journal's `fdatasync` returned.
/// - every bit in every bitmap page written must belong to durable data;
/// - a journal reset must find every record's blocks durable with their bits;
/// - an acknowledged block must be in a durable record of the live journal,
///   or durable with its bit (acks are checked only in traces without
///   truncation, where a block cannot vanish between its flush and its ack).
fn check_power_loss_model(events: &[Event]) -> Seen {
    use std::collections::BTreeSet;
    let blocks_per_page = super::format::BITMAP_PAGE_BYTES as u64 * 8;
    let (mut written, mut snapshot, mut durable) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::<u64>::new());
    let (mut map_written, mut map_durable) = (BTreeSet::<u64>::new(), BTreeSet::<u64>::new());
    let (mut journal_pending, mut journal_durable) =
        (BTreeSet::<u64>::new(), BTreeSet::<u64>::new());
    let check_acks = !events.iter().any(|e| matches!(e, Event::DataTruncated(_)));
    let mut seen = Seen::default();
    for event in events {
        match event {
            Event::DataWritten(s, e) => written.extend(*s..*e),
            Event::DataSyncStart => snapshot = written.clone(),
            Event::DataSyncEnd => durable.extend(snapshot.iter().copied()),
            Event::DataTruncated(from) => {
                written.retain(|b| b < from);
                durable.retain(|b| b < from);
                journal_durable.retain(|b| b < from);
            }
            Event::MapPage(page, bytes) => {
                seen.pages += 1;
                let first = page * blocks_per_page;
                map_written.retain(|b| *b < first || *b >= first + blocks_per_page);
                for (i, byte) in bytes.iter().enumerate() {
                    for bit in 0..8 {
                        if byte & (1 << bit) != 0 {
                            let block = first + i as u64 * 8 + bit;
                            assert!(
                                durable.contains(&block),
                                "bitmap page {page} publishes block {block} before its data is durable"
                            );
                            map_written.insert(block);
                        }
                    }
                }
            }
            Event::MapSyncEnd => map_durable = map_written.clone(),
            Event::JournalAppend(ranges) => {
                journal_pending = ranges.iter().flat_map(|(s, e)| *s..*e).collect();
            }
            Event::JournalSyncEnd => {
                seen.journal_syncs += 1;
                journal_durable.append(&mut journal_pending);
            }
            Event::JournalReset => {
                seen.resets += 1;
                for block in &journal_durable {
                    assert!(
                        durable.contains(block) && map_durable.contains(block),
                        "journal emptied while block {block} is only in the journal"
                    );
                }
                journal_durable.clear();
            }
            Event::Acked(s, e) if check_acks => {
                seen.acks += 1;
                for block in *s..*e {
                    assert!(
                        journal_durable.contains(&block)
                            || (durable.contains(&block) && map_durable.contains(&block)),
                        "block {block} acknowledged before it was durable"
                    );
                }
            }
            Event::Acked(..) => {}
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_loss_model_never_sees_a_bit_before_its_data() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let blocks = 128u64;
    let cache = Arc::new(
        WriteCache::create(
            &CachePaths::in_dir(dir.path(), "model"),
            blocks * 4096,
            4096,
            Origin::New,
        )
        .await
        .unwrap(),
    );
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let cache = Arc::clone(&cache);
        tasks.push(tokio::spawn(async move {
            for i in 0..40u64 {
                let (op, off, len) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..100u32),
                        rng.random_range(0..blocks * 4096),
                        rng.random_range(1..3 * 4096u64),
                    )
                };
                let data = Bytes::from(vec![(t + i) as u8 | 1; len as usize]);
                match op {
                    0..45 => cache.write(off, data, Stability::FileSync, &NoBase).await,
                    45..85 => cache.write(off, data, Stability::Unstable, &NoBase).await,
                    85..92 => cache.commit().await,
                    92..96 => cache.punch(off, len, &NoBase).await,
                    _ => cache.set_len(off).await,
                }
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cache.commit().await.unwrap();
    let seen = check_power_loss_model(&cache.trace_events());
    assert!(seen.pages > 0, "no bitmap page was ever written");
}

/// Writes and commits only (no truncate), with a small journal so that
/// checkpoints and journal resets interleave with appends: every
/// acknowledgement is checked, and every reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_loss_model_journal_acks_and_resets() {
    use rand::Rng;
    let dir = tempfile::tempdir().unwrap();
    let blocks = 256u64;
    let cache = Arc::new(
        WriteCache::create(
            &CachePaths::in_dir(dir.path(), "journal-model"),
            blocks * 4096,
            4096,
            Origin::Backup,
        )
        .await
        .unwrap(),
    );
    cache.set_checkpoint_bytes(64 << 10);
    let mut tasks = Vec::new();
    for t in 0..12u64 {
        let cache = Arc::clone(&cache);
        tasks.push(tokio::spawn(async move {
            for i in 0..60u64 {
                let (op, off, len) = {
                    let mut rng = rand::rng();
                    (
                        rng.random_range(0..100u32),
                        rng.random_range(0..blocks * 4096 - 12 * 4096),
                        rng.random_range(1..3 * 4096u64),
                    )
                };
                let data = Bytes::from(vec![(t + i) as u8 | 1; len as usize]);
                let base = Fill(0xAB);
                match op {
                    0..60 => cache.write(off, data, Stability::FileSync, &base).await,
                    60..90 => cache.write(off, data, Stability::Unstable, &base).await,
                    90..95 => {
                        // Too large for a record: forces a checkpoint.
                        let big = Bytes::from(vec![t as u8; 300 << 10]);
                        let off = off.min(blocks * 4096 - big.len() as u64);
                        cache.write(off, big, Stability::FileSync, &base).await
                    }
                    _ => cache.commit().await,
                }
                .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cache.commit().await.unwrap();
    let seen = check_power_loss_model(&cache.trace_events());
    assert!(seen.journal_syncs > 0, "no journal flush: {seen:?}");
    assert!(seen.resets > 0, "no journal reset: {seen:?}");
    assert!(seen.acks > 0, "no acknowledgement checked: {seen:?}");
}

#[test]
fn power_loss_model_catches_a_bit_published_too_early() {
    let mut page = vec![0u8; super::format::BITMAP_PAGE_BYTES];
    page[0] = 1;
    let events = vec![
        Event::DataSyncStart,
        Event::DataWritten(0, 1), // after the sync started: not covered
        Event::DataSyncEnd,
        Event::MapPage(0, page),
    ];
    let caught = std::panic::catch_unwind(|| check_power_loss_model(&events));
    assert!(caught.is_err());
}

#[test]
fn power_loss_model_catches_an_early_ack_and_an_early_reset() {
    // Acknowledged after the journal append, before its sync returned.
    let events = vec![
        Event::DataWritten(0, 1),
        Event::JournalAppend(vec![(0, 1)]),
        Event::Acked(0, 1),
        Event::JournalSyncEnd,
    ];
    assert!(std::panic::catch_unwind(|| check_power_loss_model(&events)).is_err());
    // The journal emptied after the data sync but before the map sync.
    let mut page = vec![0u8; super::format::BITMAP_PAGE_BYTES];
    page[0] = 1;
    let events = vec![
        Event::DataWritten(0, 1),
        Event::JournalAppend(vec![(0, 1)]),
        Event::JournalSyncEnd,
        Event::DataSyncStart,
        Event::DataSyncEnd,
        Event::MapPage(0, page),
        Event::JournalReset,
        Event::MapSyncEnd,
    ];
    assert!(std::panic::catch_unwind(|| check_power_loss_model(&events)).is_err());
}
