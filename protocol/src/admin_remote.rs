//! The remote admin channel of `safekit -H`: admin requests signed with the cluster secret.
//!
//! `safekit -H node2 stop -m M` reaches node2's web service port (9010 by
//! default) instead of the local Unix socket. The network is not trusted, so
//! every request is signed with the cluster secret and bound to a nonce the
//! server issued, and every answer is signed too:
//!
//! 1. The client asks the server for a nonce; the server answers
//!    [`NonceGrant`] with a fresh `server_nonce` that it remembers for a short
//!    time and accepts only once.
//! 2. The client draws its own fresh `client_nonce` and sends a
//!    [`SignedRequest`]: both nonces, the postcard-encoded
//!    [`AdminRequest`], and
//!    `mac = HMAC(secret, "safekit-repl client" ‖ version ‖ context ‖ client_nonce ‖ server_nonce)`
//!    where `context = "safekit-admin request v1 <hex SHA-256 of the request bytes>"`.
//! 3. The server checks that it issued `server_nonce` (and forgets it), then
//!    the MAC (constant-time); only then does it decode and run the request.
//! 4. It answers a [`SignedReply`]: the postcard-encoded [`AdminResponse`]
//!    and `mac` computed as above with the server label and
//!    `context = "safekit-admin reply v1 <hex SHA-256 of the response bytes>"`.
//!    The client checks it, so it knows the answer comes from a node that
//!    holds the secret and answers this very request (its own nonce is in the
//!    MAC, so a recorded old reply does not fit).
//!
//! The MACs are those of [`crate::auth`] (the replication handshake): the
//! context takes the place of the module name, and cannot be a module name
//! since it contains spaces, so a proof of one protocol is never a proof of
//! the other. Requests and replies are authenticated, **not encrypted**:
//! someone who can read the admin network sees module names, states and log
//! lines.
//!
//! This crate does no I/O and has no randomness or clock: the agent draws the
//! nonces from the OS CSPRNG and keeps the table of issued nonces.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::admin::{AdminRequest, AdminResponse};
use crate::auth::{self, AuthError, Nonce, ProofBytes};

/// The version of this channel, first field of every message.
pub const REMOTE_VERSION: u8 = 1;

/// The largest [`SignedRequest`] accepted, in bytes (an admin request is a few hundred).
pub const MAX_SIGNED_REQUEST_LEN: usize = 64 * 1024;

/// The largest [`SignedReply`] accepted, in bytes (a long `safekit log`).
pub const MAX_SIGNED_REPLY_LEN: usize = 16 * 1024 * 1024;

/// The server's answer to a nonce request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceGrant {
    /// [`REMOTE_VERSION`].
    pub version: u8,
    /// A fresh nonce, valid once and for a short time.
    pub server_nonce: Nonce,
}

/// A request signed with the cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRequest {
    /// [`REMOTE_VERSION`].
    pub version: u8,
    /// The client's fresh nonce (binds the reply to this request).
    pub client_nonce: Nonce,
    /// The nonce the server granted.
    pub server_nonce: Nonce,
    /// The postcard-encoded [`AdminRequest`].
    #[serde(with = "serde_bytes")]
    pub request: Vec<u8>,
    /// HMAC over the nonces and the request bytes.
    pub mac: ProofBytes,
}

/// An answer signed with the cluster secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReply {
    /// [`REMOTE_VERSION`].
    pub version: u8,
    /// The postcard-encoded [`AdminResponse`].
    #[serde(with = "serde_bytes")]
    pub response: Vec<u8>,
    /// HMAC over the request's nonces and the response bytes.
    pub mac: ProofBytes,
}

/// Why a remote admin message was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum RemoteAdminError {
    /// The message is larger than its bound.
    #[error("message of {len} bytes is larger than the limit of {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// The bytes are not a message of this kind (truncated, garbled, trailing bytes).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message is of another version of this channel.
    #[error("unsupported remote admin version {0} (this node speaks {REMOTE_VERSION})")]
    UnsupportedVersion(u8),
    /// The MAC does not match: the other side does not hold this cluster secret.
    #[error("authentication failed: not signed with this node's cluster secret")]
    BadMac,
    /// The secret is empty.
    #[error("the cluster secret is empty")]
    EmptySecret,
}

impl From<AuthError> for RemoteAdminError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::BadProof => RemoteAdminError::BadMac,
            AuthError::EmptySecret => RemoteAdminError::EmptySecret,
        }
    }
}

/// Encodes the answer to a nonce request.
pub fn encode_nonce_grant(server_nonce: &Nonce) -> Vec<u8> {
    postcard::to_allocvec(&NonceGrant {
        version: REMOTE_VERSION,
        server_nonce: *server_nonce,
    })
    .expect("a version byte and 32 bytes always serialize")
}

/// Decodes the answer to a nonce request.
///
/// # Errors
/// [`RemoteAdminError::Malformed`] or [`RemoteAdminError::UnsupportedVersion`].
pub fn decode_nonce_grant(bytes: &[u8]) -> Result<Nonce, RemoteAdminError> {
    let grant: NonceGrant = decode_exact(bytes, 64)?;
    check_version(grant.version)?;
    Ok(grant.server_nonce)
}

