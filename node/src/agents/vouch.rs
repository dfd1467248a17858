//! What the flood limit (`stack::transport::flood`) asks the agents: whether a source is
//! a cluster member, and whether a request from a banned address proves that its sender
//! really is there. Proof is something only a party that received the cluster's traffic
//! at that address can send: credentials on a nonce issued to that address (the nonce's
//! MAC covers it), or a flow token of the request's own call from our Record-Route.

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tandem_sip::Message;
use tokio::time::Instant;

use crate::agents::auth::Authenticator;
use crate::agents::proxy::Proxy;
use crate::cluster::ClusterNode;
use crate::stack::transport::{OwnAddrs, Vouch};

/// How long the members' addresses are cached: membership changes are rare, and a
/// flooded node must not read the registry for every request it screens.
const MEMBERS_TTL: Duration = Duration::from_secs(2);

pub struct EdgeVouch {
    cluster: ClusterNode,
    auth: Arc<Authenticator>,
    proxy: Arc<Proxy>,
    own: OwnAddrs,
    members: Mutex<Option<(Instant, Arc<[IpAddr]>)>>,
}

impl EdgeVouch {
    pub fn new(
        cluster: ClusterNode,
        auth: Arc<Authenticator>,
        proxy: Arc<Proxy>,
        own: OwnAddrs,
    ) -> EdgeVouch {
        EdgeVouch {
            cluster,
            auth,
            proxy,
            own,
            members: Mutex::new(None),
        }
    }

    /// The IP addresses of every member's SIP listeners, this node's included, read from
    /// the node registry.
    fn read_member_ips(&self) -> Arc<[IpAddr]> {
        let mut ips: Vec<IpAddr> = self
            .cluster
            .replica
            .reader()
            .nodes()
            .unwrap_or_default()
            .iter()
            .flat_map(|n| n.sip_addrs.iter())
            .filter_map(|a| a.split_once(':')?.1.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip())
            .chain(self.own.all().map(|(_, a)| a.ip()))
            .collect();
        ips.sort();
        ips.dedup();
        ips.into()
    }
}

impl Vouch for EdgeVouch {
    fn trusted(&self, ip: IpAddr) -> bool {
        let now = Instant::now();
        if let Some((at, ips)) = self.members.lock().expect("member cache").as_ref() {
            if now.duration_since(*at) < MEMBERS_TTL {
                return ips.contains(&ip);
            }
        }
        // Read without the lock held: another thread may read too, and that is all.
        let ips = self.read_member_ips();
        let trusted = ips.contains(&ip);
        *self.members.lock().expect("member cache") = Some((now, ips));
        trusted
    }

    fn proves_round_trip(&self, request: &Message, ip: IpAddr) -> bool {
        self.proxy.carries_own_token(request, ip) || self.auth.answers_nonce_issued_to(request, ip)
    }
}
