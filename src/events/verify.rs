//! Webhook signatures: Ed25519 in `X-GHL-Signature`, and the legacy RSA `X-WH-Signature`
//! only when its key was configured.
//!
//! Both headers carry standard base64 (with padding) of a signature over the **raw request
//! body bytes**, exactly as received: never over re-serialised JSON, whose key order, spacing
//! and escapes need not match what was signed.
//!
//! # Keys
//! HighLevel publishes its keys as PEM `-----BEGIN PUBLIC KEY-----` blocks
//! (SubjectPublicKeyInfo). `ring`, already in the tree through rustls, verifies both
//! algorithms but takes the *inner* key: the raw 32 bytes of an Ed25519 key, and the PKCS#1
//! `RSAPublicKey` DER of an RSA key. So the PEM is decoded here (a few lines of text
//! handling around base64) and the SPKI unwrapped by a small DER walk: `SEQUENCE {
//! SEQUENCE { OID, params }, BIT STRING }`, the OID checked against the algorithm expected,
//! the BIT STRING's content returned. That is all of X.509 this needs; a parser crate would
//! be a new dependency for ~60 lines.
//!
//! # Which header decides
//! - `X-GHL-Signature` present: it alone decides (a wrong Ed25519 signature is refused even if
//!   an RSA signature would pass: a forger must not get to pick the weaker path).
//! - Absent, `X-WH-Signature` present and `--legacy-rsa-key` given: the RSA signature decides.
//! - Otherwise: missing.

use std::path::Path;

use base64::Engine as _;
use ring::signature::{UnparsedPublicKey, ED25519, RSA_PKCS1_2048_8192_SHA256};

/// The header of the Ed25519 signature.
pub const GHL_SIGNATURE: &str = "x-ghl-signature";
/// The header of the legacy RSA-SHA256 signature.
pub const WH_SIGNATURE: &str = "x-wh-signature";

/// Why a delivery's signature was refused (all answered 401).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SignatureError {
    /// No signature header this receiver checks.
    Missing,
    /// A header that is not base64 of a signature of the right size.
    Malformed,
    /// A well-formed signature that does not verify.
    Wrong,
}

impl SignatureError {
    pub fn describe(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing signature (X-GHL-Signature)",
            SignatureError::Malformed => "malformed signature header (not base64 of a signature)",
            SignatureError::Wrong => "signature does not match the body",
        }
    }
}

/// A key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the key file {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {why}\nhint: expected a PEM public key (-----BEGIN PUBLIC KEY-----, SubjectPublicKeyInfo) holding {algorithm} key", path.display())]
    Invalid {
        path: std::path::PathBuf,
        algorithm: &'static str,
        why: &'static str,
    },
}

/// The configured public keys.
#[derive(Clone)]
pub struct Verifier {
    /// The raw 32-byte Ed25519 key.
    ed25519: Vec<u8>,
    /// The PKCS#1 RSAPublicKey DER, when the legacy header is accepted.
    rsa: Option<Vec<u8>>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier(ed25519, legacy rsa: {})", self.rsa.is_some())
    }
}

/// OID 1.3.101.112 (Ed25519), DER-encoded with its tag and length.
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// OID 1.2.840.113549.1.1.1 (rsaEncryption).
const OID_RSA: &[u8] = &[
    0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
];

impl Verifier {
    /// From PEM text: the Ed25519 key, and the RSA key for the legacy header if given.
    pub fn from_pem(ed25519_pem: &str, rsa_pem: Option<&str>) -> Result<Verifier, &'static str> {
        let ed25519 = spki_key(&pem_der(ed25519_pem)?, OID_ED25519)?;
        if ed25519.len() != 32 {
            return Err("an Ed25519 key is 32 bytes");
        }
        let rsa = match rsa_pem {
            Some(pem) => Some(spki_key(&pem_der(pem)?, OID_RSA)?),
            None => None,
        };
        Ok(Verifier { ed25519, rsa })
    }

    /// Reads the key files (`--public-key`, `--legacy-rsa-key`).
    pub fn from_files(ed25519: &Path, rsa: Option<&Path>) -> Result<Verifier, KeyError> {
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| KeyError::Read {
                path: path.to_path_buf(),
                source,
            })
        };
        let ed_text = read(ed25519)?;
        let rsa_text = rsa.map(read).transpose()?;
        // Checked one at a time, so the message names the file at fault.
        Verifier::from_pem(&ed_text, None).map_err(|why| KeyError::Invalid {
            path: ed25519.to_path_buf(),
            algorithm: "an Ed25519",
            why,
        })?;
        Verifier::from_pem(&ed_text, rsa_text.as_deref()).map_err(|why| KeyError::Invalid {
            path: rsa.unwrap_or(ed25519).to_path_buf(),
            algorithm: "an RSA",
            why,
        })
    }

    /// Whether `X-WH-Signature` is checked at all.
    pub fn accepts_legacy(&self) -> bool {
        self.rsa.is_some()
    }

    /// Checks a delivery: the two headers' values as received (if present) and the raw body.
    pub fn verify(
        &self,
        ghl: Option<&[u8]>,
        wh: Option<&[u8]>,
        body: &[u8],
    ) -> Result<(), SignatureError> {
        if let Some(header) = ghl {
            let sig = decode_signature(header, 64, 64)?;
            return UnparsedPublicKey::new(&ED25519, &self.ed25519)
                .verify(body, &sig)
                .map_err(|_| SignatureError::Wrong);
        }
        match (wh, &self.rsa) {
            (Some(header), Some(key)) => {
                // 2048 to 8192-bit keys: 256 to 1024-byte signatures.
                let sig = decode_signature(header, 256, 1024)?;
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key)
                    .verify(body, &sig)
                    .map_err(|_| SignatureError::Wrong)
            }
            _ => Err(SignatureError::Missing),
        }
    }
}

