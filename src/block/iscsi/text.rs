//! Text keys (RFC 7143 §6, §13): the `key=value\0` format of Login and Text
//! PDUs, and the negotiation of the operational keys into [`Params`].
//!
//! Each negotiated key has its function: `min` (MaxBurstLength,
//! FirstBurstLength, MaxConnections, MaxOutstandingR2T, ErrorRecoveryLevel,
//! DefaultTime2Retain), `max` (DefaultTime2Wait), `and` (ImmediateData,
//! IFMarker, OFMarker), `or` (InitialR2T, DataPDUInOrder,
//! DataSequenceInOrder), lists (digests: only `None`), or a declaration
//! (MaxRecvDataSegmentLength). The answer is always the result, so both
//! sides end with the same values.

use std::collections::BTreeMap;

/// Longest key name (RFC 7143 §6.1).
const MAX_KEY: usize = 63;

/// Longest value accepted (a CHAP response in hex, a SendTargets list entry).
const MAX_VALUE: usize = 8192;

/// The negotiation failed or the text is malformed: the login fails with an
/// initiator error.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TextError {
    /// Not `key=value`, or too long, or not UTF-8.
    #[error("malformed text key '{0}'")]
    Malformed(String),
    /// A value outside the key's range.
    #[error("invalid value '{value}' for key '{key}'")]
    Invalid {
        /// Key.
        key: String,
        /// Value sent.
        value: String,
    },
}

/// Parses a text data segment into its pairs, in order.
///
/// # Errors
/// [`TextError::Malformed`] for an entry without `=`, an empty or overlong
/// key, an overlong value or bytes that are not UTF-8.
pub fn parse(data: &[u8]) -> Result<Vec<(String, String)>, TextError> {
    let mut out = Vec::new();
    for entry in data.split(|b| *b == 0) {
        if entry.is_empty() {
            continue;
        }
        let text = std::str::from_utf8(entry)
            .map_err(|_| TextError::Malformed(String::from_utf8_lossy(entry).into_owned()))?;
        let Some((k, v)) = text.split_once('=') else {
            return Err(TextError::Malformed(text.chars().take(64).collect()));
        };
        if k.is_empty() || k.len() > MAX_KEY || v.len() > MAX_VALUE {
            return Err(TextError::Malformed(k.chars().take(64).collect()));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// Encodes pairs as `key=value\0...`.
pub fn encode(pairs: &[(String, String)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        out.extend_from_slice(k.as_bytes());
        out.push(b'=');
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out
}

/// What this target offers; the negotiated [`Params`] are at most this.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest data segment this target accepts (declared to the initiator).
    pub max_recv_data_segment_length: u32,
    /// Longest solicited burst or Data-In sequence.
    pub max_burst_length: u32,
    /// Longest unsolicited data (immediate + Data-Out before any R2T).
    pub first_burst_length: u32,
    /// `InitialR2T=No` lets initiators send unsolicited Data-Out.
    pub initial_r2t: bool,
    /// `ImmediateData=Yes` lets a command carry its first data.
    pub immediate_data: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recv_data_segment_length: 256 << 10,
            max_burst_length: 1 << 20,
            first_burst_length: 256 << 10,
            initial_r2t: false,
            immediate_data: true,
        }
    }
}

/// The operational parameters in force on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params {
    /// Longest data segment we may send (the initiator's declaration).
    pub send_data_segment_length: u32,
    /// Longest data segment we accept (our declaration).
    pub recv_data_segment_length: u32,
    /// Negotiated MaxBurstLength.
    pub max_burst_length: u32,
    /// Negotiated FirstBurstLength.
    pub first_burst_length: u32,
    /// Negotiated InitialR2T.
    pub initial_r2t: bool,
    /// Negotiated ImmediateData.
    pub immediate_data: bool,
    /// Negotiated MaxOutstandingR2T (always 1 here).
    pub max_outstanding_r2t: u32,
}