/// Encodes and signs `request` for the server that granted `server_nonce`.
///
/// # Errors
/// [`RemoteAdminError::EmptySecret`], or [`RemoteAdminError::TooLarge`] for
/// a request over [`MAX_SIGNED_REQUEST_LEN`].
pub fn sign_request(
    secret: &[u8],
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    request: &AdminRequest,
) -> Result<Vec<u8>, RemoteAdminError> {
    let request = encode(request)?;
    let mac = auth::client_proof(
        secret,
        &context("request", &request),
        client_nonce,
        server_nonce,
    )?;
    let bytes = encode(&SignedRequest {
        version: REMOTE_VERSION,
        client_nonce: *client_nonce,
        server_nonce: *server_nonce,
        request,
        mac,
    })?;
    check_len(bytes.len(), MAX_SIGNED_REQUEST_LEN)?;
    Ok(bytes)
}

/// Decodes a signed request (not yet verified: see [`SignedRequest::open`]).
///
/// # Errors
/// [`RemoteAdminError::TooLarge`], [`RemoteAdminError::Malformed`] or
/// [`RemoteAdminError::UnsupportedVersion`].
pub fn decode_signed_request(bytes: &[u8]) -> Result<SignedRequest, RemoteAdminError> {
    let signed: SignedRequest = decode_exact(bytes, MAX_SIGNED_REQUEST_LEN)?;
    check_version(signed.version)?;
    Ok(signed)
}

impl SignedRequest {
    /// Checks the MAC (constant-time), then decodes the request.
    ///
    /// The caller must also check that it granted `server_nonce` and that
    /// the nonce was not used before.
    ///
    /// # Errors
    /// [`RemoteAdminError::BadMac`] when the MAC does not match,
    /// [`RemoteAdminError::Malformed`] when the signed bytes are not a request.
    pub fn open(&self, secret: &[u8]) -> Result<AdminRequest, RemoteAdminError> {
        auth::verify_client_proof(
            secret,
            &context("request", &self.request),
            &self.client_nonce,
            &self.server_nonce,
            &self.mac,
        )?;
        decode_exact(&self.request, MAX_SIGNED_REQUEST_LEN)
    }
}

/// Encodes and signs the answer to the request that carried these nonces.
///
/// # Errors
/// [`RemoteAdminError::EmptySecret`], or [`RemoteAdminError::TooLarge`] for
/// an answer over [`MAX_SIGNED_REPLY_LEN`].
pub fn sign_reply(
    secret: &[u8],
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    response: &AdminResponse,
) -> Result<Vec<u8>, RemoteAdminError> {
    let response = encode(response)?;
    let mac = auth::server_proof(
        secret,
        &context("reply", &response),
        client_nonce,
        server_nonce,
    )?;
    let bytes = encode(&SignedReply {
        version: REMOTE_VERSION,
        response,
        mac,
    })?;
    check_len(bytes.len(), MAX_SIGNED_REPLY_LEN)?;
    Ok(bytes)
}

/// Decodes a signed answer, checks its MAC for this request's nonces, and decodes the response.
///
/// # Errors
/// [`RemoteAdminError::BadMac`] when it was not signed with `secret` for
/// these nonces; [`RemoteAdminError::TooLarge`], [`RemoteAdminError::Malformed`],
/// [`RemoteAdminError::UnsupportedVersion`] for bytes that are not a reply.
pub fn open_reply(
    secret: &[u8],
    client_nonce: &Nonce,
    server_nonce: &Nonce,
    bytes: &[u8],
) -> Result<AdminResponse, RemoteAdminError> {
    let signed: SignedReply = decode_exact(bytes, MAX_SIGNED_REPLY_LEN)?;
    check_version(signed.version)?;
    auth::verify_server_proof(
        secret,
        &context("reply", &signed.response),
        client_nonce,
        server_nonce,
        &signed.mac,
    )?;
    decode_exact(&signed.response, MAX_SIGNED_REPLY_LEN)
}

/// What the MAC covers besides the nonces: the direction, the version and the body's digest.
fn context(kind: &str, body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("safekit-admin {kind} v{REMOTE_VERSION} {hex}")
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, RemoteAdminError> {
    postcard::to_allocvec(value).map_err(|error| RemoteAdminError::Malformed(error.to_string()))
}

/// Decodes exactly one value from `bytes`: no trailing bytes, at most `max` bytes.
fn decode_exact<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
    max: usize,
) -> Result<T, RemoteAdminError> {
    check_len(bytes.len(), max)?;
    let (value, rest) = postcard::take_from_bytes(bytes)
        .map_err(|error| RemoteAdminError::Malformed(error.to_string()))?;
    if !rest.is_empty() {
        return Err(RemoteAdminError::Malformed(format!(
            "{} trailing bytes",
            rest.len()
        )));
    }
    Ok(value)
}

fn check_len(len: usize, max: usize) -> Result<(), RemoteAdminError> {
    if len > max {
        return Err(RemoteAdminError::TooLarge { len, max });
    }
    Ok(())
}

