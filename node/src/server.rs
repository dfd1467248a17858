//! Wiring and lifecycle of one node: open the replica, bind, start the tasks, wait for a
//! stop request, and shut down in order (CONVENTIONS §4): SIP first, then the admin API,
//! then the internal listener and cluster duties, then Raft, and RocksDB closes last. A
//! graceful stop (SIGTERM) answers new requests with 503, stops accepting connections and
//! waits (bounded) for transactions still waiting on a final response before closing
//! transports. A fast stop (SIGINT) skips the waiting.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::auth::Authenticator;
use crate::cluster::ClusterNode;
use crate::config::{Config, Role};
use crate::core::Core;
use crate::drain::Drain;
use crate::peers::PeerMonitor;
use crate::proxy::{Proxy, ProxySettings};
use crate::registrar::Registrar;
use crate::shard::ShardThreads;
use crate::stats::Stats;
use crate::transaction::start_sip_stack;
use crate::transport::{Limits, Listeners};
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
    let stats = Arc::new(Stats::default());
    let cluster_tracker = TaskTracker::new();
    let stop_cluster = CancellationToken::new();
    let cluster = ClusterNode::start(&config, &cluster_tracker, stop_cluster.clone()).await?;
    let result = run_with_cluster(&config, &cluster, stats, &mut stops).await;
    stop_cluster.cancel();
    cluster_tracker.close();
    if tokio::time::timeout(TASK_EXIT_TIMEOUT, cluster_tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some cluster tasks did not stop in time");
    }
    cluster.shutdown().await;
    drop(cluster);
    tracing::info!("tandem node stopped");
    result
}

/// Everything above the replica: the admin API and, on a full node, the SIP stack.
async fn run_with_cluster(
    config: &Config,
    cluster: &ClusterNode,
    stats: Arc<Stats>,
    stops: &mut mpsc::Receiver<Stop>,
) -> Result<(), Error> {
    let token = admin::load_or_create_token(&config.token_path())?;
    let drain = Arc::new(Drain::default());
    let stop_admin = CancellationToken::new();
    let admin_server = admin::serve(
        admin::Admin::new(cluster.clone(), stats.clone(), drain.clone(), token),
        config.admin.listen,
        stop_admin.clone().cancelled_owned(),
    )?;
    let admin_task = tokio::spawn(admin_server);
    let result = run_sip(config, cluster, stats, drain, stops).await;
    stop_admin.cancel();
    if tokio::time::timeout(TASK_EXIT_TIMEOUT, admin_task)
        .await
        .is_err()
    {
        tracing::warn!("the admin API did not stop in time");
    }
    result
}

async fn run_sip(
    config: &Config,
    cluster: &ClusterNode,
    stats: Arc<Stats>,
    drain: Arc<Drain>,
    stops: &mut mpsc::Receiver<Stop>,
) -> Result<(), Error> {
    let tracker = TaskTracker::new();
    let stop = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let draining = drain.flag();

    let mut active = None;
    let mut shards = None;
    if config.node.role == Role::Full {
        let listeners = Listeners::bind(&config.sip).await?;
        let own = listeners.addrs();
        let limits = Limits {
            max_message_size: config.sip.max_message_size,
            max_connections: config.sip.max_connections,
            idle_timeout: Duration::from_secs(config.sip.connection_idle_timeout_secs),
        };
        let threads = ShardThreads::start(config.node.sip_thread_count(), &stop)?;
        let stack = start_sip_stack(
            listeners,
            limits,
            stats.clone(),
            config.sip.timers(),
            threads.handles(),
            &tracker,
            stop.clone(),
            stop_accepting.clone(),
        );
        active = Some(stack.layer.active());
        drain.watch_transactions(stack.layer.active());
        let registrar_settings = config.registrar.settings();
        let auth = Arc::new(Authenticator::new(
            cluster.clone(),
            registrar_settings.algorithms.clone(),
            registrar_settings.nonce_lifetime_secs,
            stats.clone(),
        ));
        let peers = Arc::new(PeerMonitor::default());
        if let Some(via) = own.udp.first().copied() {
            tracker.spawn(peers.clone().run(
                cluster.clone(),
                stack.transports.clone(),
                config.node.id,
                via,
                stop.clone(),
            ));
        }
        if config.registrar.nat_keepalive_secs > 0 {
            tracker.spawn(crate::keepalive::run(
                cluster.clone(),
                stack.transports.clone(),
                stats.clone(),
                config.node.id,
                Duration::from_secs(config.registrar.nat_keepalive_secs),
                stop.clone(),
            ));
        }
        let proxy = Arc::new(Proxy::new(
            cluster.clone(),
            cluster.overlay.clone(),
            auth.clone(),
            stack.layer.clone(),
            stack.transports.clone(),
            own,
            peers.clone(),
            ProxySettings {
                timer_c: Duration::from_secs(config.sip.timer_c_secs),
            },
        ));
        drain.watch_calls(
            proxy.dialogs.clone(),
            Duration::from_secs(config.sip.drain_call_wait_secs),
        );
        let core = Core {
            layer: stack.layer,
            transports: stack.transports,
            stats: stats.clone(),
            draining: draining.clone(),
            retry_after_secs: config.sip.retry_after_secs,
            registrar: Some(Arc::new(Registrar::new(
                cluster.clone(),
                cluster.overlay.clone(),
                registrar_settings,
                auth,
            ))),
            proxy: Some(proxy),
            peers: Some(peers),
        };
        for (events, runtime) in stack.core_events.into_iter().zip(threads.handles()) {
            tracker.spawn_on(core.clone().run(events, stop.clone()), runtime);
        }
        let sip_threads = threads.handles().len();
        shards = Some(threads);
        tracing::info!(
            node = config.node.id,
            sip_threads,
            admin = %config.admin.listen,
            cluster = ?config.cluster.as_ref().map(|c| c.listen),
            udp = ?config.sip.udp,
            tcp = ?config.sip.tcp,
            tls = ?config.sip.tls,
            version = env!("CARGO_PKG_VERSION"),
            "tandem node ready"
        );
    } else {
        tracing::info!(
            node = config.node.id,
            admin = %config.admin.listen,
            cluster = ?config.cluster.as_ref().map(|c| c.listen),
            "tandem witness ready (no SIP listeners)"
        );
    }

    let first = stops.recv().await.unwrap_or(Stop::Fast);
    if first == Stop::Graceful {
        tracing::info!("stopping: answering new requests with 503 and letting transactions finish");
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        stop_accepting.cancel();
        let grace = Duration::from_secs(config.sip.shutdown_grace_secs);
        if let Some(active) = active {
            tokio::select! {
                _ = active.idle() => tracing::info!("all transactions finished"),
                _ = tokio::time::sleep(grace) => tracing::warn!(
                    remaining = active.get(), "shutdown grace period over; leaving transactions unfinished"),
                Some(_) = stops.recv() => tracing::info!("second stop request: exiting now"),
            }
        }
    } else {
        tracing::info!("stopping now");
    }
    stop_accepting.cancel();
    stop.cancel();
    tracker.close();
    if tokio::time::timeout(TASK_EXIT_TIMEOUT, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    if let Some(threads) = shards {
        threads.join(TASK_EXIT_TIMEOUT).await;
    }
    tracing::info!(
        requests = stats
            .requests_received
            .load(std::sync::atomic::Ordering::Relaxed),
        malformed_answered = stats
            .malformed_answered
            .load(std::sync::atomic::Ordering::Relaxed),
        malformed_dropped = stats
            .malformed_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        "SIP stopped"
    );
    Ok(())
}