impl Params {
    /// The RFC defaults before any negotiation, within `limits`.
    pub fn defaults(limits: &Limits) -> Params {
        Params {
            send_data_segment_length: 8192,
            recv_data_segment_length: limits.max_recv_data_segment_length,
            max_burst_length: 262_144.min(limits.max_burst_length),
            first_burst_length: 65_536.min(limits.first_burst_length),
            initial_r2t: true,
            immediate_data: limits.immediate_data,
            max_outstanding_r2t: 1,
        }
    }
}

/// Negotiates the operational keys of one login: remembers what the
/// initiator offered and answers each key once.
#[derive(Debug)]
pub struct Negotiation {
    limits: Limits,
    /// The parameters as negotiated so far.
    pub params: Params,
    /// Keys answered already (a key is negotiated once per login).
    answered: BTreeMap<String, ()>,
    /// Whether MaxRecvDataSegmentLength was declared to the initiator.
    pub declared_mrdsl: bool,
}

fn number(key: &str, value: &str, lo: u64, hi: u64) -> Result<u64, TextError> {
    let invalid = || TextError::Invalid {
        key: key.to_string(),
        value: value.to_string(),
    };
    let n = if let Some(hex) = value.strip_prefix("0x").or(value.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).map_err(|_| invalid())?
    } else {
        value.parse::<u64>().map_err(|_| invalid())?
    };
    if n < lo || n > hi {
        return Err(invalid());
    }
    Ok(n)
}

