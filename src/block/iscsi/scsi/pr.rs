//! Reservations: RESERVE(6)/RELEASE(6) (SPC-2) and persistent reservations
//! (PERSISTENT RESERVE IN/OUT, SPC-4 §5.9), which Windows failover
//! clustering and ESXi use to fence a shared disk.
//!
//! Both live in memory, per logical unit, as tgtd keeps them: a restart of
//! revive drops them (the initiators re-register when they reconnect), and
//! APTPL (persist through power loss) is refused. Registrations belong to
//! an initiator port (`<initiator name>,i,0x<ISID>`), so they survive a
//! reconnection with the same ISID; a RESERVE(6) belongs to one session and
//! ends with it.

use bytes::Bytes;

use super::{be16, be32, be64, opcode, CmdResult, Fail, Nexus, Sense};

/// Reservation types.
mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WE_REGISTRANTS_ONLY: u8 = 5;
    pub const EA_REGISTRANTS_ONLY: u8 = 6;
    pub const WE_ALL_REGISTRANTS: u8 = 7;
    pub const EA_ALL_REGISTRANTS: u8 = 8;
}

fn valid_type(t: u8) -> bool {
    use kind::*;
    matches!(
        t,
        WRITE_EXCLUSIVE
            | EXCLUSIVE_ACCESS
            | WE_REGISTRANTS_ONLY
            | EA_REGISTRANTS_ONLY
            | WE_ALL_REGISTRANTS
            | EA_ALL_REGISTRANTS
    )
}

fn all_registrants(t: u8) -> bool {
    t == kind::WE_ALL_REGISTRANTS || t == kind::EA_ALL_REGISTRANTS
}

fn exclusive_access(t: u8) -> bool {
    matches!(
        t,
        kind::EXCLUSIVE_ACCESS | kind::EA_REGISTRANTS_ONLY | kind::EA_ALL_REGISTRANTS
    )
}

/// The persistent reservation in force.
#[derive(Debug, Clone)]
struct Hold {
    /// Initiator port that reserved.
    port: String,
    /// Reservation type.
    kind: u8,
}

/// Every reservation of a logical unit.
#[derive(Debug, Default)]
pub struct Reservations {
    /// Session (nexus id) holding a RESERVE(6).
    reserve6: Option<u64>,
    /// Registered initiator ports and their keys, in registration order.
    registrations: Vec<(String, u64)>,
    hold: Option<Hold>,
    generation: u32,
}

/// How a command touches the medium, for reservation checks.
enum Access {
    /// Allowed whatever the reservations (INQUIRY, REPORT LUNS...).
    Always,
    Read,
    Write,
}

fn access(cdb: &[u8]) -> Access {
    use opcode::*;
    match cdb[0] {
        INQUIRY | REPORT_LUNS | REQUEST_SENSE | READ_CAPACITY_10 | SERVICE_ACTION_IN_16
        | MAINTENANCE_IN | PR_IN | PR_OUT | TEST_UNIT_READY => Access::Always,
        READ_6 | READ_10 | READ_12 | READ_16 | VERIFY_10 | VERIFY_12 | VERIFY_16 | PREFETCH_10
        | PREFETCH_16 | MODE_SENSE_6 | MODE_SENSE_10 => Access::Read,
        _ => Access::Write,
    }
}

impl Reservations {
    fn key_of(&self, port: &str) -> Option<u64> {
        self.registrations
            .iter()
            .find(|(p, _)| p == port)
            .map(|(_, k)| *k)
    }

