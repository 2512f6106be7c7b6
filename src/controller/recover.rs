//! `revive recover`: one session per VM of a request, on a host picked
//! and named here; the sessions then run in `runner.rs`.

use super::*;

impl Controller {
    /// Starts one session per VM of the request; they share the export and
    /// the host's datastore.
    pub async fn recover(&self, req: RecoverRequest) -> Result<Vec<SessionView>, ControllerError> {
        let mut vms: Vec<String> = req
            .vms
            .iter()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if vms.is_empty() {
            if let Some(point) = &req.point {
                vms.push(lifecycle::name_of_point(&self.inner, point).await?);
            }
        }
        if vms.is_empty() {
            return Err(ControllerError::BadRequest(
                "name at least one VM to recover".into(),
            ));
        }
        let snapshot = req
            .point
            .as_deref()
            .filter(|p| SnapshotSpec::is_snapshot(p));
        // Several VMs may come from one storage snapshot (they share its clone).
        if vms.len() > 1
            && (req.name.is_some()
                || (req.point.is_some() && snapshot.is_none())
                || req.lab.is_some())
        {
            return Err(ControllerError::BadRequest(
                "--name and --point apply to a single VM; recover several VMs from their latest points (or from one --point snap:SOURCE/SNAPSHOT) without them".into(),
            ));
        }
        if req.kind != RecoveryKind::Block && (req.disk.is_some() || req.protocol.is_some()) {
            return Err(ControllerError::BadRequest(
                "--disk and --protocol apply to --kind block".into(),
            ));
        }
        if vms.len() > 1 && req.disk.is_some() {
            return Err(ControllerError::BadRequest(
                "--disk applies to a single VM".into(),
            ));
        }
        if snapshot.is_some() && req.kind == RecoveryKind::Block {
            return Err(ControllerError::BadRequest(
                "--kind block serves a disk of a backup restore point, not of a storage snapshot"
                    .into(),
            ));
        }
        if let Some(point) = snapshot {
            let spec = SnapshotSpec::parse(point)
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
            self.inner
                .snapshots
                .get(&spec.source)
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
        }
        let host = self.pick_host(req.host.as_deref(), req.driver.as_deref())?;
        let driver_kind = match self.inner.drivers.get(&host) {
            Some(Ok(d)) => d.kind(),
            Some(Err(cause)) => {
                return Err(ControllerError::Validation {
                    check: "hypervisor",
                    reason: format!("host '{host}': {cause}"),
                })
            }
            None => "none",
        };
        let service = driver_kind == "postgres";
        if req.port.is_some() && !service {
            return Err(ControllerError::BadRequest(format!(
                "--port is for database sessions; host '{host}' uses the {driver_kind} driver"
            )));
        }
        if let Some(wanted) = req.driver.as_deref() {
            if req.host.is_some() && wanted != driver_kind {
                return Err(ControllerError::BadRequest(format!(
                    "host '{host}' uses the {driver_kind} driver, not {wanted}"
                )));
            }
        }
        if req.power_on && driver_kind == "none" {
            return Err(ControllerError::BadRequest(format!(
                "--power-on needs a hypervisor: host '{host}' uses the publish-only none driver (pass --host)"
            )));
        }
        let datastore = self.datastore_spec(&host);
        let _guard = self.inner.create_lock.lock().await;
        let request = new_id();
        let mut names: Vec<String> = Vec::new();
        for vm in &vms {
            let name = match &req.name {
                Some(n) => {
                    crate::datastore::namespace::check_name(n).map_err(|_| {
                        ControllerError::BadRequest(format!("'{n}' cannot be a folder name"))
                    })?;
                    if self.name_in_use(n).await? {
                        return Err(ControllerError::NameTaken {
                            name: n.clone(),
                            export: self.inner.config.export.clone(),
                        });
                    }
                    n.clone()
                }
                None => self.free_name(vm, &names).await?,
            };
            names.push(name);
        }
        let mut views = Vec::new();
        for (vm, name) in vms.iter().zip(names) {
            let host_cache = self
                .inner
                .config
                .hosts
                .iter()
                .find(|h| h.name == host)
                .and_then(|h| h.cache_dir.clone());
            let cache_dir = req
                .cache
                .clone()
                .or(host_cache)
                .unwrap_or_else(|| self.inner.config.cache_root.clone())
                .join(&name);
            let now = Utc::now();
            let block = (req.kind == RecoveryKind::Block).then(|| {
                BlockTarget::new(
                    &name,
                    req.disk.clone(),
                    req.protocol.unwrap_or(BlockProtocol::Nbd),
                )
            });
            let session = Session {
                id: new_id(),
                request: request.clone(),
                name,
                vm: vm.clone(),
                point: req.point.clone().unwrap_or_else(|| format!("{vm}@latest")),
                host: host.clone(),
                driver: driver_kind.to_string(),
                export: self.inner.config.export.clone(),
                datastore: datastore.clone(),
                cache_dir,
                // A database is recovered to answer queries: always started.
                power_on: req.power_on || service,
                port: req.port,
                ready_ms: None,
                state: SessionState::Validating,
                resume: None,
                retries: Retries {
                    attempt: 0,
                    max: self.inner.config.retries,
                    next_at: None,
                },
                error: None,
                vm_ref: None,
                vm_spec: None,
                datastore_attached: false,
                block,
                migration: None,
                lab: req.lab.clone(),
                created: now,
                updated: now,
            };
            self.inner.store.save(&session)?;
            info!(session = %session.id, name = %session.name, vm = %vm, host = %host, "session created");
            self.adopt(session.clone(), true);
            views.push(SessionView {
                session,
                cache_bytes: None,
            });
        }
        Ok(views)
    }

