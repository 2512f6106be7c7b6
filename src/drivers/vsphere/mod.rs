//! The `vsphere` driver: VMware ESXi or vCenter through the vim25 SOAP API.
//!
//! # What a session does on the host
//! 1. `validate`: log in, find the host (`esx_host`, or the only host of a
//!    standalone ESXi), check free memory against the VM's `memsize`, and
//!    that `redirect_datastore` exists.
//! 2. `attach_datastore`: `CreateNasDatastore` (NFS v3, read-write) under the
//!    name the controller chose, or find it already mounted with the same
//!    remote host and path. Every session on a host shares it.
//! 3. `register_vm`: `RegisterVM_Task` of `[datastore] folder/x.vmx` under the
//!    session name, or find the VM already registered from that path. With
//!    `redirect_datastore`, the VM's working directory moves there and a
//!    snapshot is taken before power-on, so ESXi writes the delta disks (and
//!    swap) on production storage rather than in revive's write cache.
//! 4. `power_on`, and later `start_live_migration` (`RelocateVM_Task`, i.e.
//!    Storage vMotion) tracked through the task's `info`.
//!
//! # Files
//! `config.rs` the settings, `soap.rs` envelopes and faults, `xml.rs` the
//! element tree, `client.rs` the session and PropertyCollector, `api.rs`
//! typed calls.
//!
//! # References
//! [`VmRef`] is the VM's managed object id (`vm-42`); [`TaskRef`] is
//! `<task id>|<destination datastore>`, so the status of a migration whose
//! task the server has already forgotten (vCenter keeps finished tasks for
//! minutes only) can still be read from where the VM's files are.

pub mod api;
pub mod client;
mod config;
pub mod soap;
pub mod xml;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::api::{datastore_path, fault_error, is_fault, HostContext};
use self::client::{CallError, ClientConfig, VimClient};
use self::soap::MoRef;
use super::{
    DatastoreSpec, Driver, DriverError, DriverResult, HostInfo, MigrationStatus, TaskRef, VmRef,
    VmSpec,
};

pub use self::client::{CONNECT_TIMEOUT, REQUEST_TIMEOUT};
pub use self::config::{VsphereConfig, DEFAULT_TASK_TIMEOUT_SECS};

/// Name of the snapshot that redirects a VM's writes to production storage.
pub const REDIRECT_SNAPSHOT: &str = "revive-redirect";

/// Builds the driver of a vSphere host. Does not connect: the first call does.
pub fn build(host: &str, config: &VsphereConfig) -> DriverResult<Arc<dyn Driver>> {
    Ok(Arc::new(VsphereDriver::new(host, config)?))
}

/// The vSphere driver of one configured host.
pub struct VsphereDriver {
    host: String,
    config: VsphereConfig,
    client: VimClient,
}