fn check_version(version: u8) -> Result<(), RemoteAdminError> {
    if version != REMOTE_VERSION {
        return Err(RemoteAdminError::UnsupportedVersion(version));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::{Caller, Verb};

    const SECRET: &[u8] = b"the cluster secret, 32 bytes ok";
    const CN: Nonce = [7; 32];
    const SN: Nonce = [9; 32];

    fn stop() -> AdminRequest {
        AdminRequest::Control {
            module: "mirror".into(),
            verb: Verb::Stop,
            caller: Caller::Local {
                uid: 0,
                name: String::new(),
            },
        }
    }

    #[test]
    fn signed_request_and_reply_round_trip() {
        let bytes = sign_request(SECRET, &CN, &SN, &stop()).expect("signs");
        let signed = decode_signed_request(&bytes).expect("decodes");
        assert_eq!((signed.client_nonce, signed.server_nonce), (CN, SN));
        assert_eq!(signed.open(SECRET).expect("verifies"), stop());
        let answer = AdminResponse::Ok {
            message: "stopped".into(),
        };
        let reply = sign_reply(SECRET, &CN, &SN, &answer).expect("signs");
        assert_eq!(open_reply(SECRET, &CN, &SN, &reply).expect("opens"), answer);
        assert_eq!(
            decode_nonce_grant(&encode_nonce_grant(&SN)).expect("decodes"),
            SN
        );
    }

    #[test]
    fn wrong_secret_is_refused_both_ways() {
        let bytes =
            sign_request(b"another secret of the same size", &CN, &SN, &stop()).expect("signs");
        let signed = decode_signed_request(&bytes).expect("decodes");
        assert!(matches!(signed.open(SECRET), Err(RemoteAdminError::BadMac)));
        let reply = sign_reply(b"another secret", &CN, &SN, &AdminResponse::Pong).expect("signs");
        assert!(matches!(
            open_reply(SECRET, &CN, &SN, &reply),
            Err(RemoteAdminError::BadMac)
        ));
    }

    #[test]
    fn a_changed_request_or_nonce_breaks_the_mac() {
        let bytes = sign_request(SECRET, &CN, &SN, &stop()).expect("signs");
        let signed = decode_signed_request(&bytes).expect("decodes");
        let mut start = signed.clone();
        start.request = encode(&AdminRequest::Control {
            module: "mirror".into(),
            verb: Verb::Start,
            caller: Caller::Local {
                uid: 0,
                name: String::new(),
            },
        })
        .expect("encodes");
        assert!(matches!(start.open(SECRET), Err(RemoteAdminError::BadMac)));
        let mut other_nonce = signed;
        other_nonce.server_nonce = [10; 32];
        assert!(matches!(
            other_nonce.open(SECRET),
            Err(RemoteAdminError::BadMac)
        ));
    }

    #[test]
    fn an_old_reply_does_not_answer_a_new_request() {
        let reply = sign_reply(SECRET, &CN, &SN, &AdminResponse::Pong).expect("signs");
        assert!(matches!(
            open_reply(SECRET, &[8; 32], &SN, &reply),
            Err(RemoteAdminError::BadMac)
        ));
    }

    #[test]
    fn a_request_signature_is_not_a_reply_signature() {
        // The same bytes signed as a request must not pass as a reply.
        let body = encode(&AdminResponse::Pong).expect("encodes");
        let mac = auth::client_proof(SECRET, &context("request", &body), &CN, &SN).expect("mac");
        let forged = encode(&SignedReply {
            version: REMOTE_VERSION,
            response: body,
            mac,
        })
        .expect("encodes");
        assert!(matches!(
            open_reply(SECRET, &CN, &SN, &forged),
            Err(RemoteAdminError::BadMac)
        ));
    }

    #[test]
    fn truncated_garbled_and_oversized_frames_are_errors() {
        let bytes = sign_request(SECRET, &CN, &SN, &stop()).expect("signs");
        for len in 0..bytes.len() {
            assert!(
                decode_signed_request(&bytes[..len]).is_err(),
                "prefix of {len} bytes decoded"
            );
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            decode_signed_request(&trailing),
            Err(RemoteAdminError::Malformed(_))
        ));
        // Each flipped byte is refused somewhere: decoding, version or MAC.
        for index in 0..bytes.len() {
            let mut garbled = bytes.clone();
            garbled[index] ^= 0x55;
            let accepted = decode_signed_request(&garbled)
                .and_then(|signed| signed.open(SECRET))
                .is_ok();
            assert!(!accepted, "byte {index} flipped was accepted");
        }
        let mut old = bytes;
        old[0] = REMOTE_VERSION + 1;
        assert!(matches!(
            decode_signed_request(&old),
            Err(RemoteAdminError::UnsupportedVersion(_))
        ));
        assert!(matches!(
            decode_signed_request(&vec![0; MAX_SIGNED_REQUEST_LEN + 1]),
            Err(RemoteAdminError::TooLarge { .. })
        ));
        assert!(decode_nonce_grant(&[REMOTE_VERSION, 1, 2]).is_err());
        assert!(open_reply(SECRET, &CN, &SN, &[0xff; 40]).is_err());
    }
}
