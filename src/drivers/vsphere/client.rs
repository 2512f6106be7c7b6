//! [`VimClient`]: a vim25 session over HTTPS. It logs in lazily, keeps the
//! session cookie, logs in again once when the server says the session is
//! gone (`NotAuthenticated`: cookie expired, server restarted), and turns
//! transport failures into the driver's transient errors.
//!
//! Typed calls for what the driver needs live in `api.rs`; this file is the
//! transport, the PropertyCollector and task polling.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::soap::{self, field, MoRef, Response, VimFault};
use super::xml::Element;
use crate::drivers::DriverError;

/// Longest wait for one HTTP exchange; a vim25 call that takes longer is a
/// task, and tasks are polled, so this only catches a hung server.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest wait for a TCP + TLS connection: a host that does not answer in
/// this time is unreachable (the session waits and retries).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Pause between two reads of a running task's state.
pub const TASK_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// SOAPAction version of the first call, before the server told us its own:
/// every ESXi and vCenter from 6.5 on accepts it.
const BOOTSTRAP_VERSION: &str = "6.5";

/// How to reach and log in to a vSphere endpoint.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Name used in errors (the configured host name).
    pub host: String,
    /// SDK endpoint, e.g. `https://esx01/sdk`.
    pub url: String,
    /// User name.
    pub user: String,
    /// Password.
    pub password: String,
    /// Skip certificate checks (an explicit opt-out).
    pub insecure: bool,
    /// PEM file of the CA(s) to trust instead of the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// A failed call: a fault the server answered with, or an error of the
/// driver's own (transport, login) that needs no more context.
#[derive(Debug)]
pub enum CallError {
    /// The server answered with a fault.
    Fault(VimFault),
    /// Anything else, already a driver error.
    Driver(DriverError),
}

impl From<DriverError> for CallError {
    fn from(e: DriverError) -> Self {
        CallError::Driver(e)
    }
}

/// Result of a vim25 call.
pub type CallResult<T> = Result<T, CallError>;

/// The ServiceContent references the driver uses.
#[derive(Debug, Clone)]
pub struct ServiceContent {
    /// Root of the inventory.
    pub root_folder: MoRef,
    /// The PropertyCollector.
    pub property_collector: MoRef,
    /// Login and logout.
    pub session_manager: MoRef,
    /// FindByDatastorePath.
    pub search_index: MoRef,
    /// Container views for finding objects by name.
    pub view_manager: MoRef,
    /// MakeDirectory for the redirect folder.
    pub file_manager: MoRef,
    /// `HostAgent` (ESXi) or `VirtualCenter`.
    pub api_type: String,
    /// API version the server speaks, used in SOAPAction.
    pub api_version: String,
}

struct Session {
    content: ServiceContent,
    /// `name=value` of the session cookie(s), as sent back in `Cookie`.
    cookie: Option<String>,
}

/// One object's properties from the PropertyCollector.
#[derive(Debug, Clone)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// Property path to its `<val>` element.
    pub props: HashMap<String, Element>,
}

impl ObjectContent {
    /// Text of a simple property.
    pub fn text(&self, path: &str) -> Option<&str> {
        self.props.get(path).map(|v| v.text.as_str())
    }

    /// A property that is a managed object reference.
    pub fn moref(&self, path: &str) -> Option<MoRef> {
        self.props.get(path).and_then(MoRef::from_element)
    }

    /// A property that is an array of references (`ArrayOfManagedObjectReference`).
    pub fn morefs(&self, path: &str) -> Vec<MoRef> {
        self.props
            .get(path)
            .map(|v| v.children.iter().filter_map(MoRef::from_element).collect())
            .unwrap_or_default()
    }
}

/// A vim25 client bound to one endpoint.
pub struct VimClient {
    config: ClientConfig,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
}

