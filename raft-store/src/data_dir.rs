//! Which cluster and node a data directory belongs to. `tandem cluster init` and `join`
//! write an identity file into a new directory; every later start checks it, so a node
//! never runs on a directory that is missing, read-only, or holds another node's or
//! another cluster's Raft state. Ids are never reused, so a mismatch is always a mistake.

use std::io::Write;
use std::path::{Path, PathBuf};

use rand::RngCore;

use crate::types::NodeId;
use crate::Error;

const IDENTITY_FILE: &str = "tandem-identity";

/// The owner of a data directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Random, chosen once by `tandem cluster init` and copied by every joining node.
    pub cluster_id: String,
    pub node_id: NodeId,
    /// The fingerprint of the cluster CA (see [`crate::tls::ca_fingerprint`]); `None` for
    /// a standalone node.
    pub ca_fingerprint: Option<String>,
    /// The Raft addresses of the members `tandem cluster join` found (the member it asked
    /// first): until the node has a membership of its own, they are who may vouch for the
    /// leader that first reaches it (see `http_network::senders`). Empty for the first node, and
    /// for a node joined by a release that did not record them.
    pub join_members: Vec<String>,
}

impl Identity {
    /// A fresh cluster id for `tandem cluster init` (add the CA with `ca_fingerprint`).
    pub fn new_cluster(node_id: NodeId) -> Identity {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let cluster_id = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Identity {
            cluster_id,
            node_id,
            ca_fingerprint: None,
            join_members: Vec::new(),
        }
    }
}

fn identity_path(dir: &Path) -> PathBuf {
    dir.join(IDENTITY_FILE)
}

/// Where the RocksDB store lives inside a data dir.
pub fn raft_dir(dir: &Path) -> PathBuf {
    dir.join("raft")
}

fn check_writable(dir: &Path) -> Result<(), Error> {
    let probe = dir.join(".tandem-write-probe");
    let result = std::fs::File::create(&probe).and_then(|mut f| f.write_all(b"ok"));
    let _ = std::fs::remove_file(&probe);
    result.map_err(|e| Error::Io(format!("data dir {} is not writable: {e}", dir.display())))
}

/// Checks that `dir` can be claimed: it is absent, or writable and owned by no node yet.
/// Creates it if absent.
pub fn check_claimable(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir)
        .map_err(|e| Error::Io(format!("creating data dir {}: {e}", dir.display())))?;
    check_writable(dir)?;
    if let Some(existing) = read(dir)? {
        return Err(Error::Io(format!(
            "data dir {} already belongs to node {} of cluster {}; use a new directory",
            dir.display(),
            existing.node_id,
            existing.cluster_id
        )));
    }
    if raft_dir(dir).exists() {
        return Err(Error::Io(format!(
            "data dir {} holds Raft state ({}) but no identity file; it is damaged or not \
             Tandem's, so it is not reused: use a new directory",
            dir.display(),
            raft_dir(dir).display()
        )));
    }
    Ok(())
}

