//! Offline provisioning, done by an operator before a node first starts: the master key
//! file for field encryption (raft-store/DESIGN.md, "Secrets are sealed before the log"),
//! and the cluster CA and node certificates for the internal mutual-TLS listener
//! (raft-store/DESIGN.md, "The Raft network"). Nothing here talks to a running cluster.
//!
//! Every command only ever creates files. It checks that none of its outputs exists before
//! writing any, creates each one exclusively, gives private keys mode 0600 from the moment
//! they exist, and removes what it wrote if it fails part-way, so the operator can fix the
//! problem and rerun it.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use rustls::pki_types::CertificateDer;
use tandem_raft_store::certs::CertAuthority;
use tandem_raft_store::crypto::KeyRing;

use crate::operator::cli::CertCommand;
use crate::Error;

/// The CA's files, in the CA directory and, for the certificate, beside every node's.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// `tandem keygen`: a new master key file. Returns what to tell the operator.
pub fn keygen(out: &Path) -> Result<String, Error> {
    // KeyRing::save refuses to overwrite too; checking first gives the plainer message.
    refuse_existing(&[out])?;
    KeyRing::generate().save(out)?;
    Ok(format!(
        "wrote master key file {} (mode 0600)\n\
         warning: back it up now, somewhere other than the nodes' data directories; without \
         it the cluster's encrypted fields (passwords, token secrets) cannot be read\n",
        out.display()
    ))
}

/// `tandem cert ca` and `tandem cert node`. Returns what to tell the operator.
pub fn cert(command: &CertCommand) -> Result<String, Error> {
    match command {
        CertCommand::Ca { out, cluster } => cert_ca(out, cluster),
        CertCommand::Node {
            ca,
            name,
            id,
            sans,
            out,
        } => cert_node(ca, name, *id, sans, out),
    }
}

fn cert_ca(out: &Path, cluster: &str) -> Result<String, Error> {
    create_dir(out)?;
    let (cert_path, key_path) = (out.join(CA_CERT), out.join(CA_KEY));
    let mut files = NewFiles::absent(&[&cert_path, &key_path])?;
    let ca = CertAuthority::generate(cluster)?;
    files.write(&key_path, &ca.key_pem(), Access::OwnerOnly)?;
    files.write(&cert_path, &ca.cert_pem(), Access::Public)?;
    files.keep();
    Ok(format!(
        "wrote {} (the cluster CA certificate; every node needs a copy)\n\
         wrote {} (mode 0600)\n\
         warning: keep the CA key off the nodes and backed up; whoever holds it can issue \
         certificates the cluster trusts\n",
        cert_path.display(),
        key_path.display()
    ))
}

fn cert_node(
    ca_dir: &Path,
    name: &str,
    id: u64,
    sans: &[String],
    out: &Path,
) -> Result<String, Error> {
    let ca_cert_path = ca_dir.join(CA_CERT);
    let ca_cert = read(&ca_cert_path)?;
    let ca_key = read(&ca_dir.join(CA_KEY))?;
    let ca = CertAuthority::from_pem(&ca_cert, &ca_key).map_err(|e| Error::Provision {
        path: ca_dir.to_owned(),
        problem: format!("not a usable cluster CA: {}", reason(e)),
    })?;

    create_dir(out)?;
    let cert_path = out.join(format!("{name}.crt"));
    let key_path = out.join(format!("{name}.key"));
    let out_ca_path = out.join(CA_CERT);
    let copy_ca = match std::fs::read_to_string(&out_ca_path) {
        Ok(existing) if same_certificates(&existing, &ca_cert) => false,
        Ok(_) => {
            return Err(Error::Provision {
                path: out_ca_path,
                problem: format!(
                    "already exists and is not {}; refusing to overwrite it",
                    ca_cert_path.display()
                ),
            })
        }
        Err(e) if e.kind() == ErrorKind::NotFound => true,
        Err(e) => return Err(io("reading", &out_ca_path, e)),
    };
    let mut files = NewFiles::absent(&[&cert_path, &key_path])?;
    let issued = ca.issue(name, id, sans).map_err(|e| Error::Provision {
        path: cert_path.clone(),
        problem: reason(e),
    })?;
    files.write(&key_path, &issued.key_pem, Access::OwnerOnly)?;
    files.write(&cert_path, &issued.cert_pem, Access::Public)?;
    let mut report = format!(
        "wrote {} (node {name}, node id {id}; subject alt names {})\nwrote {} (mode 0600)\n",
        cert_path.display(),
        sans.join(", "),
        key_path.display()
    );
    if copy_ca {
        files.write(&out_ca_path, &ca_cert, Access::Public)?;
        report.push_str(&format!("wrote {}\n", out_ca_path.display()));
    }
    files.keep();
    Ok(report)
}

