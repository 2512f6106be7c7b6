//! Whole-system tests: the `revive` binary and library against real files,
//! real clients and real peers. One test binary (`autotests = false`) keeps
//! link times down; each module is one area.

mod datastore;
mod fuse;
mod hardening;
mod iscsi;
mod nbd;
mod nfs_proto;
mod postgres;
mod postgres_bench;
mod postgres_session;
mod qemu;
mod repo_cli;
mod s3;
mod sessions;
mod snapshots;
mod support;
mod trees;
mod verify_boot;
mod vsphere;
mod web;
