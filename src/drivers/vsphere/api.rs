//! Typed vim25 calls the driver needs, on top of [`VimClient`]: inventory
//! look-ups by name (hosts, datastores, VMs), NAS datastores, VM
//! registration, power, snapshots and Storage vMotion.
//!
//! Each function returns [`CallResult`], so the driver decides what a fault
//! means in its context (a `NotFound` from RegisterVM is a missing file, from
//! a look-up a missing host); [`fault_error`] is the default translation.

use std::time::Duration;

use super::client::{returnval_moref, CallError, CallResult, ObjectContent, VimClient};
use super::soap::{field, MoRef};
use crate::drivers::DriverError;

/// Most hops from a host up to its datacenter (host → compute resource →
/// host folder → nested folders → datacenter).
const MAX_PARENT_HOPS: usize = 16;

/// Where a host sits in the inventory: what registration and mounts need.
#[derive(Debug, Clone)]
pub struct HostContext {
    /// The HostSystem.
    pub host: MoRef,
    /// Its name in the inventory.
    pub name: String,
    /// Its HostDatastoreSystem (CreateNasDatastore, RemoveDatastore).
    pub datastore_system: MoRef,
    /// Root resource pool of its compute resource (RegisterVM needs one).
    pub pool: MoRef,
    /// The datacenter it belongs to.
    pub datacenter: MoRef,
    /// The datacenter's VM folder (where RegisterVM puts the VM).
    pub vm_folder: MoRef,
    /// Physical memory, MiB.
    pub memory_mib: Option<u64>,
    /// Memory in use, MiB.
    pub memory_used_mib: Option<u64>,
}

/// A datastore as mounted on a host.
#[derive(Debug, Clone)]
pub struct DatastoreInfo {
    /// The Datastore object.
    pub moref: MoRef,
    /// Its name.
    pub name: String,
    /// NFS server, for NAS datastores.
    pub remote_host: Option<String>,
    /// NFS export, for NAS datastores.
    pub remote_path: Option<String>,
}

/// A VM's state as the driver reads it.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// Name in the inventory.
    pub name: String,
    /// `poweredOn`, `poweredOff` or `suspended`.
    pub power_state: String,
    /// `[ds] folder` where snapshots (and the working directory) go.
    pub snapshot_directory: Option<String>,
    /// Every snapshot of the VM (the whole tree), by name.
    pub snapshots: Vec<(String, MoRef)>,
    /// Datastores the VM's files are on.
    pub datastores: Vec<MoRef>,
    /// Tasks recently run on the VM.
    pub recent_tasks: Vec<MoRef>,
}

/// Turns a failed call into a driver error with the usual meaning of each fault.
pub fn fault_error(e: CallError, operation: &str) -> DriverError {
    match e {
        CallError::Driver(d) => d,
        CallError::Fault(f) => match f.kind.as_str() {
            "ResourceInUse" => DriverError::InUse {
                what: f.field("name").unwrap_or(operation).to_string(),
                reason: f.message.clone(),
            },
            "ManagedObjectNotFound" => DriverError::NotFound {
                kind: "managed object",
                name: f
                    .detail
                    .as_ref()
                    .and_then(|d| d.child("obj").or_else(|| d.child("object")))
                    .map(|o| o.text.clone())
                    .unwrap_or_else(|| f.message.clone()),
            },
            _ => DriverError::Fault {
                operation: operation.to_string(),
                message: f.to_string(),
            },
        },
    }
}

/// True when the call failed with fault `kind`.
pub fn is_fault(e: &CallError, kind: &str) -> bool {
    matches!(e, CallError::Fault(f) if f.kind == kind)
}

/// A datastore path: `[name] rest`.
pub fn datastore_path(datastore: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("[{datastore}]")
    } else {
        format!("[{datastore}] {rest}")
    }
}

/// Finds the datacenter named `name`, or `None`.
pub async fn find_datacenter(c: &VimClient, name: &str) -> CallResult<Option<MoRef>> {
    let root = c.content().await?.root_folder;
    let all = c.find_all(&root, "Datacenter", &["name"]).await?;
    Ok(all
        .into_iter()
        .find(|o| o.text("name") == Some(name))
        .map(|o| o.obj))
}

/// Every host under `container`, with its name.
pub async fn list_hosts(c: &VimClient, container: &MoRef) -> CallResult<Vec<ObjectContent>> {
    c.find_all(container, "HostSystem", &["name"]).await
}

