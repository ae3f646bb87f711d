//! Mutual authentication of the two ends of a replication connection.
//!
//! Both nodes of a cluster share a secret. Before any operation flows, each
//! side proves that it knows the secret without sending it, by a
//! challenge-response over HMAC-SHA256:
//!
//! 1. The sender (client) sends [`Hello`]: module name, protocol version, a
//!    fresh 32-byte `client_nonce`.
//! 2. The receiver (server) checks module and version, draws a fresh
//!    `server_nonce` and answers [`Challenge`] with `server_nonce` and
//!    `server_proof = HMAC(secret, "safekit-repl server" ‖ version ‖ module ‖ client_nonce ‖ server_nonce)`.
//! 3. The client verifies `server_proof` (it refuses a receiver that does not
//!    know the secret) and sends [`Proof`] with
//!    `client_proof = HMAC(secret, "safekit-repl client" ‖ version ‖ module ‖ client_nonce ‖ server_nonce)`.
//! 4. The server verifies it and answers `Welcome` or `Refused`.
//!
//! Each proof covers both nonces, so a recorded proof is useless for another
//! connection (the other side's nonce differs), and the two directions use
//! different labels, so one side's proof cannot be reflected back as the
//! other's. The module name and the protocol version are in the MAC input, so
//! a proof for one module or version does not open another. Variable-length
//! fields are length-prefixed so that two different inputs never concatenate
//! to the same bytes. Comparison is constant-time (`hmac`'s `verify_slice`).
//!
//! Nonces are supplied by the caller: this crate does no I/O and has no source
//! of randomness. Callers must draw them from the operating system's CSPRNG.
//!
//! Known gap: the connection is authenticated but **not encrypted** and the
//! frames after the handshake are not MAC'd (only CRC-checked). Someone who can
//! read the replication network sees the replicated data, and someone who can
//! inject into an established TCP connection can forge operations. Use a
//! dedicated replication network (or a VPN/IPsec between the nodes) until a
//! TLS or per-frame MAC layer is added.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The version of the replication protocol this crate speaks (also the frame header's version byte).
pub const PROTOCOL_VERSION: u8 = 1;

/// Length of a nonce and of a proof, in bytes.
pub const NONCE_LEN: usize = 32;

/// A random number used once per connection and side.
pub type Nonce = [u8; NONCE_LEN];

/// An HMAC-SHA256 proof.
pub type ProofBytes = [u8; 32];

/// First message of the client (the sender of operations).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The module whose stream this connection carries.
    pub module: String,
    /// The protocol version the client speaks.
    pub version: u8,
    /// The client's fresh nonce.
    pub client_nonce: Nonce,
}

/// The server's answer to [`Hello`]: its own nonce and its proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    /// The server's fresh nonce.
    pub server_nonce: Nonce,
    /// HMAC proving the server knows the secret.
    pub server_proof: ProofBytes,
}

/// The client's proof of the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proof {
    /// HMAC proving the client knows the secret.
    pub client_proof: ProofBytes,
}

/// Why the server refused a client (sent before closing, also logged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// A short human-readable reason ("authentication failed", "unknown module"...).
    pub reason: String,
}

/// Why a proof was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The proof does not match: the peer does not know the secret, or replays an old proof.
    #[error("authentication failed: the peer does not know the cluster secret")]
    BadProof,
    /// The secret is empty, which would make every proof guessable.
    #[error("the cluster secret is empty")]
    EmptySecret,
}

/// Which side a proof comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Server,
}

