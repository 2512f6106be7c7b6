//! The `none` driver: publish only. The user mounts the export by hand, so
//! there is nothing to register, power on or migrate live.

use std::path::Path;

use async_trait::async_trait;

use super::{
    DatastoreSpec, Driver, DriverError, DriverResult, HostInfo, MigrationStatus, TaskRef, VmRef,
    VmSpec,
};

/// Publish-only driver.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoneDriver;

fn unsupported<T>(operation: &'static str) -> DriverResult<T> {
    Err(DriverError::NotSupported {
        driver: "none",
        operation,
    })
}

#[async_trait]
impl Driver for NoneDriver {
    fn kind(&self) -> &'static str {
        "none"
    }

    async fn validate(&self, _vm: &VmSpec) -> DriverResult<HostInfo> {
        Ok(HostInfo {
            free_memory_mib: None,
        })
    }

    async fn attach_datastore(&self, _datastore: &DatastoreSpec) -> DriverResult<()> {
        Ok(())
    }

    async fn detach_datastore(&self, _datastore: &DatastoreSpec) -> DriverResult<()> {
        Ok(())
    }

    async fn register_vm(&self, _datastore: &DatastoreSpec, vm: &VmSpec) -> DriverResult<VmRef> {
        Ok(VmRef(vm.name.clone()))
    }

    async fn power_on(&self, _vm: &VmRef) -> DriverResult<()> {
        unsupported("power on (the none driver registers no VM; mount the export by hand)")
    }

    async fn power_off(&self, _vm: &VmRef) -> DriverResult<()> {
        Ok(())
    }

    async fn unregister_vm(&self, _vm: &VmRef) -> DriverResult<()> {
        Ok(())
    }

    async fn start_live_migration(&self, _vm: &VmRef, _destination: &str) -> DriverResult<TaskRef> {
        unsupported("live migration (use --method copy)")
    }

    async fn live_migration_status(
        &self,
        _vm: &VmRef,
        _task: &TaskRef,
    ) -> DriverResult<MigrationStatus> {
        unsupported("live migration (use --method copy)")
    }

    async fn complete_live_migration(&self, _vm: &VmRef, _task: &TaskRef) -> DriverResult<()> {
        unsupported("live migration (use --method copy)")
    }

    async fn start_from_copy(&self, _vm: &VmSpec, _folder: &Path) -> DriverResult<Option<VmRef>> {
        Ok(None)
    }
}
