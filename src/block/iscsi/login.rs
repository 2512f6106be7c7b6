//! The login phase (RFC 7143 §6.3, §11.12-11.13): from the first Login
//! Request to full feature phase, or to a Login Response with an error
//! status after which the connection closes.
//!
//! ```text
//! stage 0 (security)      AuthMethod=None | CHAP exchange (chap.rs)
//!    │  T=1, NSG=1 or 3 (only once authenticated)
//! stage 1 (operational)   HeaderDigest, MaxBurstLength, ... (text.rs)
//!    │  T=1, NSG=3
//! full feature phase      TSIH assigned, parameters fixed
//! ```
//!
//! A normal session names its target in the first PDU: an unknown target
//! fails with "not found" (0x0203); an initiator not on the target's
//! allow-lists (name and address) with "authorization failure" (0x0202);
//! a wrong CHAP response with "authentication failure" (0x0201). A
//! discovery session needs no target and sees, in SendTargets, only the
//! targets that would let it log in.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::chap::ChapExchange;
use super::conn::QUEUE_DEPTH;
use super::pdu::{op, read_pdu, OutPdu, Pdu, PduError, Stamp};
use super::target::{IscsiTarget, TargetSet};
use super::text::{self, Limits, Negotiation, Params};

/// Data segment limit during login (the RFC default of
/// MaxRecvDataSegmentLength).
const LOGIN_SEGMENT: u32 = 8192;

/// Most key text one login stage may send across continued PDUs.
const MAX_LOGIN_TEXT: usize = 64 << 10;

/// Login status classes and details.
pub mod status {
    /// Initiator error (malformed request, bad keys).
    pub const INITIATOR_ERROR: u16 = 0x0200;
    /// Authentication failed (CHAP).
    pub const AUTH_FAILED: u16 = 0x0201;
    /// Not allowed to log in to this target.
    pub const FORBIDDEN: u16 = 0x0202;
    /// No such target.
    pub const NOT_FOUND: u16 = 0x0203;
    /// Unsupported version.
    pub const BAD_VERSION: u16 = 0x0205;
    /// A required key is missing.
    pub const MISSING_PARAMETER: u16 = 0x0207;
    /// The session to add a connection to does not exist.
    pub const NO_SESSION: u16 = 0x020a;
    /// Request invalid during login.
    pub const INVALID_REQUEST: u16 = 0x020b;
}

/// What the session is for.
pub enum SessionKind {
    /// SendTargets only.
    Discovery,
    /// SCSI commands to this target.
    Normal(Arc<IscsiTarget>),
}

/// A completed login.
pub struct Login {
    /// Discovery or normal.
    pub kind: SessionKind,
    /// InitiatorName.
    pub initiator: String,
    /// The ISID the initiator chose.
    pub isid: [u8; 6],
    /// The negotiated parameters.
    pub params: Params,
    /// ExpCmdSN at the start of full feature phase.
    pub cmd_sn: u32,
    /// The next StatSN.
    pub stat_sn: u32,
}

/// Why a login ended without a session.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The login was refused with a status (already sent).
    #[error("login refused with status {status:#06x} - {reason}")]
    Refused {
        /// Status class and detail.
        status: u16,
        /// Why, for the log.
        reason: String,
    },
    /// The connection closed or broke the protocol.
    #[error("login - {0}")]
    Pdu(#[from] PduError),
    /// The socket failed while answering.
    #[error("login - {0}")]
    Io(#[from] std::io::Error),
}

/// Where the security stage stands.
enum Auth {
    /// AuthMethod not yet negotiated.
    Start,
    /// CHAP chosen, waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent, waiting for CHAP_N/CHAP_R.
    ChapResponse(ChapExchange),
    /// Authenticated (or no authentication needed).
    Done,
}

struct State<'a> {
    targets: &'a dyn TargetSet,
    peer: IpAddr,
    kind: Option<SessionKind>,
    initiator: String,
    auth: Auth,
    neg: Negotiation,
    first: bool,
    tsih: u16,
}

fn refuse(status: u16, reason: impl Into<String>) -> LoginError {
    LoginError::Refused {
        status,
        reason: reason.into(),
    }
}

