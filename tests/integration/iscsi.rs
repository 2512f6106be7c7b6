//! iSCSI target: libiscsi's conformance suite against revive and the
//! reference target tgtd side by side, libiscsi's tools, the allow-list,
//! malformed PDUs, and (in `iscsi/`) whole-system tests over a published
//! restore point.

mod conformance;
mod crash;
mod published;
mod sessions;
mod wire;
