//! One node's life in three steps, as linkerd2-proxy's main does it:
//!
//! 1. [`Node::build`] opens the replica (its internal listener and cluster duties start with
//!    it) and binds the admin API and SIP listeners, so a port already in use stops
//!    start-up before the admin API or SIP serve anything;
//! 2. [`Node::spawn`] starts the location duties, the admin API, the SIP stack and the
//!    agents on it;
//! 3. [`RunningNode::stop`] shuts down in order: SIP first (503 for new requests, accept
//!    loops closed, a bounded wait for transactions that still owe a final response), then
//!    the admin API, then the cluster duties and the internal listener, then Raft; RocksDB
//!    closes last. A fast stop (SIGINT, or a second signal) skips the wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::agents::cdr::{self, store::CdrStore, CdrService, CdrStats};
use crate::agents::dispatcher::Dispatcher;
use crate::agents::drain::Drain;
use crate::agents::location::{self, keepalive, overlay::BindingOverlay};
use crate::agents::registration_agent::{self, Board, RegistrationAgent};
use crate::agents::{Agents, Stack};
use crate::cluster::peers::PeerMonitor;
use crate::cluster::ClusterNode;
use crate::config::{parse_network, Config, Role};
use crate::operator::admin;
use crate::stack::resolve::Resolver;
use crate::stack::shard::ShardThreads;
use crate::stack::stats::Stats;
use crate::stack::transaction::{ActiveTransactions, TimerSettings};
use crate::stack::transport::{FloodLimit, Limits, Listeners, OwnAddrs, TransportKind};
use crate::Error;

/// How a node is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// Drain first (SIGTERM).
    Graceful,
    /// Exit now (SIGINT, or a second signal during a graceful stop).
    Fast,
}

/// How long tasks get to notice cancellation before the process exits anyway.
const TASK_EXIT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs a node until SIGTERM or SIGINT.
pub async fn run_until_signal(config: Config) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let io = |source| Error::Io {
        context: "installing signal handlers".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let stop = tokio::select! {
                Some(()) = term.recv() => Stop::Graceful,
                Some(()) = int.recv() => Stop::Fast,
                else => break,
            };
            if tx.send(stop).await.is_err() {
                break;
            }
        }
    });
    run(config, rx).await
}

/// Runs a node until `stops` yields. A second value during a graceful stop makes it fast.
pub async fn run(config: Config, mut stops: mpsc::Receiver<Stop>) -> Result<(), Error> {
    let node = Node::build(config).await?;
    let running = node.spawn();
    let first = stops.recv().await.unwrap_or(Stop::Fast);
    running.stop(first, &mut stops).await;
    Ok(())
}

/// Tasks that stop together: a tracker and the token that cancels them.
#[derive(Default)]
struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// Cancels the tasks and waits, for a bounded time, until they end; `late` is the
    /// warning if they do not.
    async fn stop(&self, late: &str) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(TASK_EXIT_TIMEOUT, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("{late}");
        }
    }
}

/// A node built from its config: its replica running, its listeners bound, nothing served.
pub struct Node {
    config: Config,
    cluster: ClusterNode,
    /// The replica's own duties and internal listener, stopped last.
    cluster_tasks: Tasks,
    stats: Arc<Stats>,
    drain: Arc<Drain>,
    /// Binding writes held while this node has no quorum (node/DESIGN.md, "Degraded mode").
    overlay: Arc<BindingOverlay>,
    /// Which other nodes answer SIP: the proxy asks it, `/metrics` reports it.
    peers: Arc<PeerMonitor>,
    /// The registration agent's status of each provider account it registers.
    board: Arc<Board>,
    /// The admin API's server, bound, and the tasks it will run as.
    admin: Option<AdminServer>,
    admin_tasks: Tasks,
    /// Absent on a witness, which serves no SIP.
    sip: Option<BoundSip>,
    /// The CDR store, on a full node.
    cdrs: Option<(Arc<CdrStore>, Arc<CdrStats>)>,
    /// Filled with the app server when the SIP stack starts, for the admin API.
    app_server: admin::AppServerSlot,
}

type AdminServer = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The SIP listeners and threads of a full node, before the stack runs on them.
struct BoundSip {
    listeners: Listeners,
    threads: ShardThreads,
    tasks: Tasks,
    stop_accepting: CancellationToken,
}