/// Runs the login on a new connection; `tsih` is the session handle to give
/// the new session.
///
/// # Errors
/// [`LoginError::Refused`] after answering with an error status; `Pdu` or
/// `Io` when the connection fails or sends something else than logins.
pub async fn login<R, W>(
    r: &mut R,
    w: &mut W,
    peer: IpAddr,
    targets: &dyn TargetSet,
    limits: Limits,
    tsih: u16,
) -> Result<Login, LoginError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut st = State {
        targets,
        peer,
        kind: None,
        initiator: String::new(),
        auth: Auth::Start,
        neg: Negotiation::new(limits),
        first: true,
        tsih,
    };
    let mut stat_sn = 0u32;
    let mut cmd_sn = 0u32;
    let mut isid = [0u8; 6];
    let mut text = Vec::new();
    loop {
        let pdu = read_pdu(r, LOGIN_SEGMENT).await?;
        if pdu.opcode() != op::LOGIN_REQ {
            return Err(PduError::Malformed("expected a login request").into());
        }
        if st.first {
            isid.copy_from_slice(&pdu.bhs[8..14]);
            cmd_sn = pdu.cmd_sn();
        }
        let flags = pdu.flags();
        let (transit, cont) = (flags & 0x80 != 0, flags & 0x40 != 0);
        let (csg, nsg) = ((flags >> 2) & 3, flags & 3);
        text.extend_from_slice(&pdu.data);
        if text.len() > MAX_LOGIN_TEXT {
            return Err(send_refusal(
                w,
                &pdu,
                stat_sn,
                cmd_sn,
                status::INITIATOR_ERROR,
                "login text too long",
            )
            .await);
        }
        if cont {
            // More text follows: acknowledge with an empty response.
            let resp = response(&pdu, 0, csg, 0, 0, Bytes::new());
            write(w, resp, &mut stat_sn, cmd_sn).await?;
            continue;
        }
        let keys = std::mem::take(&mut text);
        match step(&mut st, &pdu, &keys, transit, csg, nsg).await {
            Ok((reply, t, next)) => {
                let done = t && next == 3;
                let mut resp = response(
                    &pdu,
                    if t { 0x80 } else { 0 },
                    csg,
                    next,
                    0,
                    Bytes::from(text::encode(&reply)),
                );
                if done {
                    resp.bhs[14..16].copy_from_slice(&st.tsih.to_be_bytes());
                }
                write(w, resp, &mut stat_sn, cmd_sn).await?;
                st.first = false;
                if done {
                    let kind = st
                        .kind
                        .take()
                        .ok_or(PduError::Malformed("login without a session type"))?;
                    if let SessionKind::Normal(t) = &kind {
                        t.metrics().connections.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(Login {
                        kind,
                        initiator: st.initiator,
                        isid,
                        params: st.neg.params.clone(),
                        cmd_sn,
                        stat_sn,
                    });
                }
            }
            Err((code, reason)) => {
                if code == status::FORBIDDEN || code == status::AUTH_FAILED {
                    if let Some(SessionKind::Normal(t)) = &st.kind {
                        t.metrics().refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                return Err(send_refusal(w, &pdu, stat_sn, cmd_sn, code, &reason).await);
            }
        }
    }
}

async fn send_refusal<W: AsyncWrite + Unpin>(
    w: &mut W,
    pdu: &Pdu,
    mut stat_sn: u32,
    cmd_sn: u32,
    code: u16,
    reason: &str,
) -> LoginError {
    let resp = response(pdu, 0, 0, 0, code, Bytes::new());
    if let Err(e) = write(w, resp, &mut stat_sn, cmd_sn).await {
        return e.into();
    }
    refuse(code, reason)
}

/// A Login Response to `req` with flags, stages, status and keys.
fn response(req: &Pdu, transit: u8, csg: u8, nsg: u8, status: u16, data: Bytes) -> OutPdu {
    let flags = if status == 0 {
        transit | (csg << 2) | if transit != 0 { nsg } else { 0 }
    } else {
        0
    };
    let mut p = OutPdu::new(op::LOGIN_RESP, flags, req.itt(), data, Stamp::Status);
    // Version-max and version-active: 0.
    p.bhs[8..14].copy_from_slice(&req.bhs[8..14]);
    p.bhs[36..38].copy_from_slice(&status.to_be_bytes());
    p
}

async fn write<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut p: OutPdu,
    stat_sn: &mut u32,
    cmd_sn: u32,
) -> std::io::Result<()> {
    *stat_sn = p.stamp(*stat_sn, cmd_sn, cmd_sn.wrapping_add(QUEUE_DEPTH - 1));
    let mut buf = p.bhs.to_vec();
    buf.extend_from_slice(&p.data);
    buf.resize(buf.len() + p.padding(), 0);
    w.write_all(&buf).await?;
    w.flush().await
}

type Step = Result<(Vec<(String, String)>, bool, u8), (u16, String)>;

/// Processes one complete login request: its keys, then whether to move
/// to the next stage. Returns the keys to answer, the T bit and the NSG.
async fn step(st: &mut State<'_>, pdu: &Pdu, data: &[u8], transit: bool, csg: u8, nsg: u8) -> Step {
    if pdu.bhs[3] > 0 {
        return Err((status::BAD_VERSION, "version-min above 0".into()));
    }
    if csg == 2 || csg == 3 || (transit && (nsg == 2 || nsg <= csg)) {
        return Err((
            status::INVALID_REQUEST,
            format!("invalid stages {csg} -> {nsg}"),
        ));
    }
    let keys = text::parse(data).map_err(|e| (status::INITIATOR_ERROR, e.to_string()))?;
    let get = |k: &str| {
        keys.iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    let mut reply: Vec<(String, String)> = Vec::new();
    if st.first {
        let tsih = u16::from_be_bytes([pdu.bhs[14], pdu.bhs[15]]);
        if tsih != 0 {
            return Err((
                status::NO_SESSION,
                "adding a connection to a session (MaxConnections=1)".into(),
            ));
        }
        st.initiator = get("InitiatorName")
            .ok_or((status::MISSING_PARAMETER, "no InitiatorName".to_string()))?;
        let kind = get("SessionType").unwrap_or_else(|| "Normal".into());
        st.kind = Some(match kind.as_str() {
            "Discovery" => SessionKind::Discovery,
            "Normal" => {
                let name = get("TargetName")
                    .ok_or((status::MISSING_PARAMETER, "no TargetName".to_string()))?;
                let target = st
                    .targets
                    .find(&name)
                    .filter(|t| !t.is_closed())
                    .ok_or((status::NOT_FOUND, format!("no target '{name}'")))?;
                if !target.access.allows(&st.initiator, st.peer) {
                    target.metrics().refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        initiator = %st.initiator,
                        peer = %st.peer,
                        target = %target.iqn,
                        "iscsi: initiator refused by the allow-list"
                    );
                    return Err((
                        status::FORBIDDEN,
                        format!(
                            "initiator '{}' from {} is not allowed",
                            st.initiator, st.peer
                        ),
                    ));
                }
                reply.push(("TargetPortalGroupTag".into(), "1".into()));
                SessionKind::Normal(target)
            }
            other => return Err((status::INITIATOR_ERROR, format!("session type '{other}'"))),
        });
    }
    let chap = match &st.kind {
        Some(SessionKind::Normal(t)) => t.access.chap.clone(),
        _ => None,
    };
    if csg == 0 {
        for (k, v) in &keys {
            match k.as_str() {
                "AuthMethod" => {
                    let offered: Vec<&str> = v.split(',').collect();
                    let answer = if chap.is_some() {
                        if !offered.contains(&"CHAP") {
                            return Err((
                                status::AUTH_FAILED,
                                "CHAP required but not offered".into(),
                            ));
                        }
                        st.auth = Auth::ChapAlgorithm;
                        "CHAP"
                    } else if offered.contains(&"None") {
                        st.auth = Auth::Done;
                        "None"
                    } else {
                        return Err((
                            status::AUTH_FAILED,
                            format!("no common AuthMethod in '{v}'"),
                        ));
                    };
                    reply.push(("AuthMethod".into(), answer.into()));
                }
                "CHAP_A" => {
                    if !matches!(st.auth, Auth::ChapAlgorithm) {
                        return Err((status::INITIATOR_ERROR, "CHAP_A out of turn".into()));
                    }
                    let (ex, keys) =
                        ChapExchange::start(v).map_err(|e| (status::AUTH_FAILED, e.to_string()))?;
                    reply.extend(keys);
                    st.auth = Auth::ChapResponse(ex);
                }
                "CHAP_N" | "CHAP_R" | "CHAP_I" | "CHAP_C" => {}
                k if text::is_login_key(k) => {}
                _ => {
                    // Operational keys may come in the security stage too.
                    if let Some(a) = st
                        .neg
                        .answer(k, v)
                        .map_err(|e| (status::INITIATOR_ERROR, e.to_string()))?
                    {
                        reply.push((k.clone(), a));
                    }
                }
            }
        }
        if get("CHAP_R").is_some() {
            let Auth::ChapResponse(ex) = &st.auth else {
                return Err((status::INITIATOR_ERROR, "CHAP_R out of turn".into()));
            };
            let Some(cfg) = &chap else {
                return Err((status::INITIATOR_ERROR, "CHAP_R without CHAP".into()));
            };
            match ex.verify(cfg, &keys) {
                Ok(mutual) => {
                    reply.extend(mutual);
                    st.auth = Auth::Done;
                }
                Err(e) => {
                    tracing::warn!(initiator = %st.initiator, peer = %st.peer, cause = %e, "iscsi: CHAP failed");
                    return Err((status::AUTH_FAILED, e.to_string()));
                }
            }
        }
        let authenticated = matches!(st.auth, Auth::Done);
        if matches!(st.auth, Auth::Start) && chap.is_none() && transit {
            // The initiator skips AuthMethod: nothing to authenticate.
            st.auth = Auth::Done;
        } else if transit && !authenticated {
            if matches!(st.auth, Auth::Start) {
                return Err((status::AUTH_FAILED, "authentication required".into()));
            }
            return Ok((reply, false, 0));
        }
        if transit && nsg == 3 {
            reply.extend(st.neg.declarations());
        }
        return Ok((reply, transit, nsg));
    }
    // Operational stage.
    if chap.is_some() && !matches!(st.auth, Auth::Done) {
        return Err((status::AUTH_FAILED, "authentication required".into()));
    }
    for (k, v) in &keys {
        if text::is_login_key(k) {
            continue;
        }
        if let Some(a) = st
            .neg
            .answer(k, v)
            .map_err(|e| (status::INITIATOR_ERROR, e.to_string()))?
        {
            reply.push((k.clone(), a));
        }
    }
    if transit {
        reply.extend(st.neg.declarations());
    }
    Ok((reply, transit, nsg))
}