/// Resolves a host's place in the inventory.
pub async fn host_context(c: &VimClient, host: &MoRef) -> CallResult<HostContext> {
    let h = c
        .retrieve_one(
            host,
            &[
                "name",
                "parent",
                "configManager.datastoreSystem",
                "summary.hardware.memorySize",
                "summary.quickStats.overallMemoryUsage",
            ],
        )
        .await?;
    let missing = |what: &str| {
        CallError::Driver(DriverError::Fault {
            operation: format!("read host {host}"),
            message: format!("the host has no {what}"),
        })
    };
    let compute = h.moref("parent").ok_or_else(|| missing("parent"))?;
    let pool = c
        .retrieve_one(&compute, &["resourcePool"])
        .await?
        .moref("resourcePool")
        .ok_or_else(|| missing("resource pool"))?;
    // Walk up to the datacenter: ESXi has one, vCenter may nest folders.
    let mut node = compute.clone();
    let mut datacenter = None;
    for _ in 0..MAX_PARENT_HOPS {
        let parent = c.retrieve_one(&node, &["parent"]).await?.moref("parent");
        match parent {
            Some(p) if p.kind == "Datacenter" => {
                datacenter = Some(p);
                break;
            }
            Some(p) => node = p,
            None => break,
        }
    }
    let datacenter = datacenter.ok_or_else(|| missing("datacenter"))?;
    let vm_folder = c
        .retrieve_one(&datacenter, &["vmFolder"])
        .await?
        .moref("vmFolder")
        .ok_or_else(|| missing("VM folder"))?;
    Ok(HostContext {
        host: host.clone(),
        name: h.text("name").unwrap_or_default().to_string(),
        datastore_system: h
            .moref("configManager.datastoreSystem")
            .ok_or_else(|| missing("datastore system"))?,
        pool,
        datacenter,
        vm_folder,
        memory_mib: h
            .text("summary.hardware.memorySize")
            .and_then(|v| v.parse::<u64>().ok())
            .map(|b| b >> 20),
        memory_used_mib: h
            .text("summary.quickStats.overallMemoryUsage")
            .and_then(|v| v.parse::<u64>().ok()),
    })
}

/// The datastores mounted on a host.
pub async fn host_datastores(c: &VimClient, host: &MoRef) -> CallResult<Vec<DatastoreInfo>> {
    const PROPS: [&str; 2] = ["name", "info"];
    let refs = c
        .retrieve_one(host, &["datastore"])
        .await?
        .morefs("datastore");
    let all = match c.retrieve(&refs, &PROPS).await {
        Ok(all) => all,
        // A datastore removed between the two reads (or, in vcsim, still
        // listed by the host after Destroy_Task): read the others one by one.
        Err(e) if is_fault(&e, "ManagedObjectNotFound") => {
            let mut found = Vec::new();
            for r in &refs {
                match c.retrieve_one(r, &PROPS).await {
                    Ok(o) if !o.props.is_empty() => found.push(o),
                    Ok(_) => {}
                    Err(e) if is_fault(&e, "ManagedObjectNotFound") => {}
                    Err(e) => return Err(e),
                }
            }
            found
        }
        Err(e) => return Err(e),
    };
    Ok(all
        .into_iter()
        .map(|o| {
            let nas = o.props.get("info").and_then(|i| i.child("nas"));
            DatastoreInfo {
                name: o.text("name").unwrap_or_default().to_string(),
                remote_host: nas.and_then(|n| n.text_at(&["remoteHost"]).map(str::to_string)),
                remote_path: nas.and_then(|n| n.text_at(&["remotePath"]).map(str::to_string)),
                moref: o.obj,
            }
        })
        .collect())
}

/// `HostDatastoreSystem.CreateNasDatastore`: NFS v3, read-write.
pub async fn create_nas_datastore(
    c: &VimClient,
    datastore_system: &MoRef,
    remote_host: &str,
    remote_path: &str,
    local_path: &str,
) -> CallResult<MoRef> {
    let spec = format!(
        "<spec>{}{}{}{}{}</spec>",
        field("remoteHost", remote_host),
        field("remotePath", remote_path),
        field("localPath", local_path),
        field("accessMode", "readWrite"),
        field("type", "NFS"),
    );
    let resp = c
        .call("CreateNasDatastore", datastore_system, &spec)
        .await?;
    returnval_moref(&resp, "CreateNasDatastore")
}

