//! The power-loss model test: test builds record every data write, data
//! `fdatasync` and bitmap page write; a model replays them and fails if a
//! page ever publishes a block whose data no completed `fdatasync` covered.
//! `kill -9` (see `tests/cache_crash.rs`) cannot show this ordering, since the
//! page cache survives it; this test can.

use std::sync::Arc;

use bytes::Bytes;

use super::commit::Event;
use super::*;

/// Replays the recorded I/O events against a model of power loss: data is
/// durable once an `fdatasync` that started after its write has returned.
/// Every bit in every bitmap page written must belong to durable data.
fn check_power_loss_model(events: &[Event]) -> usize {
    use std::collections::BTreeSet;
    let blocks_per_page = super::format::BITMAP_PAGE_BYTES as u64 * 8;
    let (mut written, mut snapshot, mut durable) =
        (BTreeSet::new(), BTreeSet::new(), BTreeSet::<u64>::new());
    let mut pages_checked = 0;
    for event in events {
        match event {
            Event::DataWritten(s, e) => written.extend(*s..*e),
            Event::DataSyncStart => snapshot = written.clone(),
            Event::DataSyncEnd => durable.extend(snapshot.iter().copied()),
            Event::DataTruncated(from) => {
                written.retain(|b| b < from);
                durable.retain(|b| b < from);
            }
            Event::MapPage(page, bytes) => {
                pages_checked += 1;
                for (i, byte) in bytes.iter().enumerate() {
                    for bit in 0..8 {
                        if byte & (1 << bit) != 0 {
                            let block = page * blocks_per_page + i as u64 * 8 + bit;
                            assert!(
                                durable.contains(&block),
                                "bitmap page {page} publishes block {block} before its data is durable"
                            );
                        }
                    }
                }
            }
        }
    }
    pages_checked
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
    let pages = check_power_loss_model(&cache.trace_events());
    assert!(pages > 0, "no bitmap page was ever written");
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