impl Node {
    /// Opens the replica (a standalone node creates its one-member cluster on first start)
    /// and binds the admin API and, on a full node, the SIP listeners and threads.
    pub async fn build(config: Config) -> Result<Node, Error> {
        let cluster_tasks = Tasks::default();
        let cluster =
            ClusterNode::start(&config, &cluster_tasks.tracker, cluster_tasks.stop.clone()).await?;
        // From here on an error must still close the replica in order.
        match Node::bind(config, cluster.clone(), cluster_tasks).await {
            Ok(node) => Ok(node),
            Err((e, cluster_tasks)) => {
                cluster_tasks
                    .stop("some cluster tasks did not stop in time")
                    .await;
                cluster.shutdown().await;
                Err(e)
            }
        }
    }

    async fn bind(
        config: Config,
        cluster: ClusterNode,
        cluster_tasks: Tasks,
    ) -> Result<Node, (Error, Tasks)> {
        let stats = Arc::new(Stats::default());
        let drain = Arc::new(Drain::default());
        let overlay = match BindingOverlay::open(&config.node.data_dir) {
            Ok(overlay) => Arc::new(overlay),
            Err(e) => return Err((e, cluster_tasks)),
        };
        let peers = Arc::new(PeerMonitor::default());
        let board = Arc::new(Board::new(drain.flag()));
        let app_server = admin::AppServerSlot::default();
        let admin_tasks = Tasks::default();
        let bound = async {
            let cdrs = match config.node.role {
                Role::Full => Some((
                    Arc::new(CdrStore::open(
                        &config.node.data_dir.join("cdr"),
                        config.node.id,
                    )?),
                    Arc::new(CdrStats::default()),
                )),
                Role::Witness => None,
            };
            let token = admin::load_or_create_token(&config.token_path())?;
            let mut api = admin::Admin::new(
                cluster.clone(),
                stats.clone(),
                drain.clone(),
                overlay.clone(),
                peers.clone(),
                board.clone(),
                cdrs.clone(),
                config.cdr.retention_days,
                app_server.clone(),
                token,
            );
            api.metrics_need_token = config.admin.metrics_need_token;
            api.customer_provider_accounts = config.admin.customer_provider_accounts;
            let admin_tls = match (&config.admin.certificate, &config.admin.private_key) {
                (Some(cert), Some(key)) => {
                    Some(crate::stack::transport::load_tls_acceptor(cert, key)?)
                }
                _ => None,
            };
            let admin = admin::serve(
                api,
                config.admin.listen,
                admin_tls,
                admin_tasks.stop.clone().cancelled_owned(),
            )?;
            let sip = match config.node.role {
                Role::Full => {
                    let tasks = Tasks::default();
                    Some(BoundSip {
                        listeners: Listeners::bind(&config.sip).await?,
                        threads: ShardThreads::start(config.node.sip_thread_count(), &tasks.stop)?,
                        tasks,
                        stop_accepting: CancellationToken::new(),
                    })
                }
                Role::Witness => None,
            };
            Ok::<_, Error>((Box::pin(admin) as AdminServer, sip, cdrs))
        }
        .await;
        match bound {
            Ok((admin, sip, cdrs)) => Ok(Node {
                config,
                cluster,
                cluster_tasks,
                stats,
                drain,
                overlay,
                peers,
                board,
                admin: Some(admin),
                admin_tasks,
                sip,
                cdrs,
                app_server,
            }),
            Err(e) => Err((e, cluster_tasks)),
        }
    }

    /// Starts serving: the location duties (on every node, a witness can lead), the admin
    /// API, and on a full node the SIP stack with the agents on it.
    pub fn spawn(mut self) -> RunningNode {
        location::spawn_duties(
            &self.cluster.replica,
            &self.overlay,
            self.cluster.quorum_timeout(),
            &self.cluster_tasks.tracker,
            &self.cluster_tasks.stop,
        );
        registration_agent::spawn_assigner(
            self.cluster.clone(),
            registration_agent::Settings::from_config(&self.config.registration_agent),
            self.board.clone(),
            &self.cluster_tasks.tracker,
            self.cluster_tasks.stop.clone(),
        );
        if let Some(server) = self.admin.take() {
            self.admin_tasks.tracker.spawn(server);
        }
        let sip = match self.sip.take() {
            Some(bound) => Some(self.spawn_sip(bound)),
            None => {
                tracing::info!(
                    node = self.config.node.id,
                    admin = %self.config.admin.listen,
                    cluster = ?self.config.cluster.as_ref().map(|c| c.listen),
                    "tandem witness ready (no SIP listeners)"
                );
                None
            }
        };
        RunningNode { node: self, sip }
    }

