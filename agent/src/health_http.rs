//! The cloud health check: `GET /var/modules/<module>/ready.txt` over HTTP, for load balancers.
//!
//! In clouds and routed sites there is no virtual IP; a load balancer probes
//! every node and sends traffic to the one that answers 200. This listener
//! answers 200 when the module runs its application here (PRIM or ALONE, UP
//! for a farm module) and 404 otherwise, including for unknown modules and
//! paths. It reads the status each module's runner already publishes, so it
//! never waits on a runner.
//!
//! Configuration, as SafeKit's web server: `SAFE/web/conf/httpd.conf` lines
//! `Define httpport <port>` (default 9010) and, our extension, `Define
//! httpaddr <address>` (repeatable; `0.0.0.0` only if written there). Without
//! `httpaddr` the listener binds this node's addresses from cluster.xml, never
//! the wildcard address.
//!
//! The same listener carries `safekit -H`, the distributed admin channel
//! (`POST /safekit/admin/...`, see [`crate::remote_admin`]): requests signed
//! with the cluster secret, as SafeKit sends its distributed commands through
//! its web service.
//!
//! Anyone on the network can connect, so the listener bounds what a client
//! can hold: at most 64 connections at once (more are closed at once,
//! logged at most every 10 s) and one deadline, 10 s after connecting, for
//! the whole request (head and body).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::daemon::heartbeat::RateLimit;
use crate::daemon::runner::Registry;
use crate::remote_admin::{self, RemoteAdmin};

/// The default port (SafeKit's HTTP port).
pub const DEFAULT_PORT: u16 = 9010;
/// A request larger than this is refused.
const MAX_REQUEST: usize = 8192;
/// How often binding is retried when an address is not there yet.
const BIND_RETRY: Duration = Duration::from_secs(5);
/// How many connections are served at once; beyond, new ones are closed at once.
const MAX_CONNECTIONS: usize = 64;
/// A client must have sent its whole request (head and body) this long after connecting.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// A client that does not take the answer for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the listener binds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// The port.
    pub port: u16,
    /// The addresses.
    pub addrs: Vec<IpAddr>,
}

/// Reads `httpd.conf` (`Define httpport`, `Define httpaddr`); `node_addrs` when no `httpaddr`.
pub fn config(httpd_conf: &Path, node_addrs: &[IpAddr]) -> Result<HealthConfig, String> {
    let text = match std::fs::read_to_string(httpd_conf) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(format!("{}: {error}", httpd_conf.display())),
    };
    parse_config(&text, node_addrs).map_err(|error| format!("{}: {error}", httpd_conf.display()))
}

fn parse_config(text: &str, node_addrs: &[IpAddr]) -> Result<HealthConfig, String> {
    let mut port = DEFAULT_PORT;
    let mut addrs = Vec::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Define", "httpport", value] => {
                port = value
                    .parse()
                    .map_err(|_| format!("httpport {value} is not a port"))?;
            }
            ["Define", "httpaddr", value] => addrs.push(
                value
                    .parse()
                    .map_err(|_| format!("httpaddr {value} is not an address"))?,
            ),
            _ => {}
        }
    }
    if addrs.is_empty() {
        addrs = node_addrs.to_vec();
    }
    addrs.sort();
    addrs.dedup();
    Ok(HealthConfig { port, addrs })
}

/// What bounds the listener's use of memory: connections at once, time to send a request.
#[derive(Debug, Clone, Copy)]
struct Limits {
    connections: usize,
    deadline: Duration,
}

const LIMITS: Limits = Limits {
    connections: MAX_CONNECTIONS,
    deadline: REQUEST_DEADLINE,
};

/// Binds every configured address and serves until the runtime ends;
/// `remote` serves `safekit -H` (without it, its routes answer 503).
///
/// # Errors
/// An address cannot be bound (the others are not served either).
pub async fn serve(
    config: &HealthConfig,
    registry: Arc<Registry>,
    remote: Option<Arc<RemoteAdmin>>,
) -> std::io::Result<()> {
    let mut listeners = Vec::new();
    for addr in &config.addrs {
        let listener = TcpListener::bind(SocketAddr::new(*addr, config.port)).await?;
        listeners.push(listener);
    }
    serve_listeners(listeners, registry, remote, LIMITS);
    Ok(())
}

