//! The offline steps an operator runs once per node before its first start:
//! `tandem cluster init` on the first node, `tandem cluster join` on each other one. Both
//! claim the node's data directory, and release it again if they fail part-way, so either
//! can simply be run again.

use std::time::Duration;

use tandem_raft_store::crypto::KeyRing;
use tandem_raft_store::data_dir::{self, Identity};
use tandem_raft_store::http_network::HttpNetwork;
use tandem_raft_store::local_network::LocalRouter;
use tandem_raft_store::membership::{ClusterReply, ClusterRequest};
use tandem_raft_store::replica::Replica;
use tandem_raft_store::types::{NodeId, NodeInfo};

use super::{cluster_section, load_or_create_keys};
use crate::config::{ClusterConfig, Config};
use crate::Error;

/// `tandem cluster init`: claims the data dir for a new cluster and makes this node its
/// only member. Offline: the node is started afterwards with `tandem run`. If it fails
/// part-way, the data dir is released again so it can simply be re-run.
pub async fn init(config: &Config) -> Result<String, Error> {
    let c = cluster_section(config)?;
    let dir = &config.node.data_dir;
    data_dir::check_claimable(dir)?;
    let key_path = config.node.master_key_path();
    let mut made_key = false;
    if !key_path.exists() {
        KeyRing::generate().save(&key_path)?;
        made_key = true;
    } else {
        KeyRing::load(&key_path)?;
    }
    let id = config.node.id;
    let identity = Identity {
        ca_fingerprint: Some(c.ca_fingerprint()?),
        ..Identity::new_cluster(id)
    };
    data_dir::claim(dir, &identity)?;
    if let Err(e) = initialize_alone(config, c).await {
        data_dir::release(dir)?;
        return Err(e);
    }
    let mut text = format!(
        "Created cluster {} with node {id} (Raft address {}).\n",
        identity.cluster_id,
        c.advertise_addr()
    );
    if made_key {
        text.push_str(&format!(
            "Created the master key file {}: give every node a copy of it.\n",
            key_path.display()
        ));
    }
    text.push_str(&format!(
        "Next: start this node with `tandem run --config FILE`, then on each other node run\n\
         `tandem cluster join --config FILE --peer {}`.\n",
        c.advertise_addr()
    ));
    Ok(text)
}

/// Starts the replica without a network and makes this node the only member.
async fn initialize_alone(config: &Config, c: &ClusterConfig) -> Result<(), Error> {
    let id = config.node.id;
    let replica = Replica::start(
        id,
        &data_dir::raft_dir(&config.node.data_dir),
        &config.raft_settings(),
        LocalRouter::new().network(id),
    )
    .await?;
    let me = NodeInfo {
        raft_addr: c.advertise_addr(),
    };
    let result = replica.initialize([(id, me)].into()).await;
    replica.shutdown().await;
    Ok(result?)
}

/// `tandem cluster join`: asks a member (any; it forwards to the leader) to add this node,
/// then claims the data dir with the cluster's id. The node becomes a voter once it runs
/// and has caught up.
pub async fn join(
    config: &Config,
    peer: &str,
    token_file: Option<&std::path::Path>,
) -> Result<String, Error> {
    let c = cluster_section(config)?;
    let id = config.node.id;
    let dir = &config.node.data_dir;
    data_dir::check_claimable(dir)?;
    let key_path = config.node.master_key_path();
    load_or_create_keys(&key_path, false)?;
    let tls = tandem_raft_store::tls::ClusterTls::load(
        &c.ca_certificate,
        &c.certificate,
        &c.private_key,
    )?;
    super::check_certificate_id(&tls, id, &c.certificate)?;
    let network = HttpNetwork::new(&tls)?;
    // Without a token the plain join is sent: a cluster that has not yet raised its
    // feature version to join tokens (mid-upgrade) takes it, any other refuses it and says
    // how to mint one.
    let request = match join_token(token_file)? {
        Some(token) => ClusterRequest::JoinWithToken {
            id,
            raft_addr: c.advertise_addr(),
            token: token.into(),
        },
        None => ClusterRequest::Join {
            id,
            raft_addr: c.advertise_addr(),
        },
    };
    let (cluster_id, reply) = network
        .cluster(peer, &request, Duration::from_secs(10))
        .await?;
    if reply != ClusterReply::Joined {
        return Err(Error::Store(tandem_raft_store::Error::Membership(format!(
            "unexpected answer from {peer}: {reply:?}"
        ))));
    }
    let join_members = members_seen_from(&network, peer, id).await;
    data_dir::claim(
        dir,
        &Identity {
            cluster_id: cluster_id.clone(),
            node_id: id,
            ca_fingerprint: Some(c.ca_fingerprint()?),
            join_members,
        },
    )?;
    Ok(format!(
        "Node {id} joined cluster {cluster_id} as a learner (Raft address {}).\n\
         Next: start it with `tandem run --config FILE`; it becomes a voter once it has caught up.\n",
        c.advertise_addr()
    ))
}

/// The Raft addresses of the members `peer` knows now that this node is one (the peer's
/// first): until this node has a membership of its own, they vouch for the leader that
/// first reaches it. The peer may take a moment to apply the join, and one from before the
/// question existed cannot answer; then the peer alone is recorded.
async fn members_seen_from(network: &HttpNetwork, peer: &str, me: NodeId) -> Vec<String> {
    let mut addrs = vec![peer.to_owned()];
    for _ in 0..10 {
        match network
            .cluster(peer, &ClusterRequest::Members, Duration::from_secs(2))
            .await
        {
            Ok((_, ClusterReply::Members(members))) if members.iter().any(|m| m.id == me) => {
                addrs.extend(
                    members
                        .into_iter()
                        .filter(|m| m.id != me && m.raft_addr != peer)
                        .map(|m| m.raft_addr),
                );
                break;
            }
            Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    addrs
}

/// The join token, from `--token-file` or the `TANDEM_JOIN_TOKEN` environment variable
/// (never a command-line value, which other users see in `ps`).
fn join_token(file: Option<&std::path::Path>) -> Result<Option<String>, Error> {
    let text = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|source| Error::Io {
            context: format!("reading the join token file {}", path.display()),
            source,
        })?,
        None => match std::env::var("TANDEM_JOIN_TOKEN") {
            Ok(t) => t,
            Err(_) => return Ok(None),
        },
    };
    let token = text.trim();
    if tandem_raft_store::join_token::parse(token).is_none() {
        return Err(Error::Store(tandem_raft_store::Error::Membership(format!(
            "{} does not hold a join token (tj_…): mint one with `tandem cluster join-token \
             create` on a member",
            file.map_or("TANDEM_JOIN_TOKEN".to_owned(), |p| p.display().to_string())
        ))));
    }
    Ok(Some(token.to_owned()))
}