/// Whether two PEM texts hold the same certificates, whatever their line endings.
fn same_certificates(a: &str, b: &str) -> bool {
    let parse = |pem: &str| -> Option<Vec<CertificateDer<'static>>> {
        rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<_, _>>()
            .ok()
    };
    matches!((parse(a), parse(b)), (Some(a), Some(b)) if a == b && !a.is_empty())
}

/// The store's message without its variant's prefix, for a sentence that says what failed.
fn reason(e: tandem_raft_store::Error) -> String {
    match e {
        tandem_raft_store::Error::Crypto(m) | tandem_raft_store::Error::Io(m) => m,
        other => other.to_string(),
    }
}

fn io(doing: &str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        context: format!("{doing} {}", path.display()),
        source,
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|e| io("reading", path, e))
}

fn create_dir(dir: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(dir).map_err(|e| io("creating directory", dir, e))
}

fn already_exists(path: &Path) -> Error {
    Error::Provision {
        path: path.to_owned(),
        problem: "already exists; refusing to overwrite it".to_owned(),
    }
}

fn refuse_existing(paths: &[&Path]) -> Result<(), Error> {
    match paths.iter().find(|p| p.symlink_metadata().is_ok()) {
        Some(path) => Err(already_exists(path)),
        None => Ok(()),
    }
}

#[derive(Clone, Copy)]
enum Access {
    OwnerOnly,
    Public,
}

/// The files one command creates; unless [`NewFiles::keep`] is called they are removed
/// again when it is dropped, so a command that fails part-way leaves nothing behind.
struct NewFiles {
    written: Vec<PathBuf>,
    keep: bool,
}

impl NewFiles {
    /// Fails, having written nothing, if any of `paths` already exists.
    fn absent(paths: &[&Path]) -> Result<NewFiles, Error> {
        refuse_existing(paths)?;
        Ok(NewFiles {
            written: Vec::new(),
            keep: false,
        })
    }

    fn write(&mut self, path: &Path, contents: &str, access: Access) -> Result<(), Error> {
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            // Set at creation, so a key is never readable by others, not even briefly.
            options.mode(match access {
                Access::OwnerOnly => 0o600,
                Access::Public => 0o644,
            });
        }
        #[cfg(not(unix))]
        let _ = access;
        let mut file = options.open(path).map_err(|e| match e.kind() {
            ErrorKind::AlreadyExists => already_exists(path),
            _ => io("creating", path, e),
        })?;
        self.written.push(path.to_owned());
        file.write_all(contents.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| io("writing", path, e))
    }

    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for NewFiles {
    fn drop(&mut self) {
        if !self.keep {
            for path in &self.written {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(ca: &Path, name: &str, out: &Path) -> CertCommand {
        CertCommand::Node {
            ca: ca.to_owned(),
            name: name.to_owned(),
            id: 1,
            sans: vec!["127.0.0.1".to_owned()],
            out: out.to_owned(),
        }
    }

    #[cfg(unix)]
    #[test]
    fn a_failed_node_issue_leaves_no_files_and_a_rerun_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let out = dir.path().join("node-a");
        cert(&CertCommand::Ca {
            out: ca.clone(),
            cluster: "t".to_owned(),
        })
        .unwrap();
        // A dangling symlink reads as missing, so ca.crt is copied last, and that write
        // fails after the node's key and certificate were written.
        std::fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(dir.path().join("nowhere"), out.join("ca.crt")).unwrap();
        let err = cert(&node(&ca, "node-a", &out)).unwrap_err().to_string();
        assert!(err.contains("ca.crt: already exists"), "{err}");
        assert!(!out.join("node-a.crt").exists() && !out.join("node-a.key").exists());
        std::fs::remove_file(out.join("ca.crt")).unwrap();
        cert(&node(&ca, "node-a", &out)).unwrap();
        assert!(out.join("node-a.crt").exists() && out.join("node-a.key").exists());
    }

    #[test]
    fn a_different_ca_certificate_in_the_output_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, other, out) = (
            dir.path().join("ca"),
            dir.path().join("other"),
            dir.path().join("out"),
        );
        for (dir, cluster) in [(&ca, "a"), (&other, "b")] {
            cert(&CertCommand::Ca {
                out: dir.clone(),
                cluster: cluster.to_owned(),
            })
            .unwrap();
        }
        cert(&node(&ca, "node-a", &out)).unwrap();
        let err = cert(&node(&other, "node-b", &out)).unwrap_err().to_string();
        assert!(err.contains("is not") && err.contains("ca.crt"), "{err}");
        assert!(!out.join("node-b.crt").exists());
        // Issuing into the CA's own directory reuses its ca.crt as it is.
        cert(&node(&ca, "node-c", &ca)).unwrap();
    }
}
