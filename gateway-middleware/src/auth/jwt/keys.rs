//! Verification keys, each pinned to one algorithm, and key sets read from JWKS documents.

use std::fmt;
use std::sync::Arc;

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use ring::signature::{self as ring_sig, RsaPublicKeyComponents, UnparsedPublicKey};

/// A key that verifies signatures of exactly one algorithm.
///
/// The algorithm is the key's, never the token's: a token whose header names another is
/// refused before any signature check, so an RSA public key can never be used as an HMAC
/// secret, and `none` is no algorithm at all.
#[derive(Clone)]
pub struct JwtKey {
    pub(super) kid: Option<Arc<str>>,
    pub(super) alg: Algorithm,
    pub(super) key: Arc<DecodingKey>,
}

/// RSA and ECDSA signatures are checked with `ring` (the crypto the TLS stack already uses):
/// several times faster than the RustCrypto backend jsonwebtoken is built with (ES256 about
/// 5x, RS256 about 3.5x; `cargo bench -p gateway-benches --bench auth`), with no crate
/// added to the tree. EdDSA (ed25519-dalek is as fast as ring) and HMAC stay with
/// jsonwebtoken.
impl JwtKey {
    /// Whether `signature` (base64url, as in the token) signs `message` under this key.
    pub(super) fn verifies(&self, message: &[u8], signature: &str) -> Result<bool, String> {
        use base64::Engine as _;
        let ring_alg: &'static dyn ring_sig::VerificationAlgorithm = match self.alg {
            Algorithm::ES256 => &ring_sig::ECDSA_P256_SHA256_FIXED,
            Algorithm::ES384 => &ring_sig::ECDSA_P384_SHA384_FIXED,
            alg => match rsa_params(alg) {
                Some(params) => params,
                // EdDSA, HMAC, and whatever jsonwebtoken adds later.
                None => {
                    return jsonwebtoken::crypto::verify(signature, message, &self.key, self.alg)
                        .map_err(|e| e.to_string());
                }
            },
        };
        let signature = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| "the signature is not base64url".to_owned())?;
        let verified = match self.key.kind() {
            DecodingKeyKind::RsaModulusExponent { n, e } => {
                let Some(params) = rsa_params(self.alg) else {
                    return Err("an RSA key for a non-RSA algorithm".into());
                };
                RsaPublicKeyComponents { n, e }.verify(params, message, &signature)
            }
            DecodingKeyKind::SecretOrDer(der) => {
                UnparsedPublicKey::new(ring_alg, der).verify(message, &signature)
            }
        };
        Ok(verified.is_ok())
    }
}

/// The significant bits of a big-endian unsigned integer.
fn bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    n.first()
        .map_or(0, |top| n.len() * 8 - top.leading_zeros() as usize)
}

