//! Dataplane tokens: compact JWTs signed with ES256 (ECDSA P-256, SHA-256), one
//! signing key per mesh, kept in the [`SecretStore`] and created on first issue.
//!
//! Claims: `mesh`, `name` (the dataplane), `iat`, `exp` (seconds since the epoch)
//! and `jti` (random id, the handle for revocation). The header names the key
//! (`kid`). Verification reports each failure distinctly ([`TokenError`]), and a
//! token revoked by `jti` fails at its next use.
//!
//! The JWT is written here on aws-lc-rs directly (about a hundred lines) rather
//! than through a JWT crate: we need exactly one algorithm, the crates either
//! pull a second crypto stack or hide which check failed, and this keeps every
//! byte that is parsed from outside in one short file.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _,
    UnparsedPublicKey,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use super::store::{SecretStore, StoreError};

/// Longest token accepted for parsing; real ones are about 400 bytes.
const MAX_TOKEN_LEN: usize = 4096;

/// Why a token was not issued or not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Not a well-formed ES256 JWT with our claims.
    #[error("malformed dataplane token: {0}")]
    Malformed(String),
    /// The signature does not verify with the mesh's signing key.
    #[error("dataplane token signature is invalid (not signed by mesh {mesh:?}'s token key)")]
    BadSignature {
        /// The mesh the token claims.
        mesh: String,
    },
    /// The token's `exp` has passed.
    #[error("dataplane token expired at {exp} (unix seconds)")]
    Expired {
        /// The token's `exp`.
        exp: u64,
    },
    /// The token was revoked.
    #[error("dataplane token {jti} has been revoked")]
    Revoked {
        /// The token's id.
        jti: String,
    },
    /// The token is for another mesh.
    #[error("dataplane token is for mesh {token_mesh:?}, not mesh {expected:?}")]
    WrongMesh {
        /// The mesh in the token.
        token_mesh: String,
        /// The mesh of the dataplane being authenticated.
        expected: String,
    },
    /// The token is for another dataplane.
    #[error("dataplane token is for dataplane {token_name:?}, not {expected:?}")]
    WrongName {
        /// The name in the token.
        token_name: String,
        /// The dataplane being authenticated.
        expected: String,
    },
    /// The token names a mesh that has no token signing key (it never issued a
    /// token, or it was deleted).
    #[error("mesh {0:?} does not exist or has issued no dataplane tokens")]
    UnknownMesh(String),
    /// A bad argument to [`TokenIssuer::issue`] or [`TokenIssuer::revoke`].
    #[error("{0}")]
    InvalidRequest(String),
    /// The stored signing key is unusable.
    #[error("dataplane token signing key of mesh {0:?} is corrupt")]
    CorruptKey(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The claims of a dataplane token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneClaims {
    /// Mesh of the dataplane.
    pub mesh: String,
    /// Name of the dataplane.
    pub name: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
    /// Token id, 32 hex digits.
    pub jti: String,
}

/// A freshly issued token.
#[derive(Debug, Clone)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// What it says.
    pub claims: DataplaneClaims,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    #[serde(default)]
    kid: String,
}

struct SigningKey {
    pair: EcdsaKeyPair,
    kid: String,
}

type CachedKey = (Vec<u8>, Arc<SigningKey>);

/// Issues, verifies and revokes dataplane tokens.
pub struct TokenIssuer {
    store: Arc<dyn SecretStore>,
    /// mesh -> (the PKCS#8 bytes it was parsed from, the key).
    keys: Mutex<HashMap<String, CachedKey>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer").finish_non_exhaustive()
    }
}

impl TokenIssuer {
    /// An issuer keeping signing keys and revocations in `store`.
    pub fn new(store: Arc<dyn SecretStore>) -> Self {
        Self {
            store,
            keys: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
        }
    }

    /// The secret key holding `mesh`'s token signing key.
    pub fn signing_key_secret(mesh: &str) -> String {
        format!("{mesh}.dataplane-token-signing-key")
    }

    /// The secret key marking token `jti` of `mesh` as revoked.
    pub fn revocation_secret(mesh: &str, jti: &str) -> String {
        format!("{mesh}.dataplane-token-revoked.{jti}")
    }

