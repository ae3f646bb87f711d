//! The multi-node test harness: nodes as network + mount namespaces on one machine.
//!
//! Every scenario test builds a [`Cluster`]: N nodes (and optionally a client),
//! each one a Linux network namespace with its own mount, UTS (hostname) and
//! PID namespaces, wired by veth pairs to one bridge per LAN. The test then runs commands in
//! the nodes, injects faults and checks what a user would check.
//!
//! ```no_run
//! use safekit_tests::{Cluster, require_root};
//!
//! if !require_root() {
//!     return;
//! }
//! let cluster = Cluster::builder()
//!     .nodes(2)
//!     .client(true)
//!     .private_dir("/replicated/data")
//!     .build()
//!     .expect("build the cluster");
//! let node1 = cluster.node(1);
//! let node2 = cluster.node(2);
//! node1
//!     .run_ok(format!("ping -c1 -W1 {}", node2.addr(0)))
//!     .expect("node1 reaches node2");
//! cluster.partition(node1, node2).expect("cut node1 <-> node2");
//! // ... the cluster is torn down (processes, namespaces, directories) when dropped.
//! ```
//!
//! # Topology
//!
//! All names start with the cluster's id, `skt-<pid>-<counter>-<random>`, so
//! clusters of tests running in parallel (threads of one test binary, or
//! several binaries) never collide, and [`leftovers`] can prove that nothing
//! of a cluster survived it.
//!
//! - One "switch" network namespace (`<id>-switch`) holds a bridge per LAN
//!   (`br0`, `br1`). Nothing is created in the host's network namespace: each
//!   veth pair is created directly with one end in a node and the other end in
//!   the switch (`ip link add eth0 netns A type veth peer name n1l0 netns SW`),
//!   so interface names are short and fixed (`eth0`, `eth1` in a node;
//!   `n<k>l<lan>`, `cl0` in the switch) and can never clash with the host.
//! - Node `k` (1-based) is `<id>-node<k>`, has hostname `node<k>`, and address
//!   `10.X.(Y+lan).k/24` on `eth<lan>` for every LAN. The client is
//!   `<id>-client`, hostname `client`, `10.X.Y.100/24` on `eth0` (first LAN
//!   only). `X.Y` is random per cluster; since every address lives only in this
//!   cluster's namespaces, two clusters may even share a subnet without
//!   interfering. [`Cluster::spare_addr`] gives free addresses (for VIPs).
//!
//! # Mount, UTS and PID namespaces: the anchor process
//!
//! A network namespace can be named and kept alive by `ip netns add`; mount,
//! UTS and PID namespaces cannot. Each node therefore has an *anchor*:
//! `ip netns exec <netns> unshare --mount --uts --pid --fork --kill-child
//! --mount-proc --propagation slave -- perl -e '$SIG{CHLD}="IGNORE"; ...'`.
//! `ip netns exec` gives it a `/sys` that shows the node's own interfaces (so
//! `/sys/class/net/eth0/carrier` reads the node's link state); `unshare` gives
//! it a mount namespace, a hostname and a PID namespace of its own, with its
//! own `/proc`. The perl loop is pid 1 of the node; it ignores SIGCHLD, so the
//! kernel reaps the orphans it adopts. Every command later runs as
//! `nsenter --target <node's pid 1> --mount --uts --net --pid -- sh -c <command>`.
//!
//! The PID namespace makes a node behave like a machine of its own: `ps`,
//! `pgrep`, `pkill`, `killall` inside a node (in a stop script, say) see only
//! that node's processes, and killing the anchor kills the whole node at once.
//! The test itself sees host pids ([`NodeProcess::pid`] is the host pid of
//! the `nsenter` that waits for the command).
//!
//! Propagation is `slave`, not `private`: mounts made inside a node (our bind
//! mounts, the agent's FUSE mount) stay inside it, while unmounts done on the
//! host still propagate in. That matters because each node's mount namespace
//! starts as a copy of the host's, including the `/run/netns/*` handles of
//! other clusters: with `private` those copies would keep the other clusters'
//! namespaces alive after they are deleted.
//!
//! Each directory passed to [`ClusterBuilder::private_dir`] (for example
//! `/replicated/data`) is bind-mounted, inside each node, from that node's own
//! backing directory (see [`Node::host_path`]), so the same path holds
//! different files in each node. The mount point must exist on the host: if it
//! does not, the harness creates it (an empty directory, never removed,
//! because another cluster may be using it at the same moment). Nothing is
//! ever written to it on the host.
//!
//! # File systems
//!
//! Apart from the private directories, the nodes share the host's files: a
//! host path such as [`Node::state_dir`] is the same path inside the node (so
//! pass it to the agent as it is), and `/tmp`, `/var`, `/run` are common to
//! all nodes. Anything a program writes at a fixed path must therefore be a
//! private directory (or be given a per-node path), or the nodes will clash.
//!
//! # Processes
//!
//! [`Node::run`] runs a short shell command and returns its output (bounded by
//! a timeout). [`Node::spawn`] starts a long-running one, its stdout and stderr
//! going to a file in the node's log directory. Each command is the leader of
//! its own process group: [`NodeProcess::kill`] (`kill -9`) reaches its
//! children too, and [`NodeProcess::terminate`] (SIGTERM) lets it stop cleanly
//! and reports its own exit status. [`Node::kill_all`] kills with SIGKILL every
//! process in the node except its pid 1; [`Node::crash`] also pulls every
//! cable (a power cut: a virtual IP the node held stops answering);
//! [`Node::reboot`] brings a node back fresh: new mount, UTS and PID
//! namespaces (a FUSE mount left by a killed agent is gone, the files of the
//! private directories are kept), only the harness's addresses, links up.
//! Every process the harness starts carries the environment variable
//! `SAFEKIT_HARNESS_CLUSTER=<id>`, which is how [`leftovers`] finds survivors.
//!
//! # Faults
//!
//! Link down/up sets the switch-side end of a node's veth down/up: the node
//! sees NO-CARRIER, as with a pulled cable. Partitions are nftables rules in a
//! `bridge` family table of the switch namespace, matching ingress and egress
//! bridge ports, so they catch every frame (including traffic to or from a
//! virtual IP) and need nothing inside the nodes. A one-way partition from A
//! to B drops every frame from A's ports to B's ports except ARP, so that B's
//! packets still reach A (A can still answer B's ARP requests).
//! [`Node::limit_rate`] makes a slow link (`tc` `tbf` on both ends of the
//! veth; `netem` is not available here). [`ClusterBuilder::private_dir_sized`]
//! puts a private directory on a small tmpfs per node, to fill the disk.
//!
//! # Failure output and cleanup
//!
//! Each cluster's files live in `$TMPDIR/<id>/` (`node1/{state,config,log,root}`,
//! `harness.log`). When a [`Cluster`] is dropped while the thread panics (a
//! failed assertion), it prints every node's log files and the harness's own
//! log of every command it ran to stderr, which the test runner shows with
//! the failure. Set `SAFEKIT_TEST_LOGS=always` to print them on success too.
//! A test that returns `Err` instead of panicking gets no logs: prefer
//! `expect` and `assert!` in scenario tests, or print [`Cluster::logs`].
//!
//! On success, failure and panic alike, dropping the cluster kills every
//! process of the cluster, deletes its namespaces (which deletes veths,
//! bridges and the nodes' mounts) and removes its directory; a build that
//! fails half-way does the same. Namespaces left by a test binary that was
//! killed outright (its pid is dead) are removed by the next build.
//!
//! # SafeKit agents
//!
//! [`agents`] installs a module on every node (`cluster.xml` from the
//! topology, the secret, `userconfig.xml`, scripts), starts `safekitd
//! --foreground` in a node and runs `safekit` inside it as an operator would
//! (`state -lq` exit codes, `state -v`, the module log, tree digests), so that
//! the agent's scenario tests only say what their module and checks differ in.
//!
//! # Needed on the machine
//!
//! Root, and the Debian packages `iproute2` (`ip`, `tc`), `util-linux`
//! (`nsenter`, `unshare`), `mount`, `nftables` (`nft`), `iputils-ping` and
//! `procps` (`ping`, `pgrep`: used by the tests). [`require_root`] checks them.

pub mod agents;
mod cluster;
mod error;
mod node;
mod sys;
mod wait;

pub use cluster::{Cluster, ClusterBuilder, leftovers};
pub use error::HarnessError;
pub use nix::sys::signal::Signal;
pub use node::{Node, NodeProcess, Output};
pub use sys::{require_root, workspace_bin};
pub use wait::{DEFAULT_RUN_TIMEOUT, wait_until, with_timeout};

/// Result of the harness's operations.
pub type Result<T, E = HarnessError> = std::result::Result<T, E>;
