//! The value enums of the CLI's options (`--kind`, `--protocol`,
//! `--method`) and what they mean to the controller.

/// `--kind` of `revive recover`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KindArg {
    /// The VM folder on the NFS datastore, registered with the host.
    Vm,
    /// One disk served as a block export (NBD or iSCSI); a QEMU host boots it from nbd:// or iscsi://.
    Block,
    /// A PostgreSQL data folder, started on a postgres host (a VM-kind
    /// session whose driver is "postgres").
    Postgres,
}

/// `--protocol` of `revive recover --kind block`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ProtocolArg {
    /// NBD (`[nbd]`).
    Nbd,
    /// iSCSI (`[iscsi]`): one target per export, the disk as LUN 0.
    Iscsi,
}

impl From<ProtocolArg> for revive::block::BlockProtocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Nbd => revive::block::BlockProtocol::Nbd,
            ProtocolArg::Iscsi => revive::block::BlockProtocol::Iscsi,
        }
    }
}

impl From<KindArg> for revive::controller::RecoveryKind {
    fn from(k: KindArg) -> Self {
        match k {
            KindArg::Vm | KindArg::Postgres => revive::controller::RecoveryKind::Vm,
            KindArg::Block => revive::controller::RecoveryKind::Block,
        }
    }
}

/// `--method` of `revive migrate`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MethodArg {
    /// The hypervisor moves the running VM (Storage vMotion, QEMU block mirror).
    Live,
    /// revive copies the files, then switches over.
    Copy,
}

impl From<MethodArg> for revive::controller::MigrationMethod {
    fn from(m: MethodArg) -> Self {
        match m {
            MethodArg::Live => revive::controller::MigrationMethod::Live,
            MethodArg::Copy => revive::controller::MigrationMethod::Copy,
        }
    }
}