impl VimClient {
    /// Builds the HTTPS client; does not connect yet.
    ///
    /// # Errors
    /// The CA file cannot be read or parsed, or the TLS setup is refused.
    pub fn new(config: ClientConfig) -> Result<VimClient, DriverError> {
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT)
            // Proxies from the environment would send the session cookie
            // (and the password) through a third party: connect directly.
            .no_proxy();
        if config.insecure {
            builder = builder.tls_danger_accept_invalid_certs(true);
        } else if let Some(path) = &config.ca_file {
            let pem = std::fs::read(path).map_err(|source| DriverError::Io {
                action: "read CA file",
                path: path.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| DriverError::Io {
                    action: "parse CA file",
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
            // Only the given CAs: the operator named the one that signs the
            // host (a self-signed ESXi, vCenter's VMCA).
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().map_err(|e| DriverError::Fault {
            operation: format!("set up HTTPS client for '{}'", config.url),
            message: error_chain(&e),
        })?;
        Ok(VimClient {
            config,
            http,
            session: Mutex::new(None),
        })
    }

    /// The configured host name (for errors).
    pub fn host(&self) -> &str {
        &self.config.host
    }

    /// The ServiceContent, logging in first when needed.
    pub async fn content(&self) -> Result<ServiceContent, DriverError> {
        let mut session = self.session.lock().await;
        if session.is_none() {
            *session = Some(self.login().await?);
        }
        session
            .as_ref()
            .map(|s| s.content.clone())
            .ok_or_else(|| DriverError::Fault {
                operation: "login".into(),
                message: "no session".into(),
            })
    }

    /// Logs in (again), replacing the current session.
    pub async fn relogin(&self) -> Result<(), DriverError> {
        let mut session = self.session.lock().await;
        *session = Some(self.login().await?);
        Ok(())
    }

    /// Ends the session on the server; Ok when there was none.
    pub async fn logout(&self) -> Result<(), DriverError> {
        let mut session = self.session.lock().await;
        let Some(s) = session.take() else {
            return Ok(());
        };
        let body = soap::envelope("Logout", &s.content.session_manager, "");
        match self
            .post("Logout", body, s.cookie.as_deref(), &s.content.api_version)
            .await
        {
            Ok(_) | Err(CallError::Fault(_)) => Ok(()),
            Err(CallError::Driver(e)) => Err(e),
        }
    }

    async fn login(&self) -> Result<Session, DriverError> {
        let si = MoRef::new("ServiceInstance", "ServiceInstance");
        let body = soap::envelope("RetrieveServiceContent", &si, "");
        let (resp, _) = self
            .post("RetrieveServiceContent", body, None, BOOTSTRAP_VERSION)
            .await
            .map_err(|e| self.login_error(e))?;
        let content = self.parse_content(&resp)?;
        let args = format!(
            "{}{}",
            field("userName", &self.config.user),
            field("password", &self.config.password)
        );
        let body = soap::envelope("Login", &content.session_manager, &args);
        let (_, cookie) = self
            .post("Login", body, None, &content.api_version)
            .await
            .map_err(|e| self.login_error(e))?;
        tracing::debug!(host = %self.config.host, api = %content.api_type, "vSphere login");
        Ok(Session { content, cookie })
    }

    fn login_error(&self, e: CallError) -> DriverError {
        match e {
            CallError::Driver(e) => e,
            CallError::Fault(f) if f.kind == "InvalidLogin" || f.kind == "NoPermission" => {
                DriverError::Auth {
                    host: self.config.host.clone(),
                    reason: format!("{} as user '{}'", f.message, self.config.user),
                }
            }
            CallError::Fault(f) => DriverError::Fault {
                operation: format!("login to '{}'", self.config.url),
                message: f.to_string(),
            },
        }
    }

    fn parse_content(&self, resp: &Element) -> Result<ServiceContent, DriverError> {
        let malformed = |what: &str| DriverError::Fault {
            operation: format!("RetrieveServiceContent from '{}'", self.config.url),
            message: format!("the answer has no {what}: is this a vSphere SDK endpoint?"),
        };
        let rv = resp
            .child("returnval")
            .ok_or_else(|| malformed("returnval"))?;
        let r = |name: &str| {
            rv.child(name)
                .and_then(MoRef::from_element)
                .ok_or_else(|| malformed(name))
        };
        Ok(ServiceContent {
            root_folder: r("rootFolder")?,
            property_collector: r("propertyCollector")?,
            session_manager: r("sessionManager")?,
            search_index: r("searchIndex")?,
            view_manager: r("viewManager")?,
            file_manager: r("fileManager")?,
            api_type: rv.text_at(&["about", "apiType"]).unwrap_or("").to_string(),
            api_version: rv
                .text_at(&["about", "apiVersion"])
                .filter(|v| !v.is_empty())
                .unwrap_or(BOOTSTRAP_VERSION)
                .to_string(),
        })
    }

    /// Calls `method` on `this` with already-encoded arguments; returns the
    /// `<MethodResponse>` element. Logs in first if needed, and once more if
    /// the server says the session is not authenticated.
    pub async fn call(&self, method: &str, this: &MoRef, args: &str) -> CallResult<Element> {
        let mut relogged = false;
        loop {
            let (cookie, version) = {
                let mut session = self.session.lock().await;
                if session.is_none() {
                    *session = Some(self.login().await?);
                }
                let s = session.as_ref().ok_or_else(|| {
                    CallError::Driver(DriverError::Fault {
                        operation: method.into(),
                        message: "no session".into(),
                    })
                })?;
                (s.cookie.clone(), s.content.api_version.clone())
            };
            let body = soap::envelope(method, this, args);
            let result = self.post(method, body, cookie.as_deref(), &version).await;
            match result {
                Err(CallError::Fault(f)) if f.kind == "NotAuthenticated" && !relogged => {
                    tracing::debug!(host = %self.config.host, method, "session expired; logging in again");
                    relogged = true;
                    self.relogin().await?;
                }
                other => return other.map(|(e, _)| e),
            }
        }
    }

    /// One HTTP exchange: returns the response element and any session cookie set.
    async fn post(
        &self,
        method: &str,
        body: String,
        cookie: Option<&str>,
        version: &str,
    ) -> CallResult<(Element, Option<String>)> {
        let mut req = self
            .http
            .post(&self.config.url)
            .header("Content-Type", "text/xml; charset=utf-8")
            .header("SOAPAction", format!("urn:vim25/{version}"))
            .body(body);
        if let Some(cookie) = cookie {
            req = req.header("Cookie", cookie);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| self.transport_error(method, &e))?;
        let status = resp.status();
        let cookie = session_cookie(resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| self.transport_error(method, &e))?;
        match soap::parse_response(&text) {
            Ok(Response::Body(e)) if status.is_success() => Ok((e, cookie)),
            Ok(Response::Fault(f)) => Err(CallError::Fault(f)),
            Ok(Response::Body(_)) | Err(_) if status.is_server_error() => {
                // A proxy or a restarting hostd answers 5xx without SOAP:
                // worth another try later.
                Err(CallError::Driver(DriverError::Unreachable {
                    host: self.config.host.clone(),
                    reason: format!("{method}: HTTP {status} from '{}'", self.config.url),
                }))
            }
            Ok(Response::Body(_)) | Err(_) => Err(CallError::Driver(DriverError::Fault {
                operation: format!("{method} on '{}'", self.config.url),
                message: format!(
                    "HTTP {status}, not a vim25 answer: {}",
                    soap::excerpt(&text)
                ),
            })),
        }
    }

    fn transport_error(&self, method: &str, e: &reqwest::Error) -> CallError {
        let chain = error_chain(e);
        // A refused certificate is a configuration problem, not an outage:
        // retrying would not help, so it is not reported as unreachable.
        // rustls' messages all name the certificate.
        if chain.contains("certificate") {
            return CallError::Driver(DriverError::Fault {
                operation: format!("connect to '{}'", self.config.url),
                message: format!(
                    "{chain}; trust the host's CA with ca_file, or set insecure = true"
                ),
            });
        }
        if e.is_timeout() {
            return CallError::Driver(DriverError::Timeout {
                host: self.config.host.clone(),
                operation: method.to_string(),
                seconds: REQUEST_TIMEOUT.as_secs(),
            });
        }
        CallError::Driver(DriverError::Unreachable {
            host: self.config.host.clone(),
            reason: format!("{method} to '{}': {chain}", self.config.url),
        })
    }

    /// Reads properties `paths` of each object in `objects` (one type).
    ///
    /// # Errors
    /// `ManagedObjectNotFound` when an object does not exist.
    pub async fn retrieve(
        &self,
        objects: &[MoRef],
        paths: &[&str],
    ) -> CallResult<Vec<ObjectContent>> {
        let Some(first) = objects.first() else {
            return Ok(Vec::new());
        };
        let mut spec = format!("<specSet>{}", prop_set(&first.kind, paths));
        for obj in objects {
            spec.push_str(&format!("<objectSet>{}</objectSet>", obj.xml("obj")));
        }
        spec.push_str("</specSet>");
        self.retrieve_spec(&spec).await
    }

    /// Properties of one object.
    pub async fn retrieve_one(&self, obj: &MoRef, paths: &[&str]) -> CallResult<ObjectContent> {
        let mut all = self.retrieve(std::slice::from_ref(obj), paths).await?;
        Ok(all.pop().unwrap_or_else(|| ObjectContent {
            obj: obj.clone(),
            props: HashMap::new(),
        }))
    }

    /// Every object of `kind` under `container` (recursively), with `paths`:
    /// a ContainerView read through the PropertyCollector, then destroyed.
    pub async fn find_all(
        &self,
        container: &MoRef,
        kind: &str,
        paths: &[&str],
    ) -> CallResult<Vec<ObjectContent>> {
        let content = self.content().await?;
        let args = format!(
            "{}{}{}",
            container.xml("container"),
            field("type", kind),
            field("recursive", "true")
        );
        let resp = self
            .call("CreateContainerView", &content.view_manager, &args)
            .await?;
        let view = returnval_moref(&resp, "CreateContainerView")?;
        let spec = format!(
            "<specSet>{}<objectSet>{}<skip>true</skip>\
             <selectSet xsi:type=\"TraversalSpec\"><name>view</name><type>ContainerView</type>\
             <path>view</path><skip>false</skip></selectSet></objectSet></specSet>",
            prop_set(kind, paths),
            view.xml("obj")
        );
        let result = self.retrieve_spec(&spec).await;
        // Views live until the session ends; destroy ours now, whatever the result.
        if let Err(e) = self.call("DestroyView", &view, "").await {
            tracing::debug!(view = %view, error = ?e, "DestroyView failed");
        }
        result
    }

    async fn retrieve_spec(&self, spec: &str) -> CallResult<Vec<ObjectContent>> {
        match self.retrieve_pages(spec).await {
            // vcsim reports a lost session per property rather than as a
            // fault (which `call` already handles): log in again, once.
            Err(CallError::Fault(f)) if f.kind == "NotAuthenticated" => {
                self.relogin().await?;
                self.retrieve_pages(spec).await
            }
            other => other,
        }
    }

    async fn retrieve_pages(&self, spec: &str) -> CallResult<Vec<ObjectContent>> {
        let content = self.content().await?;
        let mut out = Vec::new();
        let mut resp = self
            .call(
                "RetrievePropertiesEx",
                &content.property_collector,
                &format!("{spec}<options></options>"),
            )
            .await?;
        loop {
            let token = {
                let Some(rv) = resp.child("returnval") else {
                    return Ok(out);
                };
                for obj in rv.children_named("objects") {
                    if let Some(oc) = object_content(obj).map_err(CallError::Fault)? {
                        out.push(oc);
                    }
                }
                rv.text_at(&["token"])
                    .filter(|t| !t.is_empty())
                    .map(str::to_string)
            };
            let Some(token) = token else {
                return Ok(out);
            };
            resp = self
                .call(
                    "ContinueRetrievePropertiesEx",
                    &content.property_collector,
                    &field("token", &token),
                )
                .await?;
        }
    }

    /// Waits until `task` ends; returns its `info.result` on success.
    ///
    /// # Errors
    /// The task's fault, or [`DriverError::Timeout`] after `timeout`.
    pub async fn wait_task(
        &self,
        task: &MoRef,
        operation: &str,
        timeout: Duration,
    ) -> CallResult<Option<Element>> {
        let start = Instant::now();
        loop {
            let info = self.task_info(task).await?;
            match info.state.as_str() {
                "success" => return Ok(info.result),
                "error" => {
                    return Err(CallError::Fault(info.error.unwrap_or(VimFault {
                        kind: "MethodFault".into(),
                        message: format!("{operation} failed"),
                        detail: None,
                    })))
                }
                _ => {}
            }
            if start.elapsed() >= timeout {
                return Err(CallError::Driver(DriverError::Timeout {
                    host: self.config.host.clone(),
                    operation: operation.to_string(),
                    seconds: timeout.as_secs(),
                }));
            }
            tokio::time::sleep(TASK_POLL_INTERVAL).await;
        }
    }

    /// The state of a task (`info`).
    pub async fn task_info(&self, task: &MoRef) -> CallResult<TaskInfo> {
        let oc = self.retrieve_one(task, &["info"]).await?;
        let info = oc.props.get("info").ok_or_else(|| {
            CallError::Fault(VimFault {
                kind: "ManagedObjectNotFound".into(),
                message: format!("task {task} has no info"),
                detail: None,
            })
        })?;
        Ok(TaskInfo {
            state: info.text_at(&["state"]).unwrap_or("").to_string(),
            progress: info
                .text_at(&["progress"])
                .and_then(|p| p.parse::<u8>().ok()),
            description_id: info.text_at(&["descriptionId"]).unwrap_or("").to_string(),
            result: info.child("result").cloned(),
            error: info.child("error").map(VimFault::from_localized),
        })
    }
}

/// What a task says about itself.
#[derive(Debug, Clone)]
pub struct TaskInfo {
    /// `queued`, `running`, `success` or `error`.
    pub state: String,
    /// Percent done, when the task reports it.
    pub progress: Option<u8>,
    /// What the task does, e.g. `VirtualMachine.relocate`.
    pub description_id: String,
    /// The result on success.
    pub result: Option<Element>,
    /// The fault on error.
    pub error: Option<VimFault>,
}

fn prop_set(kind: &str, paths: &[&str]) -> String {
    let mut s = format!("<propSet>{}<all>false</all>", field("type", kind));
    for p in paths {
        s.push_str(&field("pathSet", p));
    }
    s.push_str("</propSet>");
    s
}

/// One `<objects>` of a RetrievePropertiesEx answer. A property the server
/// could not read comes in `missingSet`: a missing optional property is
/// skipped (`None` props), an object that is gone or a lost session is an error.
fn object_content(obj: &Element) -> Result<Option<ObjectContent>, VimFault> {
    let Some(r) = obj.child("obj").and_then(MoRef::from_element) else {
        return Ok(None);
    };
    for missing in obj.children_named("missingSet") {
        if let Some(fault) = missing.path(&["fault", "fault"]) {
            let kind = fault.xsi_type().unwrap_or("MethodFault");
            if kind == "NotAuthenticated" || kind == "ManagedObjectNotFound" {
                return Err(VimFault {
                    kind: kind.to_string(),
                    message: format!("{kind}: {r}"),
                    detail: Some(Box::new(fault.clone())),
                });
            }
        }
    }
    let mut props = HashMap::new();
    for p in obj.children_named("propSet") {
        if let (Some(name), Some(val)) = (p.text_at(&["name"]), p.child("val")) {
            props.insert(name.to_string(), val.clone());
        }
    }
    Ok(Some(ObjectContent { obj: r, props }))
}

/// The `returnval` of a response as a reference.
pub fn returnval_moref(resp: &Element, method: &str) -> CallResult<MoRef> {
    resp.child("returnval")
        .and_then(MoRef::from_element)
        .ok_or_else(|| {
            CallError::Driver(DriverError::Fault {
                operation: method.to_string(),
                message: "the answer has no object reference".into(),
            })
        })
}

/// `name=value` of every cookie a response sets, joined for a `Cookie` header.
fn session_cookie(headers: &reqwest::header::HeaderMap) -> Option<String> {
    let cookies: Vec<&str> = headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next())
        .map(str::trim)
        .filter(|v| v.contains('='))
        .collect();
    (!cookies.is_empty()).then(|| cookies.join("; "))
}

/// An error and its causes on one line.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_cookie_keeps_name_and_value_only() {
        let mut h = reqwest::header::HeaderMap::new();
        h.append(
            reqwest::header::SET_COOKIE,
            "vmware_soap_session=\"52a1\"; Path=/; HttpOnly; Secure;"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            session_cookie(&h).as_deref(),
            Some("vmware_soap_session=\"52a1\"")
        );
        assert_eq!(session_cookie(&reqwest::header::HeaderMap::new()), None);
    }

