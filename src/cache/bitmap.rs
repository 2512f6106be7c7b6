//! The in-memory bitmap of present blocks: sparse pages of `BITMAP_PAGE_BYTES`,
//! so a file written at a far offset costs one page, not a bitmap sized to the
//! offset. It knows nothing of files or durability; `WriteCache` decides
//! which pages are dirty and when they reach disk.

use std::collections::BTreeMap;

use super::format::BITMAP_PAGE_BYTES;

/// 64-bit words per page.
const WORDS: usize = BITMAP_PAGE_BYTES / 8;
/// Blocks covered by one page.
pub const BLOCKS_PER_PAGE: u64 = (BITMAP_PAGE_BYTES * 8) as u64;

type Page = Box<[u64; WORDS]>;

/// A sparse set of block numbers, kept as pages of bits.
#[derive(Debug, Default)]
pub struct Bitmap {
    /// Pages holding at least one set bit (empty pages are dropped).
    pages: BTreeMap<u64, Page>,
    /// Number of set bits, kept current for `bytes_used` metrics.
    count: u64,
}

fn split(block: u64) -> (u64, usize, u64) {
    let page = block / BLOCKS_PER_PAGE;
    let bit = block % BLOCKS_PER_PAGE;
    (page, (bit / 64) as usize, 1u64 << (bit % 64))
}

impl Bitmap {
    /// An empty bitmap.
    pub fn new() -> Bitmap {
        Bitmap::default()
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Numbers of the pages holding at least one set bit, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.pages.keys().copied()
    }

    /// Whether `block` is present.
    pub fn get(&self, block: u64) -> bool {
        let (page, word, mask) = split(block);
        self.pages.get(&page).is_some_and(|p| p[word] & mask != 0)
    }