/// The modulus of a PKCS#1 `RSAPublicKey` (`SEQUENCE { INTEGER n, INTEGER e }`, DER).
fn pkcs1_modulus(der: &[u8]) -> Option<&[u8]> {
    /// A DER element's tag check, and its contents and what follows.
    fn element(der: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = der.split_first()?;
        let (&len, rest) = rest.split_first()?;
        if t != tag {
            return None;
        }
        let (len, rest) = if len < 0x80 {
            (usize::from(len), rest)
        } else {
            let n = usize::from(len & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    let (sequence, _) = element(der, 0x30)?;
    let (modulus, _) = element(sequence, 0x02)?;
    Some(modulus)
}

fn rsa_params(alg: Algorithm) -> Option<&'static ring_sig::RsaParameters> {
    Some(match alg {
        Algorithm::RS256 => &ring_sig::RSA_PKCS1_2048_8192_SHA256,
        Algorithm::RS384 => &ring_sig::RSA_PKCS1_2048_8192_SHA384,
        Algorithm::RS512 => &ring_sig::RSA_PKCS1_2048_8192_SHA512,
        Algorithm::PS256 => &ring_sig::RSA_PSS_2048_8192_SHA256,
        Algorithm::PS384 => &ring_sig::RSA_PSS_2048_8192_SHA384,
        Algorithm::PS512 => &ring_sig::RSA_PSS_2048_8192_SHA512,
        _ => return None,
    })
}

/// Why a key could not be made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError(pub(super) String);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for KeyError {}

fn err(why: impl fmt::Display) -> KeyError {
    KeyError(why.to_string())
}

impl JwtKey {
    /// An HMAC secret for `alg` (`HS256`, `HS384` or `HS512`).
    ///
    /// # Errors
    ///
    /// When `alg` is not an HMAC algorithm, or the secret is shorter than the hash (RFC
    /// 7518 §3.2: a 256-bit secret at least for HS256).
    pub fn hmac(alg: Algorithm, secret: &[u8]) -> Result<Self, KeyError> {
        let min = match alg {
            Algorithm::HS256 => 32,
            Algorithm::HS384 => 48,
            Algorithm::HS512 => 64,
            other => return Err(err(format!("{other:?} is not an HMAC algorithm"))),
        };
        if secret.len() < min {
            return Err(err(format!(
                "an {alg:?} secret needs at least {min} bytes (RFC 7518 §3.2); this one has {}",
                secret.len()
            )));
        }
        let key = DecodingKey::from_secret(secret).map_err(err)?;
        Ok(Self::with(alg, key))
    }

    /// A public key in PEM (`-----BEGIN PUBLIC KEY-----`, or `BEGIN RSA PUBLIC KEY`) for
    /// `alg`: RS/PS with an RSA key, ES256/ES384 with a P-256/P-384 key, EdDSA with an
    /// Ed25519 key.
    ///
    /// # Errors
    ///
    /// When `alg` is an HMAC algorithm, or the PEM is not a public key of its family.
    pub fn public_pem(alg: Algorithm, pem: &[u8]) -> Result<Self, KeyError> {
        let key = match alg.family() {
            AlgorithmFamily::Rsa => DecodingKey::from_rsa_pem(pem),
            AlgorithmFamily::Ec => DecodingKey::from_ec_pem(pem),
            AlgorithmFamily::Ed => DecodingKey::from_ed_pem(pem),
            AlgorithmFamily::Hmac => {
                return Err(err(format!("{alg:?} takes a secret, not a PEM key")));
            }
        };
        let key = key.map_err(|e| err(format!("not a {alg:?} public key: {e}")))?;
        Self::public(alg, key)
    }

    /// A public key, RSA ones of 2048 bits at least (ring refuses smaller ones, and so
    /// would every token they sign: better said at load).
    fn public(alg: Algorithm, key: DecodingKey) -> Result<Self, KeyError> {
        if alg.family() == AlgorithmFamily::Rsa {
            let bits = match key.kind() {
                DecodingKeyKind::RsaModulusExponent { n, .. } => Some(bits(n)),
                DecodingKeyKind::SecretOrDer(der) => pkcs1_modulus(der).map(bits),
            };
            match bits {
                Some(bits) if bits >= 2048 => {}
                Some(bits) => {
                    return Err(err(format!("an RSA key of {bits} bits (2048 at least)")));
                }
                None => return Err(err("not an RSA public key")),
            }
        }
        Ok(Self::with(alg, key))
    }

    /// Names the key: a token whose header has a `kid` is verified only by the key of that
    /// `kid`.
    #[must_use]
    pub fn kid(mut self, kid: &str) -> Self {
        self.kid = Some(kid.into());
        self
    }

    /// The key's algorithm.
    pub const fn algorithm(&self) -> Algorithm {
        self.alg
    }

    /// The key's id, if it has one.
    pub fn key_id(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    fn with(alg: Algorithm, key: DecodingKey) -> Self {
        Self {
            kid: None,
            alg,
            key: Arc::new(key),
        }
    }

    /// The key a JWK describes, pinned to its `alg`, or to the one algorithm its type
    /// implies when it has none (RSA: RS256; EC: ES256 or ES384 by curve; OKP: EdDSA; oct:
    /// HS256). `secrets` says whether `oct` (HMAC) keys are taken: from a file, by choice;
    /// from a URL, never (a secret published at a URL is no secret).
    ///
    /// # Errors
    ///
    /// Why the JWK is not a verification key the gateway uses.
    pub(super) fn from_jwk(jwk: &Jwk, secrets: bool) -> Result<Self, KeyError> {
        if let Some(use_) = &jwk.common.public_key_use
            && *use_ != PublicKeyUse::Signature
        {
            return Err(err("its `use` is not `sig`"));
        }
        let implied = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref other => return Err(err(format!("curve {other:?} is not supported"))),
            },
            AlgorithmParameters::OctetKeyPair(p) => match p.curve {
                EllipticCurve::Ed25519 => Algorithm::EdDSA,
                ref other => return Err(err(format!("curve {other:?} is not supported"))),
            },
            AlgorithmParameters::OctetKey(_) if secrets => Algorithm::HS256,
            AlgorithmParameters::OctetKey(_) => {
                return Err(err("a secret (`oct`) key is not taken from a URL"));
            }
            _ => return Err(err("its key type is not supported")),
        };
        let alg = match &jwk.common.key_algorithm {
            None => implied,
            Some(named) => {
                let alg =
                    signing(named).ok_or_else(|| err(format!("`alg` {named:?} does not sign")))?;
                // The named algorithm must fit the key: an `alg: HS256` on an RSA key is
                // the confusion this pinning exists to prevent.
                let fits = match (alg, implied) {
                    (a, i) if a.family() == AlgorithmFamily::Rsa => {
                        i.family() == AlgorithmFamily::Rsa
                    }
                    (a, i) if a.family() == AlgorithmFamily::Hmac => {
                        i.family() == AlgorithmFamily::Hmac
                    }
                    (a, i) => a == i,
                };
                if !fits {
                    return Err(err(format!("`alg` {alg:?} does not fit its key type")));
                }
                alg
            }
        };
        if alg.family() == AlgorithmFamily::Hmac
            && let AlgorithmParameters::OctetKey(_) = &jwk.algorithm
        {
            let key = DecodingKey::from_jwk(jwk).map_err(err)?;
            let secret = key.try_get_as_bytes().map_err(err)?;
            let mut made = Self::hmac(alg, secret)?;
            made.kid = jwk.common.key_id.as_deref().map(Arc::from);
            return Ok(made);
        }
        let key = DecodingKey::from_jwk(jwk).map_err(err)?;
        let mut made = Self::public(alg, key)?;
        made.kid = jwk.common.key_id.as_deref().map(Arc::from);
        Ok(made)
    }
}

/// The signing algorithm `alg` names, if it is one.
const fn signing(alg: &KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::HS256 => Algorithm::HS256,
        KeyAlgorithm::HS384 => Algorithm::HS384,
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

impl fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .finish_non_exhaustive()
    }
}