fn boolean(key: &str, value: &str) -> Result<bool, TextError> {
    match value {
        "Yes" => Ok(true),
        "No" => Ok(false),
        _ => Err(TextError::Invalid {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

fn yes_no(b: bool) -> String {
    if b { "Yes" } else { "No" }.to_string()
}

/// Keys handled by the login itself, not by [`Negotiation::answer`].
pub fn is_login_key(key: &str) -> bool {
    matches!(
        key,
        "InitiatorName"
            | "InitiatorAlias"
            | "TargetName"
            | "SessionType"
            | "AuthMethod"
            | "CHAP_A"
            | "CHAP_I"
            | "CHAP_C"
            | "CHAP_N"
            | "CHAP_R"
    )
}

impl Negotiation {
    /// A negotiation within `limits`, starting from the RFC defaults.
    pub fn new(limits: Limits) -> Negotiation {
        Negotiation {
            params: Params::defaults(&limits),
            limits,
            answered: BTreeMap::new(),
            declared_mrdsl: false,
        }
    }

    /// The answer to the operational key `key=value`, or `None` when the
    /// key needs none (a declaration, a repeated key).
    ///
    /// # Errors
    /// [`TextError::Invalid`] for values out of range: the login fails.
    pub fn answer(&mut self, key: &str, value: &str) -> Result<Option<String>, TextError> {
        if self.answered.insert(key.to_string(), ()).is_some() {
            return Ok(None);
        }
        let p = &mut self.params;
        let l = &self.limits;
        let reply = match key {
            "HeaderDigest" | "DataDigest" => {
                if value.split(',').any(|v| v == "None") {
                    "None".to_string()
                } else {
                    "Reject".to_string()
                }
            }
            "MaxRecvDataSegmentLength" => {
                // A declaration: what we may send from now on.
                p.send_data_segment_length = number(key, value, 512, 16_777_215)? as u32;
                return Ok(None);
            }
            "MaxBurstLength" => {
                let v = number(key, value, 512, 16_777_215)? as u32;
                p.max_burst_length = v.min(l.max_burst_length);
                p.first_burst_length = p.first_burst_length.min(p.max_burst_length);
                p.max_burst_length.to_string()
            }
            "FirstBurstLength" => {
                let v = number(key, value, 512, 16_777_215)? as u32;
                p.first_burst_length = v.min(l.first_burst_length).min(p.max_burst_length);
                p.first_burst_length.to_string()
            }
            "InitialR2T" => {
                p.initial_r2t = boolean(key, value)? || l.initial_r2t;
                yes_no(p.initial_r2t)
            }
            "ImmediateData" => {
                p.immediate_data = boolean(key, value)? && l.immediate_data;
                yes_no(p.immediate_data)
            }
            "MaxConnections" => {
                number(key, value, 1, 65_535)?;
                "1".to_string()
            }
            "MaxOutstandingR2T" => {
                number(key, value, 1, 65_535)?;
                p.max_outstanding_r2t = 1;
                "1".to_string()
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                boolean(key, value)?;
                // OR: we require in order, so the result is Yes.
                "Yes".to_string()
            }
            "ErrorRecoveryLevel" => {
                number(key, value, 0, 2)?;
                "0".to_string()
            }
            "DefaultTime2Wait" => {
                let v = number(key, value, 0, 3600)?;
                v.max(2).to_string()
            }
            "DefaultTime2Retain" => {
                number(key, value, 0, 3600)?;
                // ErrorRecoveryLevel 0: nothing is retained after a drop.
                "0".to_string()
            }
            "IFMarker" | "OFMarker" => {
                boolean(key, value)?;
                "No".to_string()
            }
            "IFMarkInt" | "OFMarkInt" => "Irrelevant".to_string(),
            "iSCSIProtocolLevel" => {
                let v = number(key, value, 0, 31)?;
                v.min(1).to_string()
            }
            // Declarations the initiator may send; nothing to answer.
            "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => return Ok(None),
            _ => "NotUnderstood".to_string(),
        };
        Ok(Some(reply))
    }

    /// Keys to declare in the last response of the operational stage that
    /// the initiator did not ask about but must know: our
    /// MaxRecvDataSegmentLength (its default is 8 KiB), and the values of
    /// keys whose default differs from what we want.
    pub fn declarations(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        if !self.declared_mrdsl {
            self.declared_mrdsl = true;
            out.push((
                "MaxRecvDataSegmentLength".to_string(),
                self.limits.max_recv_data_segment_length.to_string(),
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pairs_and_refuses_garbage() {
        let pairs = parse(b"InitiatorName=iqn.x\0SessionType=Normal\0\0").unwrap();
        assert_eq!(pairs.len(), 2);
        assert_eq!(pairs[1], ("SessionType".into(), "Normal".into()));
        assert_eq!(encode(&pairs), b"InitiatorName=iqn.x\0SessionType=Normal\0");
        assert!(parse(b"novalue\0").is_err());
        assert!(parse(b"=x\0").is_err());
        assert!(parse(&[b'k', b'=', 0xff, 0]).is_err());
        let long = format!("{}=1", "k".repeat(64));
        assert!(parse(long.as_bytes()).is_err());
    }

    #[test]
    fn negotiates_each_key_with_its_function() {
        let mut n = Negotiation::new(Limits::default());
        let mut a = |k: &str, v: &str| n.answer(k, v).unwrap();
        assert_eq!(a("HeaderDigest", "CRC32C,None").as_deref(), Some("None"));
        assert_eq!(a("DataDigest", "CRC32C").as_deref(), Some("Reject"));
        assert_eq!(a("MaxRecvDataSegmentLength", "65536"), None);
        assert_eq!(a("MaxBurstLength", "16776192").as_deref(), Some("1048576"));
        assert_eq!(a("FirstBurstLength", "8192").as_deref(), Some("8192"));
        assert_eq!(a("InitialR2T", "No").as_deref(), Some("No"));
        assert_eq!(a("ImmediateData", "No").as_deref(), Some("No"));
        assert_eq!(a("MaxConnections", "8").as_deref(), Some("1"));
        assert_eq!(a("ErrorRecoveryLevel", "2").as_deref(), Some("0"));
        assert_eq!(
            a("X-com.example.Foo", "1").as_deref(),
            Some("NotUnderstood")
        );
        assert_eq!(a("MaxBurstLength", "512"), None, "answered once");
        assert_eq!(n.params.send_data_segment_length, 65536);
        assert_eq!(n.params.first_burst_length, 8192);
        assert!(!n.params.immediate_data && !n.params.initial_r2t);
        assert!(n.answer("MaxBurstLength2", "x").is_ok());
        let mut n = Negotiation::new(Limits::default());
        assert!(n.answer("MaxBurstLength", "12").is_err());
        assert!(n.answer("InitialR2T", "Maybe").is_err());
        assert_eq!(n.declarations().len(), 1);
        assert!(n.declarations().is_empty());
    }
}
