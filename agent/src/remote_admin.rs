//! `safekit -H`: the distributed admin channel, both ends.
//!
//! As in SafeKit, a command for other nodes goes through each node's web
//! service port (9010 by default, [`crate::health_http`]). Two routes serve it:
//!
//! - `POST /safekit/admin/nonce`: a fresh nonce, valid once and for
//!   [`NONCE_LIFETIME`];
//! - `POST /safekit/admin/request`: a request signed with the cluster secret
//!   over that nonce (see `safekit_protocol::admin_remote`); the answer is a
//!   reply signed with the secret.
//!
//! The server runs a request only once its nonce was found (and forgotten)
//! and its MAC verified; anything else is refused, logged in the agent log
//! with the client's address, and nothing is executed. Control verbs are shown
//! in the module log as called by `admin@<client address>`. Only the verbs an
//! operator may run from another node are accepted ([`execute`]); the others
//! (the scripts' `printe`/`printw`/`printi`, and any request this file does
//! not know) are refused.
//!
//! The client side ([`Target`], [`parse_targets`], [`send`]) is what the
//! `safekit` command uses when it is given `-H`: it reads the cluster secret
//! of the machine it runs on, so only root can use it.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use safekit_core::config::ClusterConfig;
use safekit_protocol::admin::{AdminRequest, AdminResponse, Caller};
use safekit_protocol::admin_remote::{self, MAX_SIGNED_REPLY_LEN, RemoteAdminError};
use safekit_protocol::auth::Nonce;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::admin_socket::PeerCredentials;
use crate::daemon::heartbeat::RateLimit;
use crate::daemon::runner::{Registry, RunnerEvent};

/// The route that grants nonces.
pub const NONCE_PATH: &str = "/safekit/admin/nonce";
/// The route that runs signed requests.
pub const REQUEST_PATH: &str = "/safekit/admin/request";
/// The prefix of both routes.
pub const ROUTE_PREFIX: &str = "/safekit/admin/";
/// How long a granted nonce stays usable.
pub const NONCE_LIFETIME: Duration = Duration::from_secs(30);
/// How many granted, unused nonces are remembered; beyond, the oldest is forgotten.
pub const MAX_PENDING_NONCES: usize = 1024;
/// How long the client waits for a TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceError {
    /// Never granted, already used (a replay), or forgotten.
    #[error("unknown or already used nonce (a replayed request?)")]
    Unknown,
    /// Granted more than [`NONCE_LIFETIME`] ago.
    #[error("expired nonce (granted more than {} s ago)", NONCE_LIFETIME.as_secs())]
    Expired,
}

/// The nonces granted and not used yet, oldest first.
#[derive(Debug, Default)]
pub struct NonceTable {
    granted: VecDeque<(Nonce, Instant)>,
}

impl NonceTable {
    /// Remembers `nonce`, granted at `now`.
    pub fn grant(&mut self, now: Instant, nonce: Nonce) {
        self.granted
            .retain(|(_, granted)| now.saturating_duration_since(*granted) <= NONCE_LIFETIME);
        while self.granted.len() >= MAX_PENDING_NONCES {
            self.granted.pop_front();
        }
        self.granted.push_back((nonce, now));
    }

    /// Uses `nonce` at `now`: accepted once if it was granted less than
    /// [`NONCE_LIFETIME`] ago, and forgotten in every case.
    ///
    /// # Errors
    /// [`NonceError`].
    pub fn consume(&mut self, now: Instant, nonce: &Nonce) -> Result<(), NonceError> {
        let position = self
            .granted
            .iter()
            .position(|(granted, _)| granted == nonce)
            .ok_or(NonceError::Unknown)?;
        let (_, granted_at) = self
            .granted
            .remove(position)
            .expect("the position was just found");
        if now.saturating_duration_since(granted_at) > NONCE_LIFETIME {
            return Err(NonceError::Expired);
        }
        Ok(())
    }