/// The most keys taken from one JWKS document.
pub(super) const MAX_KEYS: usize = 64;

/// The keys of a JWKS document (RFC 7517 §5), and why each key left out was.
///
/// # Errors
///
/// When the document is not a JWKS (not JSON, no `keys` array).
pub(super) fn parse_jwks(
    json: &[u8],
    secrets: bool,
) -> Result<(Vec<JwtKey>, Vec<String>), KeyError> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document =
        serde_json::from_slice(json).map_err(|e| err(format!("not a JWKS document: {e}")))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    for (i, value) in doc.keys.into_iter().enumerate() {
        if keys.len() == MAX_KEYS {
            skipped.push(format!("keys after the first {MAX_KEYS} are not read"));
            break;
        }
        let key = serde_json::from_value::<Jwk>(value)
            .map_err(|e| err(format!("not a JWK: {e}")))
            .and_then(|jwk| JwtKey::from_jwk(&jwk, secrets));
        match key {
            Ok(key) => keys.push(key),
            Err(why) => skipped.push(format!("keys[{i}]: {why}")),
        }
    }
    Ok((keys, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwks_keys_are_pinned_to_one_algorithm() {
        let doc = br#"{"keys":[
            {"kty":"RSA","kid":"r1","n":"sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw","e":"AQAB"},
            {"kty":"RSA","kid":"r2","alg":"HS256","n":"AQAB","e":"AQAB"},
            {"kty":"oct","kid":"h1","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldC1zZWNyZXQ"},
            {"kty":"EC","kid":"e1","use":"enc","crv":"P-256","x":"x","y":"y"},
            {"kty":"weird"}
        ]}"#;
        let (keys, skipped) = parse_jwks(doc, false).unwrap();
        assert_eq!(keys.len(), 1, "{skipped:?}");
        assert_eq!(keys[0].alg, Algorithm::RS256);
        assert_eq!(keys[0].key_id(), Some("r1"));
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped[0].contains("does not fit"), "{skipped:?}");
        assert!(skipped[1].contains("not taken from a URL"), "{skipped:?}");
        let (keys, _) = parse_jwks(doc, true).unwrap();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[1].alg, Algorithm::HS256);
        assert!(parse_jwks(b"[]", true).is_err());
    }

    #[test]
    fn small_rsa_keys_are_refused_at_load() {
        assert_eq!(bits(&[0, 0, 0x80, 0]), 16);
        assert_eq!(bits(&[0x01; 256]), 2041);
        let jwk = |n: &[u8]| {
            use base64::Engine as _;
            let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n);
            serde_json::from_str::<Jwk>(&format!(r#"{{"kty":"RSA","n":"{n}","e":"AQAB"}}"#))
                .unwrap()
        };
        let err = JwtKey::from_jwk(&jwk(&[0xff; 128]), false).unwrap_err();
        assert!(err.0.contains("1024 bits"), "{err}");
        assert!(JwtKey::from_jwk(&jwk(&[0xff; 256]), false).is_ok());
        // A 1024-bit PKCS#1 key: SEQUENCE { INTEGER (129 bytes), INTEGER 65537 }.
        let mut der = vec![0x30, 0x81, 0x89, 0x02, 0x81, 0x81, 0x00];
        der.extend([0xc5; 128]);
        der.extend([0x02, 0x03, 0x01, 0x00, 0x01]);
        assert_eq!(pkcs1_modulus(&der).map(bits), Some(1024));
        assert_eq!(pkcs1_modulus(&der[..20]), None);
    }

    #[test]
    fn hmac_secrets_are_long_enough_and_pem_keys_fit() {
        assert!(JwtKey::hmac(Algorithm::HS256, &[7; 31]).is_err());
        assert!(JwtKey::hmac(Algorithm::HS256, &[7; 32]).is_ok());
        assert!(JwtKey::hmac(Algorithm::RS256, &[7; 64]).is_err());
        assert!(JwtKey::public_pem(Algorithm::HS256, b"x").is_err());
        assert!(JwtKey::public_pem(Algorithm::RS256, b"not pem").is_err());
    }
}