/// The signature bytes of a header value: standard base64 (surrounding spaces allowed),
/// between `min` and `max` bytes once decoded.
fn decode_signature(header: &[u8], min: usize, max: usize) -> Result<Vec<u8>, SignatureError> {
    let text = header.trim_ascii();
    // Longer than base64 of `max` bytes cannot be one: refuse before decoding.
    if text.is_empty() || text.len() > max.div_ceil(3) * 4 {
        return Err(SignatureError::Malformed);
    }
    let sig = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|_| SignatureError::Malformed)?;
    if (min..=max).contains(&sig.len()) {
        Ok(sig)
    } else {
        Err(SignatureError::Malformed)
    }
}

/// The DER bytes of the first `PUBLIC KEY` block of PEM text.
fn pem_der(text: &str) -> Result<Vec<u8>, &'static str> {
    const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
    const END: &str = "-----END PUBLIC KEY-----";
    let start = text
        .find(BEGIN)
        .ok_or("no -----BEGIN PUBLIC KEY----- line")?
        + BEGIN.len();
    let len = text[start..]
        .find(END)
        .ok_or("no -----END PUBLIC KEY----- line")?;
    let body: String = text[start..start + len]
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| "the PEM block is not valid base64")
}

/// One DER element: its tag, its content, and what follows it.
fn der_element(input: &[u8]) -> Result<(u8, &[u8], &[u8]), &'static str> {
    const BAD: &str = "the key is not valid DER";
    let (&tag, rest) = input.split_first().ok_or(BAD)?;
    let (&first, rest) = rest.split_first().ok_or(BAD)?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return Err(BAD);
        }
        let (bytes, rest) = rest.split_at(n);
        (
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
            rest,
        )
    };
    if rest.len() < len {
        return Err(BAD);
    }
    let (content, after) = rest.split_at(len);
    Ok((tag, content, after))
}

/// The key inside a SubjectPublicKeyInfo whose algorithm OID is `oid`.
fn spki_key(der: &[u8], oid: &[u8]) -> Result<Vec<u8>, &'static str> {
    const SEQUENCE: u8 = 0x30;
    const BIT_STRING: u8 = 0x03;
    let (tag, spki, trailing) = der_element(der)?;
    if tag != SEQUENCE || !trailing.is_empty() {
        return Err("the key is not a SubjectPublicKeyInfo");
    }
    let (tag, algorithm, rest) = der_element(spki)?;
    if tag != SEQUENCE {
        return Err("the key is not a SubjectPublicKeyInfo");
    }
    if !algorithm.starts_with(oid) {
        return Err("the key is for another algorithm");
    }
    let (tag, bits, _) = der_element(rest)?;
    match bits.split_first() {
        // No unused bits: the key is whole bytes.
        Some((0, key)) if tag == BIT_STRING && !key.is_empty() => Ok(key.to_vec()),
        _ => Err("the key's BIT STRING is malformed"),
    }
}

/// An Ed25519 public key (raw 32 bytes) as PEM SubjectPublicKeyInfo: for tests and for
/// writing a key a test signs with.
pub fn ed25519_public_pem(raw: &[u8]) -> String {
    let mut der = vec![0x30, 0x2a, 0x30, 0x05];
    der.extend_from_slice(OID_ED25519);
    der.extend_from_slice(&[0x03, 0x21, 0x00]);
    der.extend_from_slice(raw);
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{Ed25519KeyPair, KeyPair};

    fn pair() -> Ed25519KeyPair {
        Ed25519KeyPair::from_seed_unchecked(&[7u8; 32]).unwrap()
    }

    fn b64(bytes: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes()
    }

    #[test]
    fn an_ed25519_signature_over_the_raw_body_verifies_and_nothing_else_does() {
        let key = pair();
        let v = Verifier::from_pem(&ed25519_public_pem(key.public_key().as_ref()), None).unwrap();
        let body = br#"{"type":"ContactCreate","webhookId":"w1"}"#;
        let sig = b64(key.sign(body).as_ref());
        assert_eq!(v.verify(Some(&sig), None, body), Ok(()));
        // The same JSON re-serialised with a space is another body.
        let respaced = br#"{"type": "ContactCreate","webhookId":"w1"}"#;
        assert_eq!(
            v.verify(Some(&sig), None, respaced),
            Err(SignatureError::Wrong)
        );
        assert_eq!(
            v.verify(None, None, body),
            Err(SignatureError::Missing),
            "no header"
        );
        assert_eq!(
            v.verify(None, Some(&sig), body),
            Err(SignatureError::Missing),
            "the legacy header is not checked without its key"
        );
        for bad in [&b"not base64!"[..], b"", b"AAAA", &sig[..sig.len() - 4]] {
            assert_eq!(
                v.verify(Some(bad), None, body),
                Err(SignatureError::Malformed),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn keys_of_the_wrong_algorithm_or_shape_are_refused() {
        assert!(Verifier::from_pem("nothing here", None).is_err());
        let rsa = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/webhook-rsa-test.pub.pem"
        ))
        .unwrap();
        assert_eq!(
            Verifier::from_pem(&rsa, None).unwrap_err(),
            "the key is for another algorithm"
        );
        let ed = ed25519_public_pem(pair().public_key().as_ref());
        let v = Verifier::from_pem(&ed, Some(&rsa)).unwrap();
        assert!(v.accepts_legacy());
        assert!(Verifier::from_pem(&ed, Some(&ed)).is_err());
        let truncated = ed.replace("\n-----END", "AAAA\n-----END");
        assert!(Verifier::from_pem(&truncated, None).is_err());
    }
}