    /// Issues a token for dataplane `name` in `mesh`, valid for `valid_for`.
    /// Checking that the mesh exists is the caller's job.
    pub fn issue(
        &self,
        mesh: &str,
        name: &str,
        valid_for: Duration,
    ) -> Result<IssuedToken, TokenError> {
        self.issue_at(mesh, name, valid_for, SystemTime::now())
    }

    /// [`TokenIssuer::issue`] with an explicit issue time.
    pub fn issue_at(
        &self,
        mesh: &str,
        name: &str,
        valid_for: Duration,
        now: SystemTime,
    ) -> Result<IssuedToken, TokenError> {
        if mesh.is_empty() || name.is_empty() {
            return Err(TokenError::InvalidRequest(
                "a dataplane token needs a mesh and a name".into(),
            ));
        }
        if valid_for.as_secs() == 0 {
            return Err(TokenError::InvalidRequest(
                "a dataplane token must be valid for at least 1s".into(),
            ));
        }
        let key = self.signing_key(mesh, true)?;
        let iat = unix(now);
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti)
            .map_err(|_| TokenError::InvalidRequest("no randomness available".into()))?;
        let claims = DataplaneClaims {
            mesh: mesh.to_string(),
            name: name.to_string(),
            iat,
            exp: iat.saturating_add(valid_for.as_secs()),
            jti: super::ca::hex(&jti),
        };
        let header = Header {
            alg: "ES256".into(),
            typ: Some("JWT".into()),
            kid: key.kid.clone(),
        };
        let signing_input = format!("{}.{}", b64_json(&header)?, b64_json(&claims)?);
        let sig = key
            .pair
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| TokenError::CorruptKey(mesh.to_string()))?;
        Ok(IssuedToken {
            token: format!("{signing_input}.{}", B64.encode(sig.as_ref())),
            claims,
        })
    }

    /// Verifies `token` for dataplane `name` in `mesh`: format, signature,
    /// expiry, revocation, then that mesh and name match.
    pub fn verify(
        &self,
        token: &str,
        mesh: &str,
        name: &str,
    ) -> Result<DataplaneClaims, TokenError> {
        self.verify_at(token, mesh, name, SystemTime::now())
    }

    /// [`TokenIssuer::verify`] at time `now`.
    pub fn verify_at(
        &self,
        token: &str,
        mesh: &str,
        name: &str,
        now: SystemTime,
    ) -> Result<DataplaneClaims, TokenError> {
        let token = token.trim();
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 4096 bytes".into()));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed(
                "expected three base64url parts separated by '.'".into(),
            ));
        };
        let header: Header = b64_decode_json(h, "header")?;
        if header.alg != "ES256" {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?} is not accepted (only ES256)",
                header.alg
            )));
        }
        let claims: DataplaneClaims = b64_decode_json(c, "claims")?;
        let sig = B64
            .decode(s)
            .map_err(|e| TokenError::Malformed(format!("signature is not base64url: {e}")))?;

        let key = self.signing_key(&claims.mesh, false)?;
        let public =
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.pair.public_key().as_ref());
        let signing_input_len = h.len() + 1 + c.len();
        if header.kid != key.kid
            || public
                .verify(&token.as_bytes()[..signing_input_len], &sig)
                .is_err()
        {
            return Err(TokenError::BadSignature {
                mesh: claims.mesh.clone(),
            });
        }
        if unix(now) >= claims.exp {
            return Err(TokenError::Expired { exp: claims.exp });
        }
        if self.is_revoked(&claims.mesh, &claims.jti)? {
            return Err(TokenError::Revoked {
                jti: claims.jti.clone(),
            });
        }
        if claims.mesh != mesh {
            return Err(TokenError::WrongMesh {
                token_mesh: claims.mesh,
                expected: mesh.to_string(),
            });
        }
        if claims.name != name {
            return Err(TokenError::WrongName {
                token_name: claims.name,
                expected: name.to_string(),
            });
        }
        Ok(claims)
    }

    /// Revokes token `jti` of `mesh`; it fails verification from now on.
    pub fn revoke(&self, mesh: &str, jti: &str) -> Result<(), TokenError> {
        if jti.len() != 32 || !jti.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenError::InvalidRequest(format!(
                "token id {jti:?} is not 32 hex digits"
            )));
        }
        self.store
            .create_secret_if_absent(&Self::revocation_secret(mesh, jti), b"revoked")?;
        Ok(())
    }

    /// Whether token `jti` of `mesh` is revoked.
    pub fn is_revoked(&self, mesh: &str, jti: &str) -> Result<bool, TokenError> {
        Ok(self
            .store
            .get_secret(&Self::revocation_secret(mesh, jti))?
            .is_some())
    }

    fn signing_key(&self, mesh: &str, create: bool) -> Result<Arc<SigningKey>, TokenError> {
        let secret = Self::signing_key_secret(mesh);
        let pkcs8 = match self.store.get_secret(&secret)? {
            Some(bytes) => bytes,
            None if create => {
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.rng)
                    .map_err(|_| TokenError::CorruptKey(mesh.to_string()))?;
                self.store.create_secret_if_absent(&secret, doc.as_ref())?
            }
            None => return Err(TokenError::UnknownMesh(mesh.to_string())),
        };
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((stored, key)) = keys.get(mesh)
            && *stored == pkcs8
        {
            return Ok(key.clone());
        }
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8)
            .map_err(|_| TokenError::CorruptKey(mesh.to_string()))?;
        let digest =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, pair.public_key().as_ref());
        let key = Arc::new(SigningKey {
            kid: super::ca::hex(&digest.as_ref()[..8]),
            pair,
        });
        keys.insert(mesh.to_string(), (pkcs8, key.clone()));
        Ok(key)
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn b64_json<T: Serialize>(value: &T) -> Result<String, TokenError> {
    let json = serde_json::to_vec(value).map_err(|e| TokenError::InvalidRequest(e.to_string()))?;
    Ok(B64.encode(json))
}