    /// vcsim's answer to RetrievePropertiesEx without a session (captured).
    const UNAUTHENTICATED: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<soapenv:Envelope xmlns:soapenc="http://schemas.xmlsoap.org/soap/encoding/" xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/" xmlns:xsd="http://www.w3.org/2001/XMLSchema" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body><RetrievePropertiesExResponse xmlns="urn:vim25"><returnval><objects><obj type="HostSystem">ha-host</obj><missingSet><path>name</path><fault><fault xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance" XMLSchema-instance:type="NotAuthenticated"><object type="HostSystem">ha-host</object><privilegeId>System.Read</privilegeId></fault></fault></missingSet></objects></returnval></RetrievePropertiesExResponse></soapenv:Body></soapenv:Envelope>"#;

    #[test]
    fn missing_properties_of_a_lost_session_are_an_error() {
        let Response::Body(b) = soap::parse_response(UNAUTHENTICATED).unwrap() else {
            panic!("fault")
        };
        let obj = b.path(&["returnval", "objects"]).unwrap();
        let err = object_content(obj).unwrap_err();
        assert_eq!(err.kind, "NotAuthenticated");
    }

    #[test]
    fn properties_read_by_path() {
        let xml = r#"<objects xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><obj type="HostSystem">host-1</obj>
            <propSet><name>name</name><val xsi:type="xsd:string">esx01</val></propSet>
            <propSet><name>datastore</name><val xsi:type="ArrayOfManagedObjectReference">
              <ManagedObjectReference type="Datastore">ds-1</ManagedObjectReference>
              <ManagedObjectReference type="Datastore">ds-2</ManagedObjectReference></val></propSet>
            <propSet><name>parent</name><val type="ComputeResource" xsi:type="ManagedObjectReference">cr-1</val></propSet></objects>"#;
        let oc = object_content(&Element::parse(xml).unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(oc.obj, MoRef::new("HostSystem", "host-1"));
        assert_eq!(oc.text("name"), Some("esx01"));
        assert_eq!(oc.morefs("datastore").len(), 2);
        assert_eq!(
            oc.moref("parent"),
            Some(MoRef::new("ComputeResource", "cr-1"))
        );
        assert_eq!(oc.text("missing"), None);
    }
}