/// Serves bound `listeners`; at most `limits.connections` connections at once, over all of them.
fn serve_listeners(
    listeners: Vec<TcpListener>,
    registry: Arc<Registry>,
    remote: Option<Arc<RemoteAdmin>>,
    limits: Limits,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    for listener in listeners {
        let registry = Arc::clone(&registry);
        let remote = remote.clone();
        let slots = Arc::clone(&slots);
        tokio::spawn(async move {
            let mut warn = RateLimit::default();
            loop {
                match listener.accept().await {
                    Ok((stream, client)) => {
                        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                            // Closed at once: a flood of connections cannot hold memory.
                            drop(stream);
                            if let Some(suppressed) = warn.allow() {
                                tracing::warn!(
                                    %client,
                                    limit = limits.connections,
                                    suppressed,
                                    "web service (9010): too many connections, connection closed"
                                );
                            }
                            continue;
                        };
                        let registry = Arc::clone(&registry);
                        let remote = remote.clone();
                        tokio::spawn(async move {
                            let deadline = Instant::now() + limits.deadline;
                            if let Err(error) =
                                answer(stream, client, &registry, remote.as_deref(), deadline).await
                            {
                                tracing::debug!(%error, "health check connection");
                            }
                            drop(permit);
                        });
                    }
                    Err(error) => {
                        tracing::warn!(%error, "health check listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
    }
}

/// Starts the listener for the daemon of `node`: reads `SAFE/web/conf/httpd.conf`
/// and the node's addresses in cluster.xml. Problems are logged; the agent runs on without it.
pub async fn start_for_node(safe: &Path, var: &Path, node: &str, registry: Arc<Registry>) {
    let paths = crate::daemon::load::NodePaths {
        safe: safe.to_path_buf(),
        var: var.to_path_buf(),
    };
    let node_addrs: Vec<IpAddr> = match crate::daemon::load::load_cluster(&paths) {
        Ok(cluster) => cluster
            .lans
            .lan
            .iter()
            .flat_map(|lan| lan.node.iter())
            .filter(|entry| entry.name == node)
            .filter_map(|entry| {
                entry
                    .addr
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            })
            .collect(),
        Err(error) => {
            tracing::error!(%error, "health check not started");
            return;
        }
    };
    // The daemon read the same secret at start; a problem with it stopped the daemon then.
    let remote = match crate::daemon::load::load_secret(&paths) {
        Ok(secret) => Some(Arc::new(RemoteAdmin::new(secret))),
        Err(error) => {
            tracing::error!(%error, "remote admin (safekit -H) not served");
            None
        }
    };
    let httpd_conf = safe.join("web").join("conf").join("httpd.conf");
    let config = match config(&httpd_conf, &node_addrs) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "health check not started");
            return;
        }
    };
    if let Err(error) = serve(&config, Arc::clone(&registry), remote.clone()).await {
        // An address may not be up yet at boot: retry in the background.
        tracing::error!(%error, port = config.port, "health check: cannot bind yet, retrying every 5 s");
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(BIND_RETRY).await;
                if serve(&config, Arc::clone(&registry), remote.clone())
                    .await
                    .is_ok()
                {
                    tracing::info!(port = config.port, addrs = ?config.addrs, "web service (ready.txt, safekit -H) listening");
                    return;
                }
            }
        });
        return;
    }
    tracing::info!(port = config.port, addrs = ?config.addrs, "web service (ready.txt, safekit -H) listening");
}