fn mac(
    secret: &[u8],
    side: Side,
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Result<Hmac<Sha256>, AuthError> {
    if secret.is_empty() {
        return Err(AuthError::EmptySecret);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(match side {
        Side::Client => b"safekit-repl client",
        Side::Server => b"safekit-repl server",
    });
    mac.update(&[PROTOCOL_VERSION]);
    mac.update(&(module.len() as u64).to_le_bytes());
    mac.update(module.as_bytes());
    mac.update(client_nonce);
    mac.update(server_nonce);
    Ok(mac)
}

fn prove(
    secret: &[u8],
    side: Side,
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Result<ProofBytes, AuthError> {
    Ok(mac(secret, side, module, client_nonce, server_nonce)?
        .finalize()
        .into_bytes()
        .into())
}

fn verify(
    secret: &[u8],
    side: Side,
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &ProofBytes,
) -> Result<(), AuthError> {
    mac(secret, side, module, client_nonce, server_nonce)?
        .verify_slice(proof)
        .map_err(|_| AuthError::BadProof)
}

/// The server's proof for [`Challenge::server_proof`].
///
/// # Errors
/// [`AuthError::EmptySecret`] if `secret` is empty.
pub fn server_proof(
    secret: &[u8],
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Result<ProofBytes, AuthError> {
    prove(secret, Side::Server, module, client_nonce, server_nonce)
}

/// The client's proof for [`Proof::client_proof`].
///
/// # Errors
/// [`AuthError::EmptySecret`] if `secret` is empty.
pub fn client_proof(
    secret: &[u8],
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
) -> Result<ProofBytes, AuthError> {
    prove(secret, Side::Client, module, client_nonce, server_nonce)
}

/// The client checks the server's proof (constant-time).
///
/// # Errors
/// [`AuthError::BadProof`] if it does not match, [`AuthError::EmptySecret`] if `secret` is empty.
pub fn verify_server_proof(
    secret: &[u8],
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &ProofBytes,
) -> Result<(), AuthError> {
    verify(
        secret,
        Side::Server,
        module,
        client_nonce,
        server_nonce,
        proof,
    )
}

/// The server checks the client's proof (constant-time).
///
/// # Errors
/// [`AuthError::BadProof`] if it does not match, [`AuthError::EmptySecret`] if `secret` is empty.
pub fn verify_client_proof(
    secret: &[u8],
    module: &str,
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    proof: &ProofBytes,
) -> Result<(), AuthError> {
    verify(
        secret,
        Side::Client,
        module,
        client_nonce,
        server_nonce,
        proof,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CN: Nonce = [1; 32];
    const SN: Nonce = [2; 32];

    #[test]
    fn right_secret_passes_both_ways() {
        let secret = b"cluster secret";
        let sp = server_proof(secret, "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(verify_server_proof(secret, "mirror", &CN, &SN, &sp), Ok(()));
        let cp = client_proof(secret, "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(verify_client_proof(secret, "mirror", &CN, &SN, &cp), Ok(()));
    }

    #[test]
    fn wrong_secret_fails() {
        let cp = client_proof(b"guess", "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(
            verify_client_proof(b"cluster secret", "mirror", &CN, &SN, &cp),
            Err(AuthError::BadProof)
        );
        let sp = server_proof(b"guess", "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(
            verify_server_proof(b"cluster secret", "mirror", &CN, &SN, &sp),
            Err(AuthError::BadProof)
        );
    }

    #[test]
    fn replayed_proof_for_another_nonce_fails() {
        let secret = b"cluster secret";
        let recorded = client_proof(secret, "mirror", &CN, &SN).expect("non-empty secret");
        let fresh_server_nonce = [3; 32];
        assert_eq!(
            verify_client_proof(secret, "mirror", &CN, &fresh_server_nonce, &recorded),
            Err(AuthError::BadProof)
        );
    }

    #[test]
    fn server_proof_cannot_be_reflected_as_client_proof() {
        let secret = b"cluster secret";
        let sp = server_proof(secret, "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(
            verify_client_proof(secret, "mirror", &CN, &SN, &sp),
            Err(AuthError::BadProof)
        );
    }

    #[test]
    fn proof_for_another_module_fails() {
        let secret = b"cluster secret";
        let cp = client_proof(secret, "mirror", &CN, &SN).expect("non-empty secret");
        assert_eq!(
            verify_client_proof(secret, "other", &CN, &SN, &cp),
            Err(AuthError::BadProof)
        );
    }

    #[test]
    fn empty_secret_is_refused() {
        assert_eq!(
            client_proof(b"", "mirror", &CN, &SN),
            Err(AuthError::EmptySecret)
        );
    }
}