/// `HostDatastoreSystem.RemoveDatastore`; servers without it (vcsim) get
/// `Datastore.Destroy_Task`, which removes the datastore from every host.
pub async fn remove_datastore(
    c: &VimClient,
    datastore_system: &MoRef,
    datastore: &MoRef,
    timeout: Duration,
) -> CallResult<()> {
    match c
        .call(
            "RemoveDatastore",
            datastore_system,
            &datastore.xml("datastore"),
        )
        .await
    {
        Err(e) if is_fault(&e, "MethodNotFound") || is_fault(&e, "NotImplemented") => {
            let resp = c.call("Destroy_Task", datastore, "").await?;
            let task = returnval_moref(&resp, "Destroy_Task")?;
            c.wait_task(&task, "remove datastore", timeout).await?;
            Ok(())
        }
        other => other.map(|_| ()),
    }
}

/// `SearchIndex.FindByDatastorePath`: the VM registered from `path`, if any.
pub async fn find_vm_by_path(
    c: &VimClient,
    datacenter: &MoRef,
    path: &str,
) -> CallResult<Option<MoRef>> {
    let index = c.content().await?.search_index;
    let args = format!("{}{}", datacenter.xml("datacenter"), field("path", path));
    let resp = c.call("FindByDatastorePath", &index, &args).await?;
    Ok(resp.child("returnval").and_then(MoRef::from_element))
}

/// Every VM under `container` named `name`.
pub async fn find_vms_by_name(
    c: &VimClient,
    container: &MoRef,
    name: &str,
) -> CallResult<Vec<MoRef>> {
    let all = c.find_all(container, "VirtualMachine", &["name"]).await?;
    Ok(all
        .into_iter()
        .filter(|o| o.text("name") == Some(name))
        .map(|o| o.obj)
        .collect())
}

/// `Folder.RegisterVM_Task` on the host's pool; returns the new VM.
pub async fn register_vm(
    c: &VimClient,
    ctx: &HostContext,
    path: &str,
    name: &str,
    timeout: Duration,
) -> CallResult<MoRef> {
    let args = format!(
        "{}{}{}{}{}",
        field("path", path),
        field("name", name),
        field("asTemplate", "false"),
        ctx.pool.xml("pool"),
        ctx.host.xml("host"),
    );
    let resp = c.call("RegisterVM_Task", &ctx.vm_folder, &args).await?;
    let task = returnval_moref(&resp, "RegisterVM_Task")?;
    let result = c.wait_task(&task, "register VM", timeout).await?;
    result
        .as_ref()
        .and_then(MoRef::from_element)
        .ok_or_else(|| {
            CallError::Driver(DriverError::Fault {
                operation: format!("register VM '{name}'"),
                message: "the task returned no VM".into(),
            })
        })
}

/// What the driver reads of a VM.
pub async fn vm_info(c: &VimClient, vm: &MoRef) -> CallResult<VmInfo> {
    let o = c
        .retrieve_one(
            vm,
            &[
                "name",
                "runtime.powerState",
                "config.files.snapshotDirectory",
                "snapshot",
                "datastore",
                "recentTask",
            ],
        )
        .await?;
    if o.props.is_empty() {
        return Err(CallError::Fault(super::soap::VimFault {
            kind: "ManagedObjectNotFound".into(),
            message: format!("VM {vm} not found"),
            detail: None,
        }));
    }
    Ok(VmInfo {
        name: o.text("name").unwrap_or_default().to_string(),
        power_state: o.text("runtime.powerState").unwrap_or_default().to_string(),
        snapshot_directory: o.text("config.files.snapshotDirectory").map(str::to_string),
        snapshots: o
            .props
            .get("snapshot")
            .map(|s| {
                let mut all = Vec::new();
                snapshot_tree(s.children_named("rootSnapshotList"), &mut all);
                all
            })
            .unwrap_or_default(),
        datastores: o.morefs("datastore"),
        recent_tasks: o.morefs("recentTask"),
    })
}

/// Flattens a snapshot tree (`VirtualMachineSnapshotTree`) into names and references.
fn snapshot_tree<'a>(
    nodes: impl Iterator<Item = &'a super::xml::Element>,
    out: &mut Vec<(String, MoRef)>,
) {
    for node in nodes {
        if let (Some(name), Some(r)) = (
            node.text_at(&["name"]),
            node.child("snapshot").and_then(MoRef::from_element),
        ) {
            out.push((name.to_string(), r));
        }
        snapshot_tree(node.children_named("childSnapshotList"), out);
    }
}