    fn spawn_sip(&self, bound: BoundSip) -> RunningSip {
        let BoundSip {
            listeners,
            threads,
            tasks,
            stop_accepting,
        } = bound;
        let config = &self.config;
        let own = OwnAddrs {
            advertise: config.sip.advertise,
            ..listeners.addrs()
        };
        let limits = Limits {
            max_message_size: config.sip.max_message_size,
            max_connections: config.sip.max_connections,
            max_connections_per_address: config.sip.max_connections_per_address,
            idle_timeout: Duration::from_secs(config.sip.connection_idle_timeout_secs),
            write_timeout: Duration::from_secs(config.sip.connection_write_timeout_secs),
            refused_user_agents: config
                .sip
                .refused_user_agents
                .iter()
                .map(|a| a.to_ascii_lowercase())
                .collect(),
            flood: FloodLimit {
                rate: f64::from(config.sip.flood_requests_per_sec),
                burst: f64::from(config.sip.flood_burst),
                ban: Duration::from_secs(config.sip.flood_ban_secs),
                exempt: config
                    .sip
                    .flood_exempt
                    .iter()
                    .filter_map(|n| parse_network(n).ok())
                    .collect(),
            },
            max_transactions: config.sip.max_transactions,
        };
        let stack = crate::stack::start(
            listeners,
            limits,
            self.stats.clone(),
            TimerSettings::from_config(&config.sip),
            threads.handles(),
            &tasks.tracker,
            tasks.stop.clone(),
            stop_accepting.clone(),
        );
        let active = stack.layer.active();
        self.drain.watch_transactions(active.clone());
        tasks
            .tracker
            .spawn(threads.watch(self.stats.clone(), tasks.stop.clone()));

        let peers = self.peers.clone();
        if let Some(via) = own.udp.first().copied() {
            tasks.tracker.spawn(peers.clone().run(
                self.cluster.clone(),
                stack.transports.clone(),
                config.node.id,
                via,
                tasks.stop.clone(),
            ));
        }
        if config.registrar.nat_keepalive_secs > 0 {
            tasks.tracker.spawn(keepalive::run(
                self.cluster.clone(),
                self.overlay.clone(),
                stack.transports.clone(),
                self.stats.clone(),
                config.node.id,
                Duration::from_secs(config.registrar.nat_keepalive_secs),
                tasks.stop.clone(),
            ));
        }
        let mut outbound = Vec::new();
        if !own.udp.is_empty() {
            outbound.push(TransportKind::Udp);
        }
        if !own.tcp.is_empty() {
            outbound.push(TransportKind::Tcp);
        }
        // TLS connections this node opens need no TLS listener of its own.
        outbound.push(TransportKind::Tls);
        let resolver = Resolver::new(&config.sip.dns_servers, outbound);
        let registration = RegistrationAgent::new(
            config.node.id,
            self.cluster.clone(),
            stack.layer.clone(),
            stack.transports.clone(),
            own.clone(),
            resolver.clone(),
            registration_agent::Settings::from_config(&config.registration_agent),
            self.board.clone(),
        );
        tasks.tracker.spawn(registration.run(tasks.stop.clone()));
        let cdr = self.cdrs.as_ref().and_then(|(store, stats)| {
            CdrService::start(
                store.clone(),
                self.cluster.clone(),
                cdr::Settings::from_config(&config.cdr),
                stats.clone(),
            )
            .map_err(|e| tracing::error!(error = %e, "the CDR writer did not start; calls are not recorded"))
            .ok()
        });
        stack.transports.set_draining(self.drain.flag());
        let (agents, app_server, auth) = Agents::build(
            config,
            &self.cluster,
            &self.overlay,
            &peers,
            &stack.layer,
            &stack.transports,
            own,
            &self.stats,
            &self.board,
            &resolver,
            cdr.as_ref().map(CdrService::recorder),
        );
        let _ = self.app_server.set(app_server);
        tasks
            .tracker
            .spawn(auth.clone().agree_on_nonce_keys(tasks.stop.clone()));
        tasks
            .tracker
            .spawn(auth.keep_logins_open(tasks.stop.clone()));
        self.drain.watch_calls(
            agents.dialogs.clone(),
            Duration::from_secs(config.sip.drain_call_wait_secs),
        );
        let dispatcher = Dispatcher {
            stack: Stack {
                layer: stack.layer,
                transports: stack.transports,
                stats: self.stats.clone(),
            },
            draining: self.drain.flag(),
            retry_after_secs: config.sip.retry_after_secs,
            agents,
            peers,
        };
        for (events, runtime) in stack.core_events.into_iter().zip(threads.handles()) {
            tasks
                .tracker
                .spawn_on(dispatcher.clone().run(events, tasks.stop.clone()), runtime);
        }
        tracing::info!(
            node = config.node.id,
            sip_threads = threads.handles().len(),
            admin = %config.admin.listen,
            cluster = ?config.cluster.as_ref().map(|c| c.listen),
            udp = ?config.sip.udp,
            tcp = ?config.sip.tcp,
            tls = ?config.sip.tls,
            version = crate::version(),
            "tandem node ready"
        );
        RunningSip {
            threads,
            tasks,
            stop_accepting,
            active,
            cdr,
        }
    }
}