    /// Whether `nexus` may run `cdb` under the reservations in force.
    pub fn check(&self, nexus: &Nexus, cdb: &[u8]) -> Result<(), Fail> {
        if let Some(holder) = self.reserve6 {
            if holder != nexus.id {
                use opcode::*;
                let allowed = matches!(
                    cdb[0],
                    INQUIRY
                        | REPORT_LUNS
                        | REQUEST_SENSE
                        | RELEASE_6
                        | READ_CAPACITY_10
                        | SERVICE_ACTION_IN_16
                        | MAINTENANCE_IN
                );
                if !allowed {
                    return Err(Fail::Conflict);
                }
            }
            return Ok(());
        }
        let Some(hold) = &self.hold else {
            return Ok(());
        };
        let registered = self.key_of(&nexus.initiator_port).is_some();
        let holder = if all_registrants(hold.kind) {
            registered
        } else {
            hold.port == nexus.initiator_port
        };
        if holder {
            return Ok(());
        }
        let registrants_only = matches!(
            hold.kind,
            kind::WE_REGISTRANTS_ONLY
                | kind::EA_REGISTRANTS_ONLY
                | kind::WE_ALL_REGISTRANTS
                | kind::EA_ALL_REGISTRANTS
        );
        if registrants_only && registered {
            return Ok(());
        }
        match access(cdb) {
            Access::Always => Ok(()),
            Access::Read if !exclusive_access(hold.kind) => Ok(()),
            _ => Err(Fail::Conflict),
        }
    }

    /// RESERVE(6).
    pub fn reserve6(&mut self, nexus: &Nexus) -> CmdResult {
        if self.hold.is_some() || !self.registrations.is_empty() {
            return Err(Fail::Conflict);
        }
        match self.reserve6 {
            Some(h) if h != nexus.id => Err(Fail::Conflict),
            _ => {
                self.reserve6 = Some(nexus.id);
                Ok(Bytes::new())
            }
        }
    }

    /// RELEASE(6): releases the caller's reservation, if it has one.
    pub fn release6(&mut self, nexus: &Nexus) -> CmdResult {
        if self.reserve6 == Some(nexus.id) {
            self.reserve6 = None;
        }
        Ok(Bytes::new())
    }

    /// A LUN reset ends RESERVE(6) reservations.
    pub fn reset(&mut self) {
        self.reserve6 = None;
    }

    /// A session ended: its RESERVE(6) with it.
    pub fn nexus_lost(&mut self, nexus: &Nexus) {
        if self.reserve6 == Some(nexus.id) {
            self.reserve6 = None;
        }
    }

    /// PERSISTENT RESERVE IN.
    pub fn pr_in(&self, cdb: &[u8]) -> CmdResult {
        let alloc = be16(&cdb[7..]) as usize;
        let mut out = self.generation.to_be_bytes().to_vec();
        match cdb[1] & 0x1f {
            0 => {
                let keys: Vec<u8> = self
                    .registrations
                    .iter()
                    .flat_map(|(_, k)| k.to_be_bytes())
                    .collect();
                out.extend_from_slice(&(keys.len() as u32).to_be_bytes());
                out.extend(keys);
            }
            1 => match &self.hold {
                Some(h) => {
                    out.extend_from_slice(&16u32.to_be_bytes());
                    let key = if all_registrants(h.kind) {
                        0
                    } else {
                        self.key_of(&h.port).unwrap_or(0)
                    };
                    out.extend_from_slice(&key.to_be_bytes());
                    out.extend_from_slice(&[0, 0, 0, 0, 0, h.kind, 0, 0]);
                }
                None => out.extend_from_slice(&0u32.to_be_bytes()),
            },
            2 => {
                // REPORT CAPABILITIES: CRH, ATP_C; TMV with every type.
                out = vec![0, 8, 0x14, 0x80, 0xea, 0x01, 0, 0];
            }
            3 => {
                let mut descs = Vec::new();
                for (port, key) in &self.registrations {
                    let mut d = vec![0u8; 24];
                    d[0..8].copy_from_slice(&key.to_be_bytes());
                    if let Some(h) = &self.hold {
                        if all_registrants(h.kind) || h.port == *port {
                            d[12] = 0x01;
                            d[13] = h.kind;
                        }
                    }
                    d[12] |= 0x02; // ALL_TG_PT: one target port.
                    d[18..20].copy_from_slice(&1u16.to_be_bytes());
                    let mut tid = vec![0x45, 0, 0, 0];
                    tid.extend_from_slice(port.as_bytes());
                    tid.push(0);
                    while tid.len() % 4 != 0 {
                        tid.push(0);
                    }
                    let add = (tid.len() - 4) as u16;
                    tid[2..4].copy_from_slice(&add.to_be_bytes());
                    d[20..24].copy_from_slice(&(tid.len() as u32).to_be_bytes());
                    d.extend(tid);
                    descs.extend(d);
                }
                out.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                out.extend(descs);
            }
            _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
        }
        out.truncate(alloc);
        Ok(Bytes::from(out))
    }