    /// The runs of set bits within blocks `start..end`, in order, as
    /// half-open block ranges. Skips absent pages and all-clear words, so a
    /// sparse bitmap costs little however wide the range.
    pub fn runs(&self, start: u64, end: u64) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        if start >= end {
            return out;
        }
        let first_page = start / BLOCKS_PER_PAGE;
        let last_page = (end - 1) / BLOCKS_PER_PAGE;
        for (&page_no, page) in self.pages.range(first_page..=last_page) {
            let page_start = page_no * BLOCKS_PER_PAGE;
            let lo = start.max(page_start) - page_start;
            let hi = end.min(page_start + BLOCKS_PER_PAGE) - page_start;
            let mut bit = lo;
            while bit < hi {
                let word = page[(bit / 64) as usize] >> (bit % 64);
                if word == 0 {
                    // Nothing set in the rest of this word.
                    bit = (bit / 64 + 1) * 64;
                    continue;
                }
                let skip = u64::from(word.trailing_zeros());
                let from = bit + skip;
                if from >= hi {
                    break;
                }
                let ones = u64::from((word >> skip).trailing_ones());
                let to = (from + ones).min(hi);
                let (s, e) = (page_start + from, page_start + to);
                match out.last_mut() {
                    Some(last) if last.end == s => last.end = e,
                    _ => out.push(s..e),
                }
                bit = to;
            }
        }
        out
    }

    /// Sets the bits of blocks `start..end`; calls `touched` once per page
    /// that changed.
    pub fn set_range(&mut self, start: u64, end: u64, mut touched: impl FnMut(u64)) {
        let mut block = start;
        while block < end {
            let (page_no, _, _) = split(block);
            let page_end = ((page_no + 1) * BLOCKS_PER_PAGE).min(end);
            let page = self
                .pages
                .entry(page_no)
                .or_insert_with(|| Box::new([0u64; WORDS]));
            let mut changed = false;
            for b in block..page_end {
                let (_, word, mask) = split(b);
                if page[word] & mask == 0 {
                    page[word] |= mask;
                    self.count += 1;
                    changed = true;
                }
            }
            if changed {
                touched(page_no);
            }
            block = page_end;
        }
    }

    /// Clears the bits of blocks `start..end` (`end = u64::MAX` for "all
    /// from `start` on"); calls `touched` once per page that changed.
    pub fn clear_range(&mut self, start: u64, end: u64, mut touched: impl FnMut(u64)) {
        if start >= end {
            return;
        }
        let first = start / BLOCKS_PER_PAGE;
        let pages: Vec<u64> = self.pages.range(first..).map(|(k, _)| *k).collect();
        for page_no in pages {
            let page_start = page_no * BLOCKS_PER_PAGE;
            if page_start >= end {
                break;
            }
            let lo = start.max(page_start);
            let hi = end.min(page_start + BLOCKS_PER_PAGE);
            let Some(page) = self.pages.get_mut(&page_no) else {
                continue;
            };
            let mut changed = false;
            for b in lo..hi {
                let (_, word, mask) = split(b);
                if page[word] & mask != 0 {
                    page[word] &= !mask;
                    self.count -= 1;
                    changed = true;
                }
            }
            if page.iter().all(|w| *w == 0) {
                self.pages.remove(&page_no);
            }
            if changed {
                touched(page_no);
            }
        }
    }

    /// The on-disk bytes of page `page_no` (all zero when the page is empty).
    /// Bit `i` of the page is byte `i / 8`, bit `i % 8`: words are stored
    /// little-endian, which gives exactly that order.
    pub fn page_bytes(&self, page_no: u64) -> Vec<u8> {
        let mut out = vec![0u8; BITMAP_PAGE_BYTES];
        if let Some(page) = self.pages.get(&page_no) {
            for (chunk, word) in out.chunks_exact_mut(8).zip(page.iter()) {
                chunk.copy_from_slice(&word.to_le_bytes());
            }
        }
        out
    }

    /// Loads page `page_no` from its on-disk bytes (a short slice is padded
    /// with zeros). Replaces whatever the page held.
    pub fn load_page(&mut self, page_no: u64, bytes: &[u8]) {
        let mut page = Box::new([0u64; WORDS]);
        for (word, chunk) in page.iter_mut().zip(bytes.chunks(8)) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_le_bytes(b);
        }
        if let Some(old) = self.pages.remove(&page_no) {
            self.count -= old.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        let ones: u64 = page.iter().map(|w| u64::from(w.count_ones())).sum();
        if ones > 0 {
            self.count += ones;
            self.pages.insert(page_no, page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_clear_count_and_pages() {
        let mut bm = Bitmap::new();
        let mut touched = Vec::new();
        bm.set_range(10, 20, |p| touched.push(p));
        bm.set_range(BLOCKS_PER_PAGE - 1, BLOCKS_PER_PAGE + 1, |p| {
            touched.push(p)
        });
        assert_eq!(touched, vec![0, 0, 1]);
        assert_eq!(bm.count(), 12);
        assert!(bm.get(10) && bm.get(19) && !bm.get(20) && !bm.get(9));
        assert!(bm.get(BLOCKS_PER_PAGE));

        touched.clear();
        bm.clear_range(15, u64::MAX, |p| touched.push(p));
        assert_eq!(touched, vec![0, 1]);
        assert_eq!(bm.count(), 5);
        assert!(bm.get(14) && !bm.get(15));

        let bytes = bm.page_bytes(0);
        assert_eq!(bytes[1], 0b0111_1100); // blocks 10..15
        let mut other = Bitmap::new();
        other.load_page(0, &bytes);
        assert_eq!(other.count(), 5);
        assert!(other.get(10) && !other.get(9));
        other.load_page(0, &[0u8; 16]);
        assert_eq!(other.count(), 0);
    }

    #[test]
    fn runs_merge_across_words_and_pages_and_clip() {
        let mut bm = Bitmap::new();
        bm.set_range(3, 5, |_| {});
        bm.set_range(60, 130, |_| {});
        bm.set_range(BLOCKS_PER_PAGE - 2, BLOCKS_PER_PAGE + 3, |_| {});
        assert_eq!(
            bm.runs(0, u64::MAX / 2),
            vec![3..5, 60..130, BLOCKS_PER_PAGE - 2..BLOCKS_PER_PAGE + 3]
        );
        assert_eq!(bm.runs(4, 100), vec![4..5, 60..100]);
        assert_eq!(bm.runs(5, 60), Vec::<std::ops::Range<u64>>::new());
        assert_eq!(
            bm.runs(BLOCKS_PER_PAGE, BLOCKS_PER_PAGE + 1),
            vec![BLOCKS_PER_PAGE..BLOCKS_PER_PAGE + 1]
        );
        // Against a plain scan of every bit.
        let mut scan: Vec<std::ops::Range<u64>> = Vec::new();
        for b in 0..BLOCKS_PER_PAGE + 10 {
            if bm.get(b) {
                match scan.last_mut() {
                    Some(r) if r.end == b => r.end = b + 1,
                    _ => scan.push(b..b + 1),
                }
            }
        }
        assert_eq!(bm.runs(0, BLOCKS_PER_PAGE + 10), scan);
    }
}