async fn answer(
    mut stream: TcpStream,
    client: SocketAddr,
    registry: &Registry,
    remote: Option<&RemoteAdmin>,
    deadline: Instant,
) -> std::io::Result<()> {
    let mut request = Vec::new();
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = read_some(&mut stream, &mut buffer, deadline).await?;
        if read == 0 {
            break;
        }
        request.extend_from_slice(buffer.get(..read).unwrap_or_default());
        if request.len() > MAX_REQUEST {
            break;
        }
    }
    let line = request
        .split(|byte| *byte == b'\n')
        .next()
        .map(|line| String::from_utf8_lossy(line).trim_end().to_string())
        .unwrap_or_default();
    let mut words = line.split_whitespace();
    if let (Some(method), Some(path)) = (words.next(), words.next())
        && path.starts_with(remote_admin::ROUTE_PREFIX)
    {
        let answer = admin_route(
            &mut stream,
            client,
            registry,
            remote,
            (method, path),
            request,
            deadline,
        )
        .await?;
        let head = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
            answer.status,
            reason(answer.status),
            answer.content_type,
            answer.body.len()
        );
        let write = async {
            stream.write_all(head.as_bytes()).await?;
            stream.write_all(&answer.body).await?;
            stream.shutdown().await
        };
        return tokio::time::timeout(WRITE_TIMEOUT, write)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?;
    }
    let (status, body, head) = respond(&line, |module| {
        registry
            .modules
            .get(module)
            .map(|handle| handle.status.borrow().state.clone())
    });
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    if !head {
        response.push_str(&body);
    }
    let write = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// One read, given up at `deadline` (one deadline for the whole request, not per read).
async fn read_some(
    stream: &mut TcpStream,
    buffer: &mut [u8],
    deadline: Instant,
) -> std::io::Result<usize> {
    tokio::time::timeout_at(deadline, stream.read(buffer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Bad Request",
    }
}

/// `POST /safekit/admin/...`: reads the body (`Content-Length`, bounded) and
/// hands it to [`RemoteAdmin::handle`]. `received` is what was read so far,
/// the head and maybe part of the body.
async fn admin_route(
    stream: &mut TcpStream,
    client: SocketAddr,
    registry: &Registry,
    remote: Option<&RemoteAdmin>,
    (method, path): (&str, &str),
    received: Vec<u8>,
    deadline: Instant,
) -> std::io::Result<remote_admin::HttpAnswer> {
    let text = |status: u16, message: &str| remote_admin::HttpAnswer {
        status,
        content_type: "text/plain",
        body: format!("{message}\n").into_bytes(),
    };
    let Some(remote) = remote else {
        return Ok(text(
            503,
            "remote administration is not available on this node",
        ));
    };
    if method != "POST" {
        return Ok(text(405, "only POST"));
    }
    let Some(head_end) = received.windows(4).position(|window| window == b"\r\n\r\n") else {
        return Ok(text(400, "request head too large or incomplete"));
    };
    let head = String::from_utf8_lossy(received.get(..head_end).unwrap_or_default());
    let length = head.lines().skip(1).find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())?
    });
    let Some(length) = length else {
        return Ok(text(411, "Content-Length required"));
    };
    if length > safekit_protocol::admin_remote::MAX_SIGNED_REQUEST_LEN {
        return Ok(text(413, "request too large"));
    }
    let mut body = received.get(head_end + 4..).unwrap_or_default().to_vec();
    let mut buffer = [0u8; 4096];
    while body.len() < length {
        let read = read_some(stream, &mut buffer, deadline).await?;
        if read == 0 {
            return Ok(text(400, "request body shorter than its Content-Length"));
        }
        body.extend_from_slice(buffer.get(..read).unwrap_or_default());
    }
    body.truncate(length);
    Ok(remote.handle(registry, client.ip(), path, &body).await)
}