    fn unregister(&mut self, port: &str) {
        self.registrations.retain(|(p, _)| p != port);
        if let Some(h) = &self.hold {
            let ends = if all_registrants(h.kind) {
                self.registrations.is_empty()
            } else {
                h.port == port
            };
            if ends {
                self.hold = None;
            }
        }
    }

    /// PERSISTENT RESERVE OUT.
    pub fn pr_out(&mut self, nexus: &Nexus, cdb: &[u8], data: &[u8]) -> CmdResult {
        let sa = cdb[1] & 0x1f;
        let scope = cdb[2] >> 4;
        let ty = cdb[2] & 0x0f;
        let len = be32(&cdb[5..]) as usize;
        if sa > 6 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        if len != 24 || data.len() < 24 {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let key = be64(&data[0..]);
        let sa_key = be64(&data[8..]);
        let flags = data[20];
        // SPEC_I_PT and APTPL are not supported; ALL_TG_PT is moot with one port.
        if flags & 0x09 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.into());
        }
        let me = nexus.initiator_port.clone();
        let mine = self.key_of(&me);
        match sa {
            0 | 6 => {
                let ignore = sa == 6;
                match mine {
                    None => {
                        if !ignore && key != 0 {
                            return Err(Fail::Conflict);
                        }
                        if sa_key != 0 {
                            self.registrations.push((me, sa_key));
                        }
                    }
                    Some(k) => {
                        if !ignore && k != key {
                            return Err(Fail::Conflict);
                        }
                        if sa_key == 0 {
                            self.unregister(&me);
                        } else if let Some(r) =
                            self.registrations.iter_mut().find(|(p, _)| *p == me)
                        {
                            r.1 = sa_key;
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
            }
            1 => {
                if mine != Some(key) {
                    return Err(Fail::Conflict);
                }
                if scope != 0 || !valid_type(ty) {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                match &self.hold {
                    None => self.hold = Some(Hold { port: me, kind: ty }),
                    Some(h) => {
                        let holder = all_registrants(h.kind) || h.port == me;
                        if !holder || h.kind != ty {
                            return Err(Fail::Conflict);
                        }
                    }
                }
            }
            2 => {
                if mine != Some(key) {
                    return Err(Fail::Conflict);
                }
                if let Some(h) = &self.hold {
                    let holder = all_registrants(h.kind) || h.port == me;
                    if holder {
                        if h.kind != ty || scope != 0 {
                            return Err(Sense::INVALID_RELEASE.into());
                        }
                        self.hold = None;
                    }
                }
            }
            3 => {
                if mine != Some(key) {
                    return Err(Fail::Conflict);
                }
                self.registrations.clear();
                self.hold = None;
                self.generation = self.generation.wrapping_add(1);
            }
            _ => {
                // PREEMPT, PREEMPT AND ABORT.
                if mine != Some(key) {
                    return Err(Fail::Conflict);
                }
                if scope != 0 || !valid_type(ty) {
                    return Err(Sense::INVALID_FIELD_IN_CDB.into());
                }
                let hold = self.hold.clone();
                match hold {
                    Some(h) if all_registrants(h.kind) && sa_key == 0 => {
                        self.registrations.retain(|(p, _)| *p == me);
                        self.hold = Some(Hold { port: me, kind: ty });
                    }
                    _ if sa_key == 0 => return Err(Sense::INVALID_FIELD_IN_PARAM.into()),
                    Some(h) if !all_registrants(h.kind) && self.key_of(&h.port) == Some(sa_key) => {
                        self.registrations.retain(|(p, k)| *p == me || *k != sa_key);
                        self.hold = Some(Hold { port: me, kind: ty });
                    }
                    _ => {
                        let before = self.registrations.len();
                        self.registrations.retain(|(p, k)| *p == me || *k != sa_key);
                        if self.registrations.len() == before {
                            return Err(Fail::Conflict);
                        }
                        if let Some(h) = &self.hold {
                            if all_registrants(h.kind) && self.registrations.is_empty() {
                                self.hold = None;
                            }
                        }
                    }
                }
                self.generation = self.generation.wrapping_add(1);
            }
        }
        Ok(Bytes::new())
    }
}