    pub(super) fn pick_host(
        &self,
        host: Option<&str>,
        driver: Option<&str>,
    ) -> Result<String, ControllerError> {
        let known = || {
            let mut names: Vec<_> = self.inner.drivers.keys().cloned().collect();
            names.sort();
            names.join(", ")
        };
        match (host, driver) {
            (Some(h), _) => {
                if self.inner.drivers.contains_key(h) {
                    Ok(h.to_string())
                } else {
                    Err(ControllerError::UnknownHost {
                        name: h.to_string(),
                        known: known(),
                    })
                }
            }
            (None, Some("none")) | (None, None) => Ok(NONE_HOST.to_string()),
            (None, Some(kind)) => {
                let matching: Vec<&HostConfig> = self
                    .inner
                    .config
                    .hosts
                    .iter()
                    .filter(|h| driver_name(&h.driver) == kind)
                    .collect();
                match matching.as_slice() {
                    [one] => Ok(one.name.clone()),
                    [] => Err(ControllerError::UnknownHost {
                        name: format!("(any with driver {kind})"),
                        known: known(),
                    }),
                    _ => Err(ControllerError::BadRequest(format!(
                        "several hosts use the {kind} driver; pass --host"
                    ))),
                }
            }
        }
    }

    fn datastore_spec(&self, host: &str) -> DatastoreSpec {
        let remote_host = self
            .inner
            .config
            .hosts
            .iter()
            .find(|h| h.name == host)
            .and_then(|h| h.nfs_address.clone())
            .unwrap_or_else(|| self.inner.config.default_nfs_address.clone());
        DatastoreSpec {
            name: self.inner.config.datastore_name.clone(),
            remote_host,
            remote_path: self.inner.config.export.clone(),
            local_path: None,
        }
    }

    async fn name_in_use(&self, name: &str) -> Result<bool, ControllerError> {
        let by_session = self.inner.sessions.iter().any(|h| {
            let s = h.value().snapshot();
            s.name == name && !s.state.is_terminal()
        });
        Ok(by_session
            || self
                .inner
                .datastore
                .name_taken(&self.inner.config.export, name)
                .await?)
    }

    async fn free_name(&self, vm: &str, chosen: &[String]) -> Result<String, ControllerError> {
        let base = format!("{vm}-ir");
        for n in 1..10_000 {
            let name = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if !chosen.contains(&name) && !self.name_in_use(&name).await? {
                return Ok(name);
            }
        }
        Err(ControllerError::BadRequest(format!(
            "no free session name for VM '{vm}'"
        )))
    }
}