/// The answer to a request line: status, body, and whether it was `HEAD` (no body).
fn respond(line: &str, state_of: impl Fn(&str) -> Option<String>) -> (u16, String, bool) {
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        return (400, "bad request\n".into(), false);
    };
    if !version.starts_with("HTTP/1.") {
        return (400, "bad request\n".into(), false);
    }
    let head = method == "HEAD";
    if method != "GET" && !head {
        return (405, "only GET and HEAD\n".into(), head);
    }
    let path = target.split(['?', '#']).next().unwrap_or("");
    let module = path
        .strip_prefix("/var/modules/")
        .and_then(|rest| rest.strip_suffix("/ready.txt"))
        .filter(|module| !module.is_empty() && !module.contains('/'));
    let Some(module) = module else {
        return (404, "not found\n".into(), head);
    };
    match state_of(module) {
        Some(state) if matches!(state.as_str(), "PRIM" | "ALONE" | "UP") => {
            (200, format!("{state}\n"), head)
        }
        Some(state) => (404, format!("{state}\n"), head),
        None => (404, "no such module\n".into(), head),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(module: &str) -> Option<String> {
        match module {
            "prim" => Some("PRIM".into()),
            "alone" => Some("ALONE".into()),
            "farm" => Some("UP".into()),
            "second" => Some("SECOND".into()),
            "wait" => Some("WAIT".into()),
            _ => None,
        }
    }

    #[test]
    fn ready_only_where_the_application_runs() {
        for (module, status) in [
            ("prim", 200),
            ("alone", 200),
            ("farm", 200),
            ("second", 404),
            ("wait", 404),
            ("unknown", 404),
        ] {
            let line = format!("GET /var/modules/{module}/ready.txt HTTP/1.1");
            assert_eq!(respond(&line, states).0, status, "{module}");
        }
        assert_eq!(
            respond("GET /var/modules/prim/ready.txt?x=1 HTTP/1.0", states).0,
            200
        );
        assert_eq!(
            respond("GET /var/modules/prim/other HTTP/1.1", states).0,
            404
        );
        assert_eq!(
            respond("GET /var/modules/a/b/ready.txt HTTP/1.1", states).0,
            404
        );
        assert_eq!(
            respond("POST /var/modules/prim/ready.txt HTTP/1.1", states).0,
            405
        );
        assert_eq!(respond("garbage", states).0, 400);
        let (status, _, head) = respond("HEAD /var/modules/prim/ready.txt HTTP/1.1", states);
        assert_eq!((status, head), (200, true));
    }

    /// A listener on loopback with `limits`; its address.
    async fn listen(limits: Limits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        serve_listeners(vec![listener], Arc::new(Registry::default()), None, limits);
        addr
    }

    /// Sends a ready.txt request; the answer, empty when the connection was closed without one.
    async fn ask_ready(addr: SocketAddr) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // The server may close first (connection refused by the cap): errors mean no answer.
        let _ = stream
            .write_all(b"GET /var/modules/m/ready.txt HTTP/1.1\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_at_the_deadline() {
        let addr = listen(Limits {
            connections: 4,
            deadline: Duration::from_millis(500),
        })
        .await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        // One byte per 100 ms, each read resetting no timer: a request that
        // would take 100 s to arrive is cut off at the deadline.
        let request = format!(
            "GET /var/modules/m/ready.txt?{} HTTP/1.1\r\n\r\n",
            "x".repeat(1000)
        );
        let mut sent = 0;
        let mut closed = false;
        for byte in request.as_bytes() {
            if stream.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            sent += 1;
            let mut probe = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut probe)).await {
                Err(_) => {} // Nothing from the server yet: go on.
                Ok(Ok(0) | Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => panic!("the server answered an incomplete request"),
            }
        }
        assert!(
            closed,
            "the server kept the connection for the whole request"
        );
        assert!(sent < request.len(), "sent {sent} of {}", request.len());
        // The listener still serves.
        assert!(ask_ready(addr).await.starts_with("HTTP/1.1 404"));
    }

    #[tokio::test]
    async fn connections_past_the_cap_are_closed_until_slots_free() {
        let addr = listen(Limits {
            connections: 2,
            deadline: Duration::from_secs(600),
        })
        .await;
        // Two idle clients take both slots.
        let idle = [
            TcpStream::connect(addr).await.expect("connect"),
            TcpStream::connect(addr).await.expect("connect"),
        ];
        let refused = ask_ready(addr).await;
        assert_eq!(refused, "", "a connection past the cap was served");
        drop(idle);
        // Once the idle clients are gone their slots come back (the server
        // notices the close on its own schedule: ask until it answers).
        let mut answer = String::new();
        for _ in 0..100 {
            answer = ask_ready(addr).await;
            if !answer.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer:?}");
    }

    #[test]
    fn binds_node_addresses_unless_configured() {
        let node: Vec<IpAddr> = vec!["10.0.0.1".parse().expect("ip")];
        assert_eq!(
            parse_config("", &node).expect("config"),
            HealthConfig {
                port: 9010,
                addrs: node.clone()
            }
        );
        let config = parse_config(
            "# web\nDefine httpport 9011\nDefine httpaddr 0.0.0.0\n",
            &node,
        )
        .expect("config");
        assert_eq!(config.port, 9011);
        assert_eq!(config.addrs, vec![IpAddr::from([0, 0, 0, 0])]);
        assert!(parse_config("Define httpport big", &node).is_err());
    }
}