impl VmInfo {
    /// The snapshot revive took to redirect writes, if present.
    pub fn snapshot(&self, name: &str) -> Option<&MoRef> {
        self.snapshots
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, r)| r)
    }
}

/// Runs task method `method` on `this` (a VM, a snapshot) to completion.
pub async fn run_vm_task(
    c: &VimClient,
    this: &MoRef,
    method: &str,
    args: &str,
    timeout: Duration,
) -> CallResult<()> {
    let resp = c.call(method, this, args).await?;
    let task = returnval_moref(&resp, method)?;
    c.wait_task(&task, method, timeout).await?;
    Ok(())
}

/// `PowerOnVM_Task`, answering the "moved or copied?" question ESXi asks
/// about a VM registered from another host's files: "moved" keeps the VM's
/// UUID and MAC addresses, which a recovered VM must keep.
pub async fn power_on(c: &VimClient, vm: &MoRef, timeout: Duration) -> CallResult<()> {
    let resp = c.call("PowerOnVM_Task", vm, "").await?;
    let task = returnval_moref(&resp, "PowerOnVM_Task")?;
    let start = std::time::Instant::now();
    loop {
        let info = c.task_info(&task).await?;
        match info.state.as_str() {
            "success" => return Ok(()),
            "error" => {
                return Err(match info.error {
                    Some(f) => CallError::Fault(f),
                    None => CallError::Driver(DriverError::Fault {
                        operation: "power on".into(),
                        message: "the task failed without a fault".into(),
                    }),
                })
            }
            _ => {}
        }
        answer_moved_question(c, vm).await?;
        if start.elapsed() >= timeout {
            return Err(CallError::Driver(DriverError::Timeout {
                host: c.host().to_string(),
                operation: "power on".into(),
                seconds: timeout.as_secs(),
            }));
        }
        tokio::time::sleep(super::client::TASK_POLL_INTERVAL).await;
    }
}

async fn answer_moved_question(c: &VimClient, vm: &MoRef) -> CallResult<()> {
    let o = c.retrieve_one(vm, &["runtime.question"]).await?;
    let Some(q) = o.props.get("runtime.question") else {
        return Ok(());
    };
    let Some(id) = q.text_at(&["id"]) else {
        return Ok(());
    };
    let choice = q
        .path(&["choice"])
        .into_iter()
        .flat_map(|c| c.children_named("choiceInfo"))
        .find(|ci| {
            ci.text_at(&["label"])
                .or_else(|| ci.text_at(&["summary"]))
                .is_some_and(|l| l.to_ascii_lowercase().contains("moved"))
        })
        .and_then(|ci| ci.text_at(&["key"]));
    let Some(choice) = choice else {
        return Err(CallError::Driver(DriverError::Fault {
            operation: "power on".into(),
            message: format!(
                "the host asks a question revive cannot answer: {}",
                q.text_at(&["text"]).unwrap_or("?")
            ),
        }));
    };
    let args = format!(
        "{}{}",
        field("questionId", id),
        field("answerChoice", choice)
    );
    c.call("AnswerVM", vm, &args).await?;
    Ok(())
}

/// `FileManager.MakeDirectory`; Ok when it already exists.
pub async fn make_directory(c: &VimClient, datacenter: &MoRef, path: &str) -> CallResult<()> {
    let fm = c.content().await?.file_manager;
    let args = format!(
        "{}{}{}",
        field("name", path),
        datacenter.xml("datacenter"),
        field("createParentDirectories", "true")
    );
    match c.call("MakeDirectory", &fm, &args).await {
        Err(e) if is_fault(&e, "FileAlreadyExists") => Ok(()),
        other => other.map(|_| ()),
    }
}

/// `RelocateVM_Task` to `datastore` (Storage vMotion); returns the task.
pub async fn relocate(c: &VimClient, vm: &MoRef, datastore: &MoRef) -> CallResult<MoRef> {
    let args = format!(
        "<spec>{}</spec>{}",
        datastore.xml("datastore"),
        field("priority", "defaultPriority")
    );
    let resp = c.call("RelocateVM_Task", vm, &args).await?;
    returnval_moref(&resp, "RelocateVM_Task")
}
