//! CHAP authentication of the login's security stage (RFC 1994, RFC 7143
//! §12.1.3): the target challenges, the initiator answers
//! `MD5(id || secret || challenge)`; with mutual CHAP the initiator then
//! challenges the target the same way.
//!
//! ```text
//! I->T  AuthMethod=CHAP,None
//! T->I  AuthMethod=CHAP
//! I->T  CHAP_A=5
//! T->I  CHAP_A=5 CHAP_I=<id> CHAP_C=0x<16 random bytes>
//! I->T  CHAP_N=<user> CHAP_R=0x<md5> [CHAP_I=<id> CHAP_C=0x<challenge>]
//! T->I  [CHAP_N=<target user> CHAP_R=0x<md5>]
//! ```

use md5::{Digest, Md5};
use rand::RngCore;

/// CHAP credentials of a target (`chap = { user, secret, mutual = [user, secret] }`).
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChapConfig {
    /// The user name initiators must send (CHAP_N).
    pub user: String,
    /// The initiator's secret.
    pub secret: String,
    /// For mutual CHAP: the target's user name and secret.
    #[serde(default)]
    pub mutual: Option<(String, String)>,
}

impl std::fmt::Debug for ChapConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("ChapConfig")
            .field("user", &self.user)
            .field("mutual", &self.mutual.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// Why a CHAP exchange failed (the login fails with an authentication
/// error; the cause is logged, never sent).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChapError {
    /// A key is missing or malformed.
    #[error("malformed CHAP exchange - {0}")]
    Malformed(&'static str),
    /// The initiator offered no algorithm we have (only MD5, 5).
    #[error("no supported CHAP algorithm offered")]
    Algorithm,
    /// Wrong user name or response.
    #[error("CHAP response does not match for user '{0}'")]
    Refused(String),
}

/// Length of our challenge.
const CHALLENGE_LEN: usize = 16;

/// Longest challenge accepted from the initiator (mutual CHAP).
const MAX_CHALLENGE: usize = 1024;

/// One CHAP exchange, from our challenge to the initiator's response.
#[derive(Debug)]
pub struct ChapExchange {
    id: u8,
    challenge: Vec<u8>,
}

/// CHAP_R of `id`, `secret` and `challenge`.
fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Decodes a CHAP binary value: `0x` hex or `0b` base64.
pub fn decode_binary(value: &str) -> Option<Vec<u8>> {
    if let Some(hex) = value.strip_prefix("0x").or(value.strip_prefix("0X")) {
        let hex = if hex.len() % 2 == 1 {
            format!("0{hex}")
        } else {
            hex.to_string()
        };
        return hex::decode(hex).ok();
    }
    if let Some(b64) = value.strip_prefix("0b").or(value.strip_prefix("0B")) {
        return base64_decode(b64);
    }
    None
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

impl ChapExchange {
    /// Answers `CHAP_A` (a list of algorithms): our CHAP_A, CHAP_I, CHAP_C.
    ///
    /// # Errors
    /// [`ChapError::Algorithm`] unless MD5 (5) is offered.
    pub fn start(algorithms: &str) -> Result<(ChapExchange, Vec<(String, String)>), ChapError> {
        if !algorithms.split(',').any(|a| a.trim() == "5") {
            return Err(ChapError::Algorithm);
        }
        let mut rng = rand::rng();
        let mut challenge = vec![0u8; CHALLENGE_LEN];
        rng.fill_bytes(&mut challenge);
        let id = (rng.next_u32() & 0xff) as u8;
        let keys = vec![
            ("CHAP_A".to_string(), "5".to_string()),
            ("CHAP_I".to_string(), id.to_string()),
            (
                "CHAP_C".to_string(),
                format!("0x{}", hex::encode(&challenge)),
            ),
        ];
        Ok((ChapExchange { id, challenge }, keys))
    }

    /// Checks the initiator's CHAP_N/CHAP_R against `config`; for mutual
    /// CHAP (CHAP_I and CHAP_C sent) returns our CHAP_N and CHAP_R.
    ///
    /// # Errors
    /// `Malformed` for missing or undecodable keys, `Refused` for a wrong
    /// user or response, or a mutual challenge without mutual credentials.
    pub fn verify(
        &self,
        config: &ChapConfig,
        keys: &[(String, String)],
    ) -> Result<Vec<(String, String)>, ChapError> {
        let get = |k: &str| {
            keys.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let name = get("CHAP_N").ok_or(ChapError::Malformed("no CHAP_N"))?;
        let resp = get("CHAP_R").ok_or(ChapError::Malformed("no CHAP_R"))?;
        let resp = decode_binary(resp).ok_or(ChapError::Malformed("CHAP_R is not 0x or 0b"))?;
        let expected = response(self.id, config.secret.as_bytes(), &self.challenge);
        // Compare every byte whatever the first mismatch (no timing hint).
        let same = resp.len() == expected.len()
            && resp
                .iter()
                .zip(expected.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if name != config.user || !same {
            return Err(ChapError::Refused(name.chars().take(64).collect()));
        }
        match (get("CHAP_I"), get("CHAP_C")) {
            (None, None) => Ok(Vec::new()),
            (Some(id), Some(challenge)) => {
                let Some((user, secret)) = &config.mutual else {
                    return Err(ChapError::Refused(name.to_string()));
                };
                let id: u8 = id
                    .parse()
                    .map_err(|_| ChapError::Malformed("CHAP_I is not 0-255"))?;
                if challenge.len() > MAX_CHALLENGE * 2 + 2 {
                    return Err(ChapError::Malformed("CHAP_C too long"));
                }
                let challenge = decode_binary(challenge)
                    .ok_or(ChapError::Malformed("CHAP_C is not 0x or 0b"))?;
                // A reflected challenge would make us answer our own question.
                if challenge == self.challenge || challenge.is_empty() {
                    return Err(ChapError::Malformed("CHAP_C reflects ours"));
                }
                let r = response(id, secret.as_bytes(), &challenge);
                Ok(vec![
                    ("CHAP_N".to_string(), user.clone()),
                    ("CHAP_R".to_string(), format!("0x{}", hex::encode(r))),
                ])
            }
            _ => Err(ChapError::Malformed("CHAP_I without CHAP_C")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(mutual: bool) -> ChapConfig {
        ChapConfig {
            user: "alice".into(),
            secret: "s3cret-1234".into(),
            mutual: mutual.then(|| ("target".into(), "t-secret-5678".into())),
        }
    }

    fn answer(ex: &ChapExchange, secret: &str) -> String {
        format!(
            "0x{}",
            hex::encode(response(ex.id, secret.as_bytes(), &ex.challenge))
        )
    }

    #[test]
    fn one_way_and_mutual_chap() {
        assert_eq!(ChapExchange::start("7").unwrap_err(), ChapError::Algorithm);
        let (ex, keys) = ChapExchange::start("7,5").unwrap();
        assert_eq!(keys[0].1, "5");
        let good = vec![
            ("CHAP_N".to_string(), "alice".to_string()),
            ("CHAP_R".to_string(), answer(&ex, "s3cret-1234")),
        ];
        assert!(ex.verify(&config(false), &good).unwrap().is_empty());
        let mut bad = good.clone();
        bad[1].1 = answer(&ex, "wrong");
        assert!(matches!(
            ex.verify(&config(false), &bad),
            Err(ChapError::Refused(_))
        ));
        let mut mutual = good.clone();
        mutual.push(("CHAP_I".into(), "9".into()));
        mutual.push(("CHAP_C".into(), "0xa1b2c3".into()));
        let back = ex.verify(&config(true), &mutual).unwrap();
        let expect = response(9, b"t-secret-5678", &[0xa1, 0xb2, 0xc3]);
        assert_eq!(back[1].1, format!("0x{}", hex::encode(expect)));
        assert!(ex.verify(&config(false), &mutual).is_err());
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_binary("0x102").unwrap(), vec![1, 2]);
    }
}