    /// How many nonces are waiting to be used.
    pub fn pending(&self) -> usize {
        self.granted.len()
    }
}

/// Why a signed request was refused before anything ran.
#[derive(Debug, thiserror::Error)]
pub enum RefusalError {
    /// The frame is not a signed request.
    #[error(transparent)]
    Frame(RemoteAdminError),
    /// Its nonce was not granted, was used before or expired.
    #[error(transparent)]
    Nonce(#[from] NonceError),
    /// Its MAC does not match this node's secret.
    #[error(transparent)]
    Auth(RemoteAdminError),
}

/// An HTTP answer of the admin routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// The status code.
    pub status: u16,
    /// `application/octet-stream` for signed messages, `text/plain` for refusals.
    pub content_type: &'static str,
    /// The body.
    pub body: Vec<u8>,
}

impl HttpAnswer {
    fn binary(body: Vec<u8>) -> Self {
        HttpAnswer {
            status: 200,
            content_type: "application/octet-stream",
            body,
        }
    }

    fn text(status: u16, text: impl std::fmt::Display) -> Self {
        HttpAnswer {
            status,
            content_type: "text/plain",
            body: format!("{text}\n").into_bytes(),
        }
    }
}

/// The server end: this node's secret and the nonces it granted.
pub struct RemoteAdmin {
    secret: Vec<u8>,
    nonces: Mutex<NonceTable>,
    /// Refusals are logged at most once per interval: unauthenticated senders cannot flood the log.
    refusals: Mutex<RateLimit>,
}

impl std::fmt::Debug for RemoteAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("RemoteAdmin")
            .field("nonces", &self.nonces)
            .finish_non_exhaustive()
    }
}

/// A request whose nonce and MAC were accepted.
#[derive(Debug)]
pub struct Authenticated {
    /// The request.
    pub request: AdminRequest,
    /// The client's nonce, for the reply's MAC.
    pub client_nonce: Nonce,
    /// The server's nonce, for the reply's MAC.
    pub server_nonce: Nonce,
}

