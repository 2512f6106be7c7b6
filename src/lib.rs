//! revive: instant VM recovery straight out of a deduplicated backup repository.

pub mod nfs;