/// A node that serves.
pub struct RunningNode {
    node: Node,
    sip: Option<RunningSip>,
}

struct RunningSip {
    threads: ShardThreads,
    tasks: Tasks,
    stop_accepting: CancellationToken,
    active: Arc<ActiveTransactions>,
    /// Stopped after the SIP threads, so the records of the calls they end are kept.
    cdr: Option<CdrService>,
}

impl RunningNode {
    /// Shuts down in order. `how` is the first stop request; a further one on `stops`
    /// during the graceful wait cuts it short.
    pub async fn stop(self, how: Stop, stops: &mut mpsc::Receiver<Stop>) {
        let RunningNode { node, sip } = self;
        if how == Stop::Graceful {
            tracing::info!(
                "stopping: answering new requests with 503 and letting transactions finish"
            );
            node.drain.flag().store(true, Ordering::SeqCst);
        } else {
            tracing::info!("stopping now");
        }
        if let Some(sip) = sip {
            // Provider accounts this node registers go to other nodes before it leaves
            // (the agent un-registers each first, then another node takes it), as
            // `tandem node drain` waits for too; only in a cluster that has a quorum,
            // without which no lease can move.
            let cluster = &node.cluster;
            let handovers_pending = || {
                if cluster.is_standalone() || cluster.health().degraded.is_some() {
                    return 0;
                }
                node.board
                    .handovers_pending(cluster.replica.reader(), cluster.identity.node_id)
                    .unwrap_or(1)
            };
            sip.stop(how, &node.config, stops, handovers_pending).await;
        }
        let stats = &node.stats;
        tracing::info!(
            requests = stats.requests_received.load(Ordering::Relaxed),
            malformed_answered = stats.malformed_answered.load(Ordering::Relaxed),
            malformed_dropped = stats.malformed_dropped.load(Ordering::Relaxed),
            "SIP stopped"
        );
        node.admin_tasks
            .stop("the admin API did not stop in time")
            .await;
        node.cluster_tasks
            .stop("some cluster tasks did not stop in time")
            .await;
        node.cluster.shutdown().await;
        drop(node);
        tracing::info!("tandem node stopped");
    }
}

impl RunningSip {
    /// Stops the SIP side. A graceful stop first waits, up to `sip.shutdown_grace_secs`,
    /// for the transactions that owe a final response and for `handovers_pending` to
    /// reach 0 (the registration agent runs meanwhile).
    async fn stop(
        self,
        how: Stop,
        config: &Config,
        stops: &mut mpsc::Receiver<Stop>,
        handovers_pending: impl Fn() -> usize,
    ) {
        if how == Stop::Graceful {
            self.stop_accepting.cancel();
            let grace = Duration::from_secs(config.sip.shutdown_grace_secs);
            let handed_over = async {
                while handovers_pending() > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            };
            tokio::select! {
                _ = async { self.active.idle().await; handed_over.await } => tracing::info!(
                    "all transactions finished and provider accounts handed over"),
                _ = tokio::time::sleep(grace) => tracing::warn!(
                    remaining = self.active.get(), leases = handovers_pending(),
                    "shutdown grace period over; leaving transactions unfinished and provider accounts to lapse"),
                Some(_) = stops.recv() => tracing::info!("second stop request: exiting now"),
            }
        }
        self.stop_accepting.cancel();
        self.tasks.stop("some tasks did not stop in time").await;
        self.threads.join(TASK_EXIT_TIMEOUT).await;
        if let Some(cdr) = self.cdr {
            cdr.finish(TASK_EXIT_TIMEOUT).await;
        }
    }
}