impl RemoteAdmin {
    /// The server end for a node whose cluster secret is `secret`.
    pub fn new(secret: Vec<u8>) -> Self {
        RemoteAdmin {
            secret,
            nonces: Mutex::new(NonceTable::default()),
            refusals: Mutex::new(RateLimit::default()),
        }
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, NonceTable> {
        // A panic while holding this lock cannot leave the table inconsistent
        // (each method is one VecDeque operation), so a poisoned lock is usable.
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Grants a fresh nonce (from the OS CSPRNG) at `now`; returns the encoded grant.
    pub fn grant(&self, now: Instant) -> Vec<u8> {
        let nonce: Nonce = rand::random();
        self.nonces().grant(now, nonce);
        admin_remote::encode_nonce_grant(&nonce)
    }

    /// Checks a signed request received at `now`: frame, nonce (used up here), MAC.
    ///
    /// # Errors
    /// [`RefusalError`]; nothing may be executed then.
    pub fn authenticate(&self, now: Instant, bytes: &[u8]) -> Result<Authenticated, RefusalError> {
        let signed = admin_remote::decode_signed_request(bytes).map_err(RefusalError::Frame)?;
        self.nonces().consume(now, &signed.server_nonce)?;
        let request = signed.open(&self.secret).map_err(|error| match error {
            RemoteAdminError::BadMac | RemoteAdminError::EmptySecret => RefusalError::Auth(error),
            other => RefusalError::Frame(other),
        })?;
        Ok(Authenticated {
            request,
            client_nonce: signed.client_nonce,
            server_nonce: signed.server_nonce,
        })
    }

    /// Answers one request of the admin routes from `client`.
    pub async fn handle(
        &self,
        registry: &Registry,
        client: IpAddr,
        path: &str,
        body: &[u8],
    ) -> HttpAnswer {
        match path {
            NONCE_PATH => HttpAnswer::binary(self.grant(Instant::now())),
            REQUEST_PATH => {
                let accepted = match self.authenticate(Instant::now(), body) {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        let report = self
                            .refusals
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .allow();
                        if let Some(suppressed) = report {
                            tracing::warn!(%client, reason = %error, suppressed, "remote admin request refused (nothing executed)");
                        }
                        return match error {
                            RefusalError::Frame(_) => HttpAnswer::text(400, error),
                            RefusalError::Nonce(_) => HttpAnswer::text(403, error),
                            RefusalError::Auth(_) => HttpAnswer::text(
                                403,
                                format!(
                                    "authentication failed: the request is not signed with the cluster secret of {}",
                                    registry.node
                                ),
                            ),
                        };
                    }
                };
                let summary = describe(&accepted.request);
                if matches!(accepted.request, AdminRequest::Control { .. }) {
                    tracing::info!(%client, request = %summary, "remote admin request");
                } else {
                    tracing::debug!(%client, request = %summary, "remote admin request");
                }
                let response = execute(registry, client, accepted.request).await;
                match admin_remote::sign_reply(
                    &self.secret,
                    &accepted.client_nonce,
                    &accepted.server_nonce,
                    &response,
                ) {
                    Ok(reply) => HttpAnswer::binary(reply),
                    Err(error) => {
                        tracing::error!(%client, %error, "remote admin: cannot sign the answer");
                        HttpAnswer::text(500, format!("cannot sign the answer: {error}"))
                    }
                }
            }
            _ => HttpAnswer::text(404, "not found"),
        }
    }
}

/// A request as the agent log shows it (a control verb's claimed caller is not shown: it is ignored).
fn describe(request: &AdminRequest) -> String {
    match request {
        AdminRequest::Control { module, verb, .. } => format!("{} -m {module}", verb.name()),
        other => format!("{other:?}"),
    }
}

/// Runs an authenticated request from `client`, if it is one an operator may run from another node.
pub async fn execute(registry: &Registry, client: IpAddr, request: AdminRequest) -> AdminResponse {
    // The requests below do not use the caller's credentials except Control,
    // which is answered here with the remote caller's name.
    let as_root = PeerCredentials {
        uid: 0,
        gid: 0,
        pid: None,
    };
    match request {
        AdminRequest::Control { module, verb, .. } => {
            let Some(handle) = registry.modules.get(&module) else {
                // Unknown or rejected module: the local handler says so, in the same words.
                return crate::daemon::admin::handle(
                    registry,
                    as_root,
                    AdminRequest::Control {
                        module,
                        verb,
                        caller: Caller::Remote {
                            addr: client.to_string(),
                        },
                    },
                )
                .await;
            };
            crate::daemon::admin::ask_runner(handle, |reply| RunnerEvent::Control {
                verb,
                caller: format!("admin@{client}"),
                reply,
            })
            .await
        }
        request @ (AdminRequest::State { .. }
        | AdminRequest::Log { .. }
        | AdminRequest::ModuleList
        | AdminRequest::GetResource { .. }
        | AdminRequest::Ping) => crate::daemon::admin::handle(registry, as_root, request).await,
        AdminRequest::Print { .. } => AdminResponse::Refused {
            reason: "printe, printw and printi are for the scripts of the node they run on: not accepted over -H".into(),
        },
        #[allow(unreachable_patterns)] // Requests added later are refused until listed above.
        _ => AdminResponse::Refused {
            reason: "this request is not accepted over -H: run it on the node itself".into(),
        },
    }
}

// ---------------------------------------------------------------------------
// Client
// ---------------------------------------------------------------------------

/// One node named by `-H`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Its name in cluster.xml, if known.
    pub name: Option<String>,
    /// Its address or host name (IPv6 without brackets).
    pub host: String,
    /// Its web service port.
    pub port: u16,
    /// Whether the port was written in `-H` (then shown).
    pub explicit_port: bool,
}