fn b64_decode_json<T: for<'de> Deserialize<'de>>(part: &str, what: &str) -> Result<T, TokenError> {
    let bytes = B64
        .decode(part)
        .map_err(|e| TokenError::Malformed(format!("{what} is not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TokenError::Malformed(format!("{what} is not the expected JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::store::MemoryStore;

    const DAY: Duration = Duration::from_secs(86_400);

    fn issuer() -> TokenIssuer {
        TokenIssuer::new(Arc::new(MemoryStore::new()))
    }

    #[test]
    fn round_trip() {
        let t = issuer();
        let issued = t.issue("a", "dp-1", DAY).unwrap();
        let claims = t.verify(&issued.token, "a", "dp-1").unwrap();
        assert_eq!(claims, issued.claims);
        assert_eq!(claims.exp - claims.iat, 86_400);
        assert_eq!(claims.jti.len(), 32);
    }

    #[test]
    fn token_for_mesh_a_is_refused_in_mesh_b() {
        let t = issuer();
        t.issue("b", "other", DAY).unwrap(); // mesh b has a key too
        let a = t.issue("a", "dp-1", DAY).unwrap();
        let err = t.verify(&a.token, "b", "dp-1").unwrap_err();
        assert!(
            matches!(err, TokenError::WrongMesh { ref token_mesh, ref expected } if token_mesh == "a" && expected == "b"),
            "{err}"
        );
    }

    #[test]
    fn wrong_name_is_refused() {
        let t = issuer();
        let a = t.issue("a", "dp-1", DAY).unwrap();
        let err = t.verify(&a.token, "a", "dp-2").unwrap_err();
        assert!(matches!(err, TokenError::WrongName { .. }), "{err}");
    }

    #[test]
    fn expired_is_refused() {
        let t = issuer();
        let past = SystemTime::now() - 2 * DAY;
        let old = t.issue_at("a", "dp-1", DAY, past).unwrap();
        let err = t.verify(&old.token, "a", "dp-1").unwrap_err();
        assert!(
            matches!(err, TokenError::Expired { exp } if exp == old.claims.exp),
            "{err}"
        );
        // Exactly at exp it is already expired.
        let at_exp = SystemTime::UNIX_EPOCH + Duration::from_secs(old.claims.exp);
        assert!(matches!(
            t.verify_at(&old.token, "a", "dp-1", at_exp),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn revoked_is_refused_at_next_use() {
        let t = issuer();
        let tok = t.issue("a", "dp-1", DAY).unwrap();
        let other = t.issue("a", "dp-1", DAY).unwrap();
        t.verify(&tok.token, "a", "dp-1").unwrap();
        t.revoke("a", &tok.claims.jti).unwrap();
        let err = t.verify(&tok.token, "a", "dp-1").unwrap_err();
        assert!(
            matches!(err, TokenError::Revoked { ref jti } if *jti == tok.claims.jti),
            "{err}"
        );
        t.verify(&other.token, "a", "dp-1").unwrap();
        assert!(matches!(
            t.revoke("a", "not-an-id"),
            Err(TokenError::InvalidRequest(_))
        ));
    }

    #[test]
    fn malformed_is_refused() {
        let t = issuer();
        let good = t.issue("a", "dp-1", DAY).unwrap().token;
        let (h, rest) = good.split_once('.').unwrap();
        let (c, _) = rest.split_once('.').unwrap();
        let hs256 = B64.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let none = B64.encode(br#"{"alg":"none"}"#);
        let long = "a".repeat(5000);
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.b.c",
            &format!("{h}.{}.{}", B64.encode(b"{not json"), "AA"),
            &format!("{h}.{}.AA", B64.encode(br#"{"mesh":"a"}"#)),
            &format!("{hs256}.{c}.AA"),
            &format!("{none}.{c}."),
            &format!("{h}.{c}.%%%"),
            &long,
        ] {
            let err = t.verify(bad, "a", "dp-1").unwrap_err();
            assert!(matches!(err, TokenError::Malformed(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn wrongly_signed_is_refused() {
        let t = issuer();
        let good = t.issue("a", "dp-1", DAY).unwrap().token;
        // Same claims, signed by another store's key for the same mesh name.
        let forger = issuer();
        let forged = forger.issue("a", "dp-1", DAY).unwrap().token;
        let err = t.verify(&forged, "a", "dp-1").unwrap_err();
        assert!(matches!(err, TokenError::BadSignature { .. }), "{err}");
        // Claims edited after signing (name swapped), header and signature kept.
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut claims: DataplaneClaims =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        claims.name = "dp-2".into();
        let edited = B64.encode(serde_json::to_vec(&claims).unwrap());
        parts[1] = &edited;
        let err = t.verify(&parts.join("."), "a", "dp-2").unwrap_err();
        assert!(matches!(err, TokenError::BadSignature { .. }), "{err}");
        // A damaged signature, and one of the wrong length.
        let (input, sig) = good.rsplit_once('.').unwrap();
        let mut sig = B64.decode(sig).unwrap();
        sig[10] ^= 0x40;
        let damaged = format!("{input}.{}", B64.encode(&sig));
        let short = format!("{input}.{}", B64.encode(&sig[..60]));
        for bad in [damaged, short] {
            let err = t.verify(&bad, "a", "dp-1").unwrap_err();
            assert!(matches!(err, TokenError::BadSignature { .. }), "{err}");
        }
    }

    #[test]
    fn unknown_mesh_is_refused_without_creating_a_key() {
        let store = Arc::new(MemoryStore::new());
        let forger = issuer();
        let forged = forger.issue("ghost", "dp-1", DAY).unwrap().token;
        let t = TokenIssuer::new(store.clone());
        let err = t.verify(&forged, "ghost", "dp-1").unwrap_err();
        assert!(matches!(err, TokenError::UnknownMesh(_)), "{err}");
        assert!(
            store
                .get_secret(&TokenIssuer::signing_key_secret("ghost"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn signing_key_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let tok = {
            let t = TokenIssuer::new(Arc::new(MemoryStore::open(&path).unwrap()));
            let tok = t.issue("a", "dp-1", DAY).unwrap();
            let revoked = t.issue("a", "dp-1", DAY).unwrap();
            t.revoke("a", &revoked.claims.jti).unwrap();
            (tok, revoked)
        };
        let t = TokenIssuer::new(Arc::new(MemoryStore::open(&path).unwrap()));
        t.verify(&tok.0.token, "a", "dp-1").unwrap();
        assert!(matches!(
            t.verify(&tok.1.token, "a", "dp-1"),
            Err(TokenError::Revoked { .. })
        ));
    }
}