impl VsphereDriver {
    /// A driver for `host` (the `[[host]]` name, used in errors).
    ///
    /// # Errors
    /// No password, an unset `password_env`, or an unreadable `ca_file`.
    pub fn new(host: &str, config: &VsphereConfig) -> DriverResult<VsphereDriver> {
        let password = match (&config.password, &config.password_env) {
            (Some(p), _) => p.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| DriverError::Auth {
                host: host.to_string(),
                reason: format!("environment variable '{var}' (password_env) is not set"),
            })?,
            (None, None) => {
                return Err(DriverError::Auth {
                    host: host.to_string(),
                    reason: "no password: set password_env (or password)".into(),
                })
            }
        };
        let client = VimClient::new(ClientConfig {
            host: host.to_string(),
            url: config.url.clone(),
            user: config.user.clone(),
            password,
            insecure: config.insecure,
            ca_file: config.ca_file.clone(),
        })?;
        Ok(VsphereDriver {
            host: host.to_string(),
            config: config.clone(),
            client,
        })
    }

    fn task_timeout(&self) -> Duration {
        Duration::from_secs(self.config.task_timeout_secs)
    }

    /// Logs out of the server (the next call logs in again).
    pub async fn logout(&self) -> DriverResult<()> {
        self.client.logout().await
    }

    /// The host this driver runs VMs on, with its place in the inventory.
    async fn host_context(&self) -> DriverResult<HostContext> {
        let op = "find host";
        let content = self.client.content().await?;
        let container = match &self.config.datacenter {
            Some(dc) => api::find_datacenter(&self.client, dc)
                .await
                .map_err(|e| fault_error(e, op))?
                .ok_or_else(|| DriverError::NotFound {
                    kind: "datacenter",
                    name: dc.clone(),
                })?,
            None => content.root_folder.clone(),
        };
        let hosts = api::list_hosts(&self.client, &container)
            .await
            .map_err(|e| fault_error(e, op))?;
        let host = match &self.config.esx_host {
            Some(name) => hosts
                .into_iter()
                .find(|h| h.text("name") == Some(name.as_str()))
                .ok_or_else(|| DriverError::NotFound {
                    kind: "ESXi host",
                    name: name.clone(),
                })?,
            None if hosts.len() == 1 => {
                hosts
                    .into_iter()
                    .next()
                    .ok_or_else(|| DriverError::NotFound {
                        kind: "ESXi host",
                        name: self.host.clone(),
                    })?
            }
            None => {
                return Err(DriverError::Fault {
                    operation: format!("find the ESXi host of '{}'", self.host),
                    message: format!(
                        "{} hosts in the inventory of '{}'; set esx_host to one of: {}",
                        hosts.len(),
                        self.config.url,
                        hosts
                            .iter()
                            .filter_map(|h| h.text("name"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        };
        api::host_context(&self.client, &host.obj)
            .await
            .map_err(|e| fault_error(e, op))
    }

    /// A datastore mounted on the host, by name.
    async fn host_datastore(
        &self,
        ctx: &HostContext,
        name: &str,
    ) -> DriverResult<Option<api::DatastoreInfo>> {
        let all = api::host_datastores(&self.client, &ctx.host)
            .await
            .map_err(|e| fault_error(e, "list datastores"))?;
        Ok(all.into_iter().find(|d| d.name == name))
    }

    /// Like [`Self::host_datastore`], but a missing datastore is an error.
    async fn require_datastore(
        &self,
        ctx: &HostContext,
        name: &str,
    ) -> DriverResult<api::DatastoreInfo> {
        self.host_datastore(ctx, name)
            .await?
            .ok_or_else(|| DriverError::NotFound {
                kind: "datastore",
                name: format!("{name}' on host '{}", ctx.name),
            })
    }

    fn vm_moref(vm: &VmRef) -> MoRef {
        MoRef::new("VirtualMachine", &vm.0)
    }

    fn vm_error(&self, e: CallError, operation: &str, vm: &VmRef) -> DriverError {
        if is_fault(&e, "ManagedObjectNotFound") {
            return DriverError::NotFound {
                kind: "VM",
                name: format!("{}' on '{}", vm.0, self.host),
            };
        }
        fault_error(e, operation)
    }

    /// Moves the VM's working directory to the redirect datastore and takes
    /// the snapshot whose delta disks receive its writes. Idempotent.
    async fn redirect_writes(
        &self,
        ctx: &HostContext,
        vm: &MoRef,
        spec: &VmSpec,
        redirect: &str,
    ) -> DriverResult<()> {
        let op = format!(
            "redirect writes of VM '{}' to datastore '{redirect}'",
            spec.name
        );
        self.require_datastore(ctx, redirect).await?;
        let info = api::vm_info(&self.client, vm)
            .await
            .map_err(|e| fault_error(e, &op))?;
        let dir = datastore_path(redirect, &spec.name);
        let wanted = [dir.clone(), format!("{dir}/")];
        if !info
            .snapshot_directory
            .as_deref()
            .is_some_and(|d| wanted.iter().any(|w| w == d))
        {
            api::make_directory(&self.client, &ctx.datacenter, &dir)
                .await
                .map_err(|e| fault_error(e, &op))?;
            // snapshotDirectory is the .vmx's workingDir: snapshots, delta
            // disks and the swap file go there.
            let files = format!(
                "<spec><files>{}</files></spec>",
                soap::field("snapshotDirectory", &dir)
            );
            api::run_vm_task(
                &self.client,
                vm,
                "ReconfigVM_Task",
                &files,
                self.task_timeout(),
            )
            .await
            .map_err(|e| fault_error(e, &op))?;
        }
        // Only our own snapshot counts: a VM backed up with snapshots of
        // its own still needs the redirect on top of them.
        if info.snapshot(REDIRECT_SNAPSHOT).is_none() {
            let args = format!(
                "{}{}{}{}",
                soap::field("name", REDIRECT_SNAPSHOT),
                soap::field(
                    "description",
                    "revive: the VM's writes go to production storage"
                ),
                soap::field("memory", "false"),
                soap::field("quiesce", "false")
            );
            api::run_vm_task(
                &self.client,
                vm,
                "CreateSnapshot_Task",
                &args,
                self.task_timeout(),
            )
            .await
            .map_err(|e| fault_error(e, &op))?;
        }
        Ok(())
    }
}

impl VsphereDriver {
    /// Status of a VM whose Storage vMotion succeeded: `Ready` while the
    /// redirect snapshot still waits for consolidation (done by
    /// `complete_live_migration`), `Completed` otherwise.
    async fn after_relocation(&self, vm: &VmRef) -> DriverResult<MigrationStatus> {
        if self.config.redirect_datastore.is_none() {
            return Ok(MigrationStatus::Completed);
        }
        let info = api::vm_info(&self.client, &Self::vm_moref(vm))
            .await
            .map_err(|e| self.vm_error(e, "read VM", vm))?;
        Ok(if info.snapshot(REDIRECT_SNAPSHOT).is_some() {
            MigrationStatus::Ready
        } else {
            MigrationStatus::Completed
        })
    }
}

fn parse_task_ref(task: &TaskRef) -> (MoRef, Option<&str>) {
    match task.0.split_once('|') {
        Some((id, dest)) => (MoRef::new("Task", id), Some(dest)),
        None => (MoRef::new("Task", &task.0), None),
    }
}

#[async_trait]
impl Driver for VsphereDriver {
    fn kind(&self) -> &'static str {
        "vsphere"
    }

    async fn validate(&self, vm: &VmSpec) -> DriverResult<HostInfo> {
        if let Some(disk) = vm.disks().find(|d| d.location.is_some()) {
            return Err(DriverError::UnsupportedVm {
                driver: "vsphere",
                vm: vm.source_vm.clone(),
                reason: format!(
                    "disk '{}' is a block image that ESXi can only use as a LUN (iSCSI), which revive cannot present yet; recover it on a qemu host",
                    disk.name
                ),
            });
        }
        let ctx = self.host_context().await?;
        if let Some(redirect) = &self.config.redirect_datastore {
            self.require_datastore(&ctx, redirect).await?;
        }
        let free = match (ctx.memory_mib, ctx.memory_used_mib) {
            (Some(total), Some(used)) => Some(total.saturating_sub(used)),
            (Some(total), None) => Some(total),
            _ => None,
        };
        if let (Some(needed), Some(available)) = (vm.memory_mib, free) {
            if needed > available {
                return Err(DriverError::InsufficientMemory {
                    host: ctx.name,
                    needed_mib: needed,
                    available_mib: available,
                });
            }
        }
        Ok(HostInfo {
            free_memory_mib: free,
        })
    }

    async fn attach_datastore(&self, datastore: &DatastoreSpec) -> DriverResult<()> {
        let op = format!("mount datastore '{}'", datastore.name);
        let ctx = self.host_context().await?;
        let all = api::host_datastores(&self.client, &ctx.host)
            .await
            .map_err(|e| fault_error(e, &op))?;
        let same_remote = |d: &api::DatastoreInfo| {
            d.remote_host.as_deref() == Some(datastore.remote_host.as_str())
                && d.remote_path.as_deref() == Some(datastore.remote_path.as_str())
        };
        if let Some(existing) = all.iter().find(|d| d.name == datastore.name) {
            if same_remote(existing) {
                return Ok(());
            }
            return Err(DriverError::Duplicate {
                kind: "datastore (mounting another NFS share)",
                name: datastore.name.clone(),
            });
        }
        if let Some(other) = all.iter().find(|d| same_remote(d)) {
            return Err(DriverError::Fault {
                operation: op,
                message: format!(
                    "host '{}' already mounts {}:{} as datastore '{}'",
                    ctx.name, datastore.remote_host, datastore.remote_path, other.name
                ),
            });
        }
        // Real ESXi takes localPath as the datastore's name. vcsim (set up
        // with nas_local_path) takes it as the folder it shows: the folder
        // revive knows for this datastore (a snapshot clone's), else the
        // configured one.
        let local_path = match (&self.config.nas_local_path, &datastore.local_path) {
            (Some(_), Some(own)) => own.to_string_lossy().into_owned(),
            (Some(configured), None) => configured.to_string_lossy().into_owned(),
            (None, _) => datastore.name.clone(),
        };
        let created = api::create_nas_datastore(
            &self.client,
            &ctx.datastore_system,
            &datastore.remote_host,
            &datastore.remote_path,
            &local_path,
        )
        .await;
        match created {
            Ok(_) => {}
            // Another session of this host won the race: fine if it is ours.
            Err(e) if is_fault(&e, "DuplicateName") || is_fault(&e, "AlreadyExists") => {
                if let Some(d) = self.host_datastore(&ctx, &datastore.name).await? {
                    if same_remote(&d) {
                        return Ok(());
                    }
                }
                return Err(DriverError::Duplicate {
                    kind: "datastore",
                    name: datastore.name.clone(),
                });
            }
            Err(e) => return Err(fault_error(e, &op)),
        }
        // vcsim names a NAS datastore after the last component of localPath;
        // check the host shows the name the controller asked for.
        if self.host_datastore(&ctx, &datastore.name).await?.is_none() {
            return Err(DriverError::Fault {
                operation: op,
                message: format!(
                    "the host mounted {}:{} under another name (localPath '{local_path}')",
                    datastore.remote_host, datastore.remote_path
                ),
            });
        }
        tracing::info!(host = %self.host, datastore = %datastore.name, "NFS datastore mounted");
        Ok(())
    }

    async fn detach_datastore(&self, datastore: &DatastoreSpec) -> DriverResult<()> {
        let op = format!("remove datastore '{}'", datastore.name);
        let ctx = self.host_context().await?;
        let Some(found) = self.host_datastore(&ctx, &datastore.name).await? else {
            return Ok(());
        };
        if found.remote_host.as_deref() != Some(datastore.remote_host.as_str())
            || found.remote_path.as_deref() != Some(datastore.remote_path.as_str())
        {
            // Same name, another share: not ours to remove.
            tracing::warn!(host = %self.host, datastore = %datastore.name,
                "datastore mounts another NFS share; left in place");
            return Ok(());
        }
        match api::remove_datastore(
            &self.client,
            &ctx.datastore_system,
            &found.moref,
            self.task_timeout(),
        )
        .await
        {
            Ok(()) => {}
            Err(e) if is_fault(&e, "ManagedObjectNotFound") || is_fault(&e, "NotFound") => {}
            Err(e) => return Err(fault_error(e, &op)),
        }
        tracing::info!(host = %self.host, datastore = %datastore.name, "NFS datastore removed");
        Ok(())
    }

    async fn register_vm(&self, datastore: &DatastoreSpec, vm: &VmSpec) -> DriverResult<VmRef> {
        if vm.lab.is_some() {
            // Isolating a guest here needs a port group without uplinks on
            // the host, which revive does not create.
            return Err(DriverError::NotSupported {
                driver: "vsphere",
                operation: "lab networks (verification boots run on a qemu host)",
            });
        }
        let vmx = vm.vmx().ok_or_else(|| DriverError::UnsupportedVm {
            driver: "vsphere",
            vm: vm.source_vm.clone(),
            reason: "the backup has no .vmx file".into(),
        })?;
        let rest = if vm.folder.is_empty() {
            vmx.name.clone()
        } else {
            format!("{}/{}", vm.folder.trim_end_matches('/'), vmx.name)
        };
        let path = datastore_path(&datastore.name, &rest);
        let op = format!("register VM '{}' from '{path}'", vm.name);
        let ctx = self.host_context().await?;

        let existing = api::find_vm_by_path(&self.client, &ctx.datacenter, &path)
            .await
            .map_err(|e| fault_error(e, &op))?;
        let moref = match existing {
            Some(found) => {
                let info = api::vm_info(&self.client, &found)
                    .await
                    .map_err(|e| fault_error(e, &op))?;
                if info.name != vm.name {
                    return Err(DriverError::Duplicate {
                        kind: "VM registered from this path under another name",
                        name: info.name,
                    });
                }
                found
            }
            None => {
                let same_name = api::find_vms_by_name(&self.client, &ctx.datacenter, &vm.name)
                    .await
                    .map_err(|e| fault_error(e, &op))?;
                if !same_name.is_empty() {
                    return Err(DriverError::Duplicate {
                        kind: "VM",
                        name: vm.name.clone(),
                    });
                }
                match api::register_vm(&self.client, &ctx, &path, &vm.name, self.task_timeout())
                    .await
                {
                    Ok(r) => r,
                    Err(e) if is_fault(&e, "DuplicateName") => {
                        return Err(DriverError::Duplicate {
                            kind: "VM",
                            name: vm.name.clone(),
                        })
                    }
                    Err(e)
                        if is_fault(&e, "NotFound")
                            || is_fault(&e, "FileNotFound")
                            || is_fault(&e, "InvalidDatastore") =>
                    {
                        let detail = match e {
                            CallError::Fault(f) => f.message,
                            CallError::Driver(d) => d.to_string(),
                        };
                        return Err(DriverError::NotFound {
                            kind: "VM configuration file",
                            name: format!("{path}' ({detail})"),
                        });
                    }
                    Err(e) => return Err(fault_error(e, &op)),
                }
            }
        };
        if let Some(redirect) = &self.config.redirect_datastore {
            self.redirect_writes(&ctx, &moref, vm, redirect).await?;
        }
        tracing::info!(host = %self.host, vm = %vm.name, id = %moref.value, "VM registered");
        Ok(VmRef(moref.value))
    }

    async fn power_on(&self, vm: &VmRef) -> DriverResult<()> {
        let moref = Self::vm_moref(vm);
        let info = api::vm_info(&self.client, &moref)
            .await
            .map_err(|e| self.vm_error(e, "power on", vm))?;
        if info.power_state == "poweredOn" {
            return Ok(());
        }
        api::power_on(&self.client, &moref, self.task_timeout())
            .await
            .map_err(|e| self.vm_error(e, &format!("power on VM '{}'", info.name), vm))
    }

    async fn power_off(&self, vm: &VmRef) -> DriverResult<()> {
        let moref = Self::vm_moref(vm);
        let info = match api::vm_info(&self.client, &moref).await {
            Ok(i) => i,
            Err(e) if is_fault(&e, "ManagedObjectNotFound") => return Ok(()),
            Err(e) => return Err(self.vm_error(e, "power off", vm)),
        };
        if info.power_state == "poweredOff" {
            return Ok(());
        }
        match api::run_vm_task(
            &self.client,
            &moref,
            "PowerOffVM_Task",
            "",
            self.task_timeout(),
        )
        .await
        {
            Ok(()) => Ok(()),
            // Powered off meanwhile (by the guest or an operator).
            Err(e) if is_fault(&e, "InvalidPowerState") => Ok(()),
            Err(e) => Err(self.vm_error(e, &format!("power off VM '{}'", info.name), vm)),
        }
    }

    async fn unregister_vm(&self, vm: &VmRef) -> DriverResult<()> {
        let moref = Self::vm_moref(vm);
        match self.client.call("UnregisterVM", &moref, "").await {
            Ok(_) => Ok(()),
            Err(e) if is_fault(&e, "ManagedObjectNotFound") => Ok(()),
            Err(e) if is_fault(&e, "InvalidPowerState") => Err(DriverError::InUse {
                what: format!("VM '{}' on '{}'", vm.0, self.host),
                reason: "it is powered on; power it off first".into(),
            }),
            Err(e) => Err(self.vm_error(e, "unregister VM", vm)),
        }
    }

    async fn start_live_migration(&self, vm: &VmRef, destination: &str) -> DriverResult<TaskRef> {
        let op = format!("Storage vMotion of VM '{}' to '{destination}'", vm.0);
        let ctx = self.host_context().await?;
        let target = self.require_datastore(&ctx, destination).await?;
        let moref = Self::vm_moref(vm);
        let info = api::vm_info(&self.client, &moref)
            .await
            .map_err(|e| self.vm_error(e, &op, vm))?;
        // A relocation started before a restart of revive is still running:
        // follow it rather than start a second one.
        for task in &info.recent_tasks {
            if let Ok(t) = self.client.task_info(task).await {
                if t.description_id == "VirtualMachine.relocate"
                    && (t.state == "running" || t.state == "queued")
                {
                    return Ok(TaskRef(format!("{}|{destination}", task.value)));
                }
            }
        }
        let task = api::relocate(&self.client, &moref, &target.moref)
            .await
            .map_err(|e| self.vm_error(e, &op, vm))?;
        tracing::info!(host = %self.host, vm = %vm.0, task = %task.value, destination, "Storage vMotion started");
        Ok(TaskRef(format!("{}|{destination}", task.value)))
    }

    async fn live_migration_status(
        &self,
        vm: &VmRef,
        task: &TaskRef,
    ) -> DriverResult<MigrationStatus> {
        let (moref, destination) = parse_task_ref(task);
        match self.client.task_info(&moref).await {
            Ok(info) => Ok(match info.state.as_str() {
                "success" => self.after_relocation(vm).await?,
                "error" => MigrationStatus::Failed {
                    reason: info
                        .error
                        .map(|f| f.to_string())
                        .unwrap_or_else(|| "the task failed without a fault".into()),
                },
                _ => MigrationStatus::Running {
                    percent: info.progress.unwrap_or(0).min(100),
                },
            }),
            Err(e) if is_fault(&e, "ManagedObjectNotFound") => {
                // The server forgot the task: where are the VM's files now?
                let Some(destination) = destination else {
                    return Ok(MigrationStatus::Failed {
                        reason: format!("task {} is gone", moref.value),
                    });
                };
                let ctx = self.host_context().await?;
                let target = self.host_datastore(&ctx, destination).await?;
                let info = api::vm_info(&self.client, &Self::vm_moref(vm))
                    .await
                    .map_err(|e| self.vm_error(e, "read VM", vm))?;
                let done = target.is_some_and(|t| info.datastores == [t.moref]);
                Ok(if done {
                    self.after_relocation(vm).await?
                } else {
                    MigrationStatus::Failed {
                        reason: format!(
                            "task {} is gone and the VM is not on '{destination}'",
                            moref.value
                        ),
                    }
                })
            }
            Err(e) => Err(fault_error(e, "read Storage vMotion task")),
        }
    }

    /// Storage vMotion switches over by itself; with redirected writes the
    /// VM still carries the redirect snapshot, which this consolidates now
    /// that every disk is on production storage (the status said `Ready`).
    async fn complete_live_migration(&self, vm: &VmRef, _task: &TaskRef) -> DriverResult<()> {
        if self.config.redirect_datastore.is_none() {
            return Ok(());
        }
        let moref = Self::vm_moref(vm);
        let info = api::vm_info(&self.client, &moref)
            .await
            .map_err(|e| self.vm_error(e, "read VM", vm))?;
        let Some(snapshot) = info.snapshot(REDIRECT_SNAPSHOT) else {
            return Ok(());
        };
        // Removing the snapshot merges its delta into the disks below it;
        // the VM's own snapshots (if it had some) stay.
        let args = format!(
            "{}{}",
            soap::field("removeChildren", "false"),
            soap::field("consolidate", "true")
        );
        api::run_vm_task(
            &self.client,
            snapshot,
            "RemoveSnapshot_Task",
            &args,
            self.task_timeout(),
        )
        .await
        .map_err(|e| self.vm_error(e, "consolidate the redirect snapshot", vm))
    }

    /// Not supported: the copied files are on storage revive writes to, which
    /// an ESXi host sees only if it is one of its datastores. Use a live
    /// migration (Storage vMotion) instead.
    async fn start_from_copy(&self, _vm: &VmSpec, _folder: &Path) -> DriverResult<Option<VmRef>> {
        Err(DriverError::NotSupported {
            driver: "vsphere",
            operation: "starting a VM from a copy (migrate with --method live: Storage vMotion)",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::config::test_config as config;
    use super::*;

    #[test]
    fn a_driver_needs_a_password() {
        let c = config("").unwrap();
        let err = VsphereDriver::new("esx01", &c).err().unwrap();
        assert!(matches!(err, DriverError::Auth { .. }), "{err}");
        let c = config("password_env = \"REVIVE_TEST_SURELY_UNSET_VAR\"").unwrap();
        let err = VsphereDriver::new("esx01", &c).err().unwrap();
        assert!(
            err.to_string().contains("REVIVE_TEST_SURELY_UNSET_VAR"),
            "{err}"
        );
    }

    #[test]
    fn task_refs_carry_the_destination() {
        let task = TaskRef("task-7|prod-ds|x".into());
        let (t, d) = parse_task_ref(&task);
        assert_eq!(t, MoRef::new("Task", "task-7"));
        assert_eq!(d, Some("prod-ds|x"));
        assert_eq!(parse_task_ref(&TaskRef("task-8".into())).1, None);
    }
}