impl Target {
    fn host_port(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// How the node is named in the output: `node2 (10.0.0.2)`, or the address alone.
    pub fn label(&self) -> String {
        let address = if self.explicit_port {
            self.host_port()
        } else {
            self.host.clone()
        };
        match &self.name {
            Some(name) => format!("{name} ({address})"),
            None => address,
        }
    }
}

/// Reads `-H`'s list: `*` (every node of cluster.xml), node names of
/// cluster.xml, addresses or host names, each optionally with `:port`
/// (`[v6]:port` for IPv6), or `http://host[:port]`.
///
/// A node's address is the one of the LAN marked `command="on"` in
/// cluster.xml, else of its first LAN.
///
/// # Errors
/// A one-line reason: empty list, `*` without cluster.xml, https, bad port.
pub fn parse_targets(
    spec: &str,
    cluster: Option<&ClusterConfig>,
    default_port: u16,
) -> Result<Vec<Target>, String> {
    let mut targets: Vec<Target> = Vec::new();
    let mut push = |target: Target| {
        if !targets.contains(&target) {
            targets.push(target);
        }
    };
    for item in spec
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
    {
        if item == "*" {
            let cluster =
                cluster.ok_or("-H \"*\" needs SAFEVAR/cluster/cluster.xml on this node")?;
            let names = cluster.node_names();
            if names.is_empty() {
                return Err("-H \"*\": cluster.xml lists no node".into());
            }
            for name in names {
                if let Some(host) = node_address(cluster, name) {
                    push(Target {
                        name: Some(name.to_string()),
                        host,
                        port: default_port,
                        explicit_port: false,
                    });
                }
            }
            continue;
        }
        if item.starts_with("https:") || item.starts_with("[https") {
            return Err(format!(
                "-H {item}: https is not supported; use http (the requests are signed with the cluster secret)"
            ));
        }
        let item = item.strip_prefix("http://").unwrap_or(item);
        let item = item.trim_end_matches('/');
        let (host, port) = split_port(item)?;
        if host.is_empty() {
            return Err(format!("-H: empty node name in {spec:?}"));
        }
        let (name, host) = match cluster.and_then(|cluster| node_address(cluster, host)) {
            Some(address) => (Some(host.to_string()), address),
            None => (
                cluster.and_then(|cluster| node_of_address(cluster, host)),
                host.to_string(),
            ),
        };
        push(Target {
            name,
            host,
            port: port.unwrap_or(default_port),
            explicit_port: port.is_some(),
        });
    }
    if targets.is_empty() {
        return Err("-H names no node".into());
    }
    Ok(targets)
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`, or a bare IPv6 address.
fn split_port(item: &str) -> Result<(&str, Option<u16>), String> {
    let parse_port = |port: &str| {
        port.parse::<u16>()
            .map_err(|_| format!("-H {item}: {port:?} is not a port"))
    };
    if let Some(rest) = item.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("-H {item}: missing ]"))?;
        return match after.strip_prefix(':') {
            Some(port) => Ok((host, Some(parse_port(port)?))),
            None if after.is_empty() => Ok((host, None)),
            None => Err(format!("-H {item}: unexpected {after:?} after ]")),
        };
    }
    if item.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok((item, None));
    }
    match item.rsplit_once(':') {
        Some((host, port)) => Ok((host, Some(parse_port(port)?))),
        None => Ok((item, None)),
    }
}

/// The address of node `name` for distributed commands.
fn node_address(cluster: &ClusterConfig, name: &str) -> Option<String> {
    let lans = &cluster.lans.lan;
    lans.iter()
        .filter(|lan| lan.command == Some(true))
        .chain(lans.iter())
        .flat_map(|lan| lan.node.iter())
        .find(|node| node.name == name)
        .map(|node| {
            node.addr
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
}

/// The name of the node that has address `host` on some LAN.
fn node_of_address(cluster: &ClusterConfig, host: &str) -> Option<String> {
    cluster
        .lans
        .lan
        .iter()
        .flat_map(|lan| lan.node.iter())
        .find(|node| node.addr.trim_start_matches('[').trim_end_matches(']') == host)
        .map(|node| node.name.clone())
}

/// Why a remote request failed, in one line naming the node.
#[derive(Debug, thiserror::Error)]
pub enum RemoteRequestError {
    /// No TCP connection.
    #[error("{node}: unreachable at {endpoint}: {reason}")]
    Unreachable {
        /// The node's label.
        node: String,
        /// `address:port`.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The node refused the request (wrong secret, replay...).
    #[error("{node}: refused by {endpoint}: {reason}")]
    Refused {
        /// The node's label.
        node: String,
        /// `address:port`.
        endpoint: String,
        /// Its reason, as it sent it.
        reason: String,
    },
    /// Something else went wrong (timeout, not an agent, an unsigned answer).
    #[error("{node} ({endpoint}): {reason}")]
    Failed {
        /// The node's label.
        node: String,
        /// `address:port`.
        endpoint: String,
        /// Why.
        reason: String,
    },
}

/// Sends `request` to `target`, signed with `secret`; waits at most `timeout` in all.
///
/// # Errors
/// [`RemoteRequestError`], one line naming the node and why.
pub async fn send(
    target: &Target,
    secret: &[u8],
    request: &AdminRequest,
    timeout: Duration,
) -> Result<AdminResponse, RemoteRequestError> {
    let node = match &target.name {
        Some(name) => name.clone(),
        None => target.host.clone(),
    };
    let endpoint = target.host_port();
    let failed = |reason: String| RemoteRequestError::Failed {
        node: node.clone(),
        endpoint: endpoint.clone(),
        reason,
    };
    let exchange = async {
        let (status, body) = post(target, NONCE_PATH, &[]).await?;
        let server_nonce = match status {
            200 => admin_remote::decode_nonce_grant(&body)
                .map_err(|error| Exchange::Other(format!("bad nonce answer: {error}")))?,
            404 => {
                return Err(Exchange::Other(
                    "no remote administration there (not a safekit agent, or an older one)".into(),
                ));
            }
            status => return Err(status_error(status, &body)),
        };
        let client_nonce: Nonce = rand::random();
        let signed = admin_remote::sign_request(secret, &client_nonce, &server_nonce, request)
            .map_err(|error| Exchange::Other(format!("cannot sign the request: {error}")))?;
        let (status, body) = post(target, REQUEST_PATH, &signed).await?;
        if status != 200 {
            return Err(status_error(status, &body));
        }
        admin_remote::open_reply(secret, &client_nonce, &server_nonce, &body).map_err(|error| {
            Exchange::Other(match error {
                RemoteAdminError::BadMac => {
                    "its answer is not signed with the cluster secret of this node: ignored".into()
                }
                other => format!("unreadable answer: {other}"),
            })
        })
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(Exchange::Connect(reason))) => Err(RemoteRequestError::Unreachable {
            node,
            endpoint,
            reason,
        }),
        Ok(Err(Exchange::Refused(reason))) => Err(RemoteRequestError::Refused {
            node,
            endpoint,
            reason,
        }),
        Ok(Err(Exchange::Other(reason))) => Err(failed(reason)),
        Err(_) => Err(failed(format!("no answer within {} s", timeout.as_secs()))),
    }
}

/// How one HTTP exchange failed.
enum Exchange {
    Connect(String),
    Refused(String),
    Other(String),
}

fn status_error(status: u16, body: &[u8]) -> Exchange {
    let text = String::from_utf8_lossy(body)
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(300)
        .collect::<String>();
    match status {
        403 => Exchange::Refused(text),
        _ => Exchange::Other(format!("HTTP {status}: {text}")),
    }
}

/// One `POST` on its own connection; returns the status and the body.
async fn post(target: &Target, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), Exchange> {
    let mut stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((target.host.as_str(), target.port)),
    )
    .await
    .map_err(|_| {
        Exchange::Connect(format!(
            "no connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))
    })?
    .map_err(|error| Exchange::Connect(error.to_string()))?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        target.host_port(),
        body.len()
    );
    let io = |error: std::io::Error| Exchange::Other(format!("connection lost: {error}"));
    stream.write_all(head.as_bytes()).await.map_err(io)?;
    stream.write_all(body).await.map_err(io)?;
    let mut answer = Vec::new();
    let limit = u64::try_from(MAX_SIGNED_REPLY_LEN + 16 * 1024).unwrap_or(u64::MAX);
    (&mut stream)
        .take(limit + 1)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    if answer.len() as u64 > limit {
        return Err(Exchange::Other("answer too large".into()));
    }
    parse_http_answer(&answer).ok_or_else(|| Exchange::Other("not an HTTP answer".into()))
}

/// Status and body of a complete HTTP/1.x answer read until the connection closed.
fn parse_http_answer(answer: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = answer.windows(4).position(|window| window == b"\r\n\r\n")?;
    let head = std::str::from_utf8(answer.get(..end)?).ok()?;
    let body = answer.get(end + 4..)?;
    let mut lines = head.split("\r\n");
    let mut status_line = lines.next()?.split_whitespace();
    if !status_line.next()?.starts_with("HTTP/1.") {
        return None;
    }
    let status: u16 = status_line.next()?.parse().ok()?;
    let length = lines.find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let body = match length {
        Some(length) => body.get(..length)?,
        None => body,
    };
    Some((status, body.to_vec()))
}

/// The node the `safekit` command currently sends to, and the secret to sign with.
#[derive(Clone)]
pub struct ClientContext {
    /// The node.
    pub target: Target,
    /// This machine's cluster secret.
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ClientContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The secret is never printed.
        f.debug_struct("ClientContext")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

thread_local! {
    static CURRENT: RefCell<Option<ClientContext>> = const { RefCell::new(None) };
}

/// Runs `f` with every admin request of the `safekit` command going to `context`'s node.
pub fn with_target<R>(context: ClientContext, f: impl FnOnce() -> R) -> R {
    CURRENT.with(|current| *current.borrow_mut() = Some(context));
    let result = f();
    CURRENT.with(|current| *current.borrow_mut() = None);
    result
}

/// The node requests go to, when inside [`with_target`].
pub fn current_target() -> Option<ClientContext> {
    CURRENT.with(|current| current.borrow().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safekit_protocol::admin_remote::{decode_nonce_grant, open_reply, sign_request};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn ping() -> AdminRequest {
        AdminRequest::Ping
    }

    fn signed(server: &RemoteAdmin, now: Instant, secret: &[u8]) -> (Vec<u8>, Nonce, Nonce) {
        let server_nonce = decode_nonce_grant(&server.grant(now)).expect("grant decodes");
        let client_nonce: Nonce = [4; 32];
        let bytes =
            sign_request(secret, &client_nonce, &server_nonce, &ping()).expect("request signs");
        (bytes, client_nonce, server_nonce)
    }

    #[test]
    fn a_signed_request_is_accepted_once() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let now = Instant::now();
        let (bytes, _, _) = signed(&server, now, SECRET);
        let accepted = server.authenticate(now, &bytes).expect("accepted");
        assert_eq!(accepted.request, ping());
        // The same bytes again: a replay.
        assert!(matches!(
            server.authenticate(now, &bytes),
            Err(RefusalError::Nonce(NonceError::Unknown))
        ));
        assert_eq!(server.nonces().pending(), 0);
    }

    #[test]
    fn an_expired_nonce_is_refused() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let granted = Instant::now();
        let (bytes, _, _) = signed(&server, granted, SECRET);
        let later = granted + NONCE_LIFETIME + Duration::from_secs(1);
        assert!(matches!(
            server.authenticate(later, &bytes),
            Err(RefusalError::Nonce(NonceError::Expired))
        ));
    }

    #[test]
    fn a_wrong_secret_uses_up_the_nonce_and_is_refused() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let now = Instant::now();
        let (bytes, _, _) = signed(&server, now, b"not the secret of this cluster!!");
        assert!(matches!(
            server.authenticate(now, &bytes),
            Err(RefusalError::Auth(RemoteAdminError::BadMac))
        ));
        assert_eq!(server.nonces().pending(), 0);
    }

    #[test]
    fn a_nonce_the_server_never_granted_is_refused() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let bytes = sign_request(SECRET, &[1; 32], &[2; 32], &ping()).expect("signs");
        assert!(matches!(
            server.authenticate(Instant::now(), &bytes),
            Err(RefusalError::Nonce(NonceError::Unknown))
        ));
    }

    #[test]
    fn garbled_and_truncated_frames_are_refused_without_using_a_nonce() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let now = Instant::now();
        let (bytes, _, _) = signed(&server, now, SECRET);
        for len in [0, 1, 10, bytes.len() - 1] {
            assert!(matches!(
                server.authenticate(now, &bytes[..len]),
                Err(RefusalError::Frame(_))
            ));
        }
        assert!(matches!(
            server.authenticate(now, b"GET / HTTP/1.1\r\n\r\n"),
            Err(RefusalError::Frame(_))
        ));
        // The genuine request still works: garbage did not consume its nonce.
        assert!(server.authenticate(now, &bytes).is_ok());
    }

    #[test]
    fn debug_output_never_shows_the_secret() {
        let secret = "s3cr3t-cluster-key-that-must-not-leak";
        let server = RemoteAdmin::new(secret.as_bytes().to_vec());
        let context = ClientContext {
            target: Target {
                name: Some("node2".into()),
                host: "10.0.0.2".into(),
                port: 9010,
                explicit_port: false,
            },
            secret: secret.as_bytes().to_vec(),
        };
        // Debug of a Vec<u8> prints its bytes as numbers: look for those too.
        let as_numbers = format!("{:?}", secret.as_bytes());
        let as_numbers = as_numbers.trim_matches(['[', ']']);
        for shown in [
            format!("{server:?}"),
            format!("{server:#?}"),
            format!("{context:?}"),
            format!("{context:#?}"),
        ] {
            assert!(!shown.contains(secret), "{shown}");
            assert!(!shown.contains(as_numbers), "{shown}");
            assert!(!shown.contains("secret"), "{shown}");
        }
        assert!(format!("{context:?}").contains("10.0.0.2"));
    }

    #[test]
    fn the_nonce_table_is_bounded() {
        let mut table = NonceTable::default();
        let now = Instant::now();
        for index in 0..MAX_PENDING_NONCES + 10 {
            let mut nonce = [0u8; 32];
            nonce[..8].copy_from_slice(&(index as u64).to_le_bytes());
            table.grant(now, nonce);
        }
        assert_eq!(table.pending(), MAX_PENDING_NONCES);
        assert_eq!(table.consume(now, &[0; 32]), Err(NonceError::Unknown));
    }

    #[tokio::test]
    async fn routes_answer_signed_replies_and_refuse_the_rest() {
        let server = RemoteAdmin::new(SECRET.to_vec());
        let registry = Registry::default();
        let client: IpAddr = "10.0.0.1".parse().expect("ip");
        let grant = server.handle(&registry, client, NONCE_PATH, &[]).await;
        assert_eq!(grant.status, 200);
        let server_nonce = decode_nonce_grant(&grant.body).expect("grant");
        let client_nonce = [5; 32];
        let request = sign_request(
            SECRET,
            &client_nonce,
            &server_nonce,
            &AdminRequest::State {
                module: None,
                verbose: false,
            },
        )
        .expect("signs");
        let answer = server
            .handle(&registry, client, REQUEST_PATH, &request)
            .await;
        assert_eq!(answer.status, 200);
        let response =
            open_reply(SECRET, &client_nonce, &server_nonce, &answer.body).expect("signed reply");
        assert_eq!(response, AdminResponse::States(Vec::new()));
        let replay = server
            .handle(&registry, client, REQUEST_PATH, &request)
            .await;
        assert_eq!(replay.status, 403);
        assert!(String::from_utf8_lossy(&replay.body).contains("already used"));
        let garbage = server
            .handle(&registry, client, REQUEST_PATH, b"\xff\x00garbage")
            .await;
        assert_eq!(garbage.status, 400);
        let elsewhere = server
            .handle(&registry, client, "/safekit/admin/x", &[])
            .await;
        assert_eq!(elsewhere.status, 404);
    }

    #[tokio::test]
    async fn scripts_messages_are_refused_remotely() {
        let response = execute(
            &Registry::default(),
            "10.0.0.1".parse().expect("ip"),
            AdminRequest::Print {
                module: "m".into(),
                level: safekit_protocol::admin::PrintLevel::Error,
                message: "x".into(),
            },
        )
        .await;
        assert!(matches!(response, AdminResponse::Refused { .. }));
    }

    fn cluster(xml: &str) -> ClusterConfig {
        safekit_core::config::parse_cluster("cluster.xml", xml).expect("cluster.xml parses")
    }

    #[test]
    fn targets_from_names_addresses_and_star() {
        let cluster = cluster(
            "<cluster><lans>\
             <lan name=\"prod\"><node name=\"node1\" addr=\"10.0.0.1\"/><node name=\"node2\" addr=\"10.0.0.2\"/></lan>\
             <lan name=\"admin\" command=\"on\"><node name=\"node1\" addr=\"10.1.0.1\"/><node name=\"node2\" addr=\"10.1.0.2\"/></lan>\
             </lans></cluster>",
        );
        let all = parse_targets("*", Some(&cluster), 9010).expect("parses");
        let labels: Vec<String> = all.iter().map(Target::label).collect();
        assert_eq!(labels, ["node1 (10.1.0.1)", "node2 (10.1.0.2)"]);
        let some = parse_targets(
            "node2, 10.0.0.1:9011,http://[fe80::1]:9012/,10.9.9.9",
            Some(&cluster),
            9010,
        )
        .expect("parses");
        let labels: Vec<String> = some.iter().map(Target::label).collect();
        assert_eq!(
            labels,
            [
                "node2 (10.1.0.2)",
                "node1 (10.0.0.1:9011)",
                "[fe80::1]:9012",
                "10.9.9.9"
            ]
        );
        assert_eq!(some[2].host, "fe80::1");
        assert!(parse_targets("*", None, 9010).is_err());
        assert!(parse_targets("", Some(&cluster), 9010).is_err());
        assert!(parse_targets("node1:x", Some(&cluster), 9010).is_err());
        assert!(parse_targets("[https:9453],node1", Some(&cluster), 9010).is_err());
        assert_eq!(
            parse_targets("node1,node1", Some(&cluster), 9010)
                .expect("parses")
                .len(),
            1
        );
    }

    #[test]
    fn http_answers_are_parsed_with_bounds() {
        assert_eq!(
            parse_http_answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 3\r\n\r\nnoXYZ"),
            Some((403, b"noX".to_vec()))
        );
        assert_eq!(
            parse_http_answer(b"HTTP/1.1 200 OK\r\n\r\nbody"),
            Some((200, b"body".to_vec()))
        );
        assert_eq!(
            parse_http_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort"),
            None
        );
        assert_eq!(parse_http_answer(b"garbage"), None);
    }
}