/// Undoes [`claim`] after a first step that failed (`cluster init`), so the operator can
/// simply run it again: removes the identity file and any Raft state.
pub fn release(dir: &Path) -> Result<(), Error> {
    let io = |e: std::io::Error| Error::Io(format!("cleaning up data dir {}: {e}", dir.display()));
    match std::fs::remove_dir_all(raft_dir(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    match std::fs::remove_file(identity_path(dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(e)),
        _ => Ok(()),
    }
}

/// Claims a new, empty (or absent) directory for `identity`. Refuses a directory that
/// already belongs to a node.
pub fn claim(dir: &Path, identity: &Identity) -> Result<(), Error> {
    check_claimable(dir)?;
    let mut text = format!(
        "# Written by tandem cluster init/join. Do not edit or copy to another node.\ncluster = {}\nnode = {}\n",
        identity.cluster_id, identity.node_id
    );
    if let Some(ca) = &identity.ca_fingerprint {
        text.push_str(&format!("ca = {ca}\n"));
    }
    if !identity.join_members.is_empty() {
        text.push_str(&format!("members = {}\n", identity.join_members.join(",")));
    }
    let io =
        |e: std::io::Error| Error::Io(format!("writing {}: {e}", identity_path(dir).display()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(identity_path(dir))
        .map_err(io)?;
    f.write_all(text.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Checks the directory a node is about to run on: it must exist, be writable, and belong
/// to this node, and (when the caller has one) to the cluster whose CA has fingerprint
/// `ca_fingerprint`.
pub fn open(dir: &Path, node_id: NodeId, ca_fingerprint: Option<&str>) -> Result<Identity, Error> {
    if !dir.is_dir() {
        return Err(Error::Io(format!(
            "data dir {} does not exist; create it with `tandem cluster init` or `tandem cluster join`",
            dir.display()
        )));
    }
    check_writable(dir)?;
    let identity = read(dir)?.ok_or_else(|| {
        Error::Io(format!(
            "data dir {} belongs to no cluster yet; run `tandem cluster init` or `tandem cluster join` first",
            dir.display()
        ))
    })?;
    if identity.node_id != node_id {
        return Err(Error::Io(format!(
            "data dir {} belongs to node {}, but this node is configured as node {node_id}",
            dir.display(),
            identity.node_id
        )));
    }
    match (ca_fingerprint, &identity.ca_fingerprint) {
        (Some(expected), Some(recorded)) if expected != recorded => {
            return Err(Error::Io(format!(
                "data dir {} belongs to another cluster ({}): it was created under a cluster \
                 CA with fingerprint {recorded}, but this node's cluster.ca_certificate has \
                 fingerprint {expected}",
                dir.display(),
                identity.cluster_id
            )));
        }
        (Some(_), None) => {
            return Err(Error::Io(format!(
                "data dir {} belongs to standalone node {}, not to a cluster; a standalone \
                 node's data cannot join a cluster",
                dir.display(),
                identity.node_id
            )));
        }
        (None, Some(_)) => {
            return Err(Error::Io(format!(
                "data dir {} belongs to node {} of cluster {}; it needs the [cluster] section \
                 it was created with, and cannot run standalone",
                dir.display(),
                identity.node_id,
                identity.cluster_id
            )));
        }
        _ => {}
    }
    Ok(identity)
}

fn read(dir: &Path) -> Result<Option<Identity>, Error> {
    let path = identity_path(dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io(format!("reading {}: {e}", path.display()))),
    };
    let (mut cluster, mut node, mut ca) = (None, None, None);
    let mut join_members = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match line.split_once('=').map(|(k, v)| (k.trim(), v.trim())) {
            Some(("cluster", v)) if !v.is_empty() => cluster = Some(v.to_owned()),
            Some(("node", v)) => node = v.parse().ok(),
            Some(("ca", v)) if !v.is_empty() => ca = Some(v.to_owned()),
            Some(("members", v)) => {
                join_members = v
                    .split(',')
                    .map(str::trim)
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            _ => {}
        }
    }
    match (cluster, node) {
        (Some(cluster_id), Some(node_id)) => Ok(Some(Identity {
            cluster_id,
            node_id,
            ca_fingerprint: ca,
            join_members,
        })),
        _ => Err(Error::Corrupt(format!(
            "{} is damaged: it needs `cluster = ...` and `node = N`",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_dir_opens_for_its_own_node_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let me = Identity {
            ca_fingerprint: Some("ab12".into()),
            join_members: vec!["127.0.0.1:7001".into(), "[::1]:7002".into()],
            ..Identity::new_cluster(2)
        };
        claim(&dir, &me).unwrap();
        assert_eq!(open(&dir, 2, Some("ab12")).unwrap(), me);

        let err = open(&dir, 3, Some("ab12")).unwrap_err().to_string();
        assert!(
            err.contains("belongs to node 2") && err.contains("node 3"),
            "{err}"
        );
        let err = open(&dir, 2, Some("cd34")).unwrap_err().to_string();
        assert!(
            err.contains("another cluster") && err.contains(&me.cluster_id) && err.contains("cd34"),
            "{err}"
        );
        let err = claim(&dir, &Identity::new_cluster(2))
            .unwrap_err()
            .to_string();
        assert!(err.contains("already belongs"), "{err}");
    }

    #[test]
    fn missing_unclaimed_and_damaged_dirs_are_refused_with_the_way_out() {
        let tmp = tempfile::tempdir().unwrap();
        let err = open(&tmp.path().join("nope"), 1, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not exist") && err.contains("cluster init"),
            "{err}"
        );
        let err = open(tmp.path(), 1, None).unwrap_err().to_string();
        assert!(err.contains("belongs to no cluster"), "{err}");
        std::fs::write(tmp.path().join(IDENTITY_FILE), "cluster = \n").unwrap();
        let err = open(tmp.path(), 1, None).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn standalone_and_cluster_dirs_do_not_mix() {
        let tmp = tempfile::tempdir().unwrap();
        claim(tmp.path(), &Identity::new_cluster(1)).unwrap();
        let err = open(tmp.path(), 1, Some("ab12")).unwrap_err().to_string();
        assert!(err.contains("standalone"), "{err}");

        let member = tempfile::tempdir().unwrap();
        let identity = Identity {
            ca_fingerprint: Some("ab12".into()),
            ..Identity::new_cluster(1)
        };
        claim(member.path(), &identity).unwrap();
        let err = open(member.path(), 1, None).unwrap_err().to_string();
        assert!(err.contains("[cluster]"), "{err}");
    }

    #[test]
    fn raft_state_without_an_identity_is_not_claimed_and_release_undoes_a_claim() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(raft_dir(tmp.path())).unwrap();
        let err = claim(tmp.path(), &Identity::new_cluster(1))
            .unwrap_err()
            .to_string();
        assert!(err.contains("no identity file"), "{err}");

        release(tmp.path()).unwrap();
        claim(tmp.path(), &Identity::new_cluster(1)).unwrap();
        release(tmp.path()).unwrap();
        claim(tmp.path(), &Identity::new_cluster(1)).unwrap();
    }

    #[test]
    fn cluster_ids_are_fresh() {
        assert_ne!(
            Identity::new_cluster(1).cluster_id,
            Identity::new_cluster(1).cluster_id
        );
    }
}
