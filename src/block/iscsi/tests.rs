//! In-process tests of the iSCSI target with a raw client.
