//! The cluster's private certificate authority for the internal mutual-TLS listener that
//! carries Raft RPCs (raft-store/DESIGN.md, "The Raft network"). It owns creating the CA,
//! reloading it from its PEM files, and issuing node certificates that serve as both TLS
//! server and TLS client identities, so one file pair per node covers both directions of a
//! Raft link.
//!
//! A node certificate names its node id in a URI subject alt name,
//! `tandem://node/<id>` ([`node_id_of`]): the cluster link accepts a peer only under the id
//! its certificate names, and refuses every id the cluster removed (`tls.rs`).
//!
//! Reloading needs no certificate parser: rcgen writes an issued certificate's issuer from
//! the CA's distinguished name and its authority key id from the CA's key id, so
//! [`CertAuthority::from_pem`] reads back only the subject name, the public key, the subject
//! key id and the basic constraints, and refuses a CA whose subject it cannot reproduce
//! byte for byte, because certificates issued under a different name would not chain.

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
};

use crate::types::NodeId;
use crate::Error;

/// What a node certificate's URI subject alt name starts with; the node id follows.
pub const NODE_ID_URI: &str = "tandem://node/";

/// The node id a certificate (DER) names, if it names exactly one.
pub fn node_id_of(cert_der: &[u8]) -> Option<NodeId> {
    let fields = der::CertFields::parse(cert_der)?;
    let mut ids = fields
        .extensions
        .uris
        .iter()
        .filter_map(|u| u.strip_prefix(NODE_ID_URI))
        .map(|id| id.parse::<NodeId>().ok().filter(|id| *id > 0));
    match (ids.next(), ids.next()) {
        (Some(id), None) => id,
        _ => None,
    }
}

const DAY: u64 = 24 * 60 * 60;
/// Ten years and two, counting their leap days, so each ends on the day it started.
const CA_VALIDITY: Duration = Duration::from_secs((10 * 365 + 3) * DAY);
const NODE_VALIDITY: Duration = Duration::from_secs((2 * 365 + 1) * DAY);
/// Certificates start this long before they are made, so a node whose clock is a little
/// behind the machine that issued them does not reject them as not yet valid.
const BACKDATE: Duration = Duration::from_secs(60 * 60);

/// The cluster CA: its certificate, which every node trusts, and its signing key, which
/// only the machine that issues node certificates needs.
pub struct CertAuthority {
    /// The certificate exactly as created or loaded; this is what nodes trust.
    cert_pem: String,
    /// rcgen's view of the CA as an issuer. After [`CertAuthority::from_pem`] it is a
    /// stand-in self-signed with the same name and key, which is all issuing reads.
    issuer: rcgen::Certificate,
    key: KeyPair,
}

impl fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cn = match self
            .issuer
            .params()
            .distinguished_name
            .get(&DnType::CommonName)
        {
            Some(DnValue::Utf8String(s)) => s.as_str(),
            Some(DnValue::PrintableString(s)) => s.as_str(),
            _ => "?",
        };
        write!(f, "CertAuthority({cn:?})")
    }
}

/// A node certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "IssuedCert({} bytes of PEM, key hidden)",
            self.cert_pem.len()
        )
    }
}

fn crypto(context: &str) -> impl Fn(rcgen::Error) -> Error + '_ {
    move |e| Error::Crypto(format!("{context}: {e}"))
}

/// Sets a certificate's validity to start now (less [`BACKDATE`]) and last `validity`.
/// Certificate dates are wall-clock dates, so this reads the system clock, not tokio's.
fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // rcgen does not re-export `time`; its date helper gives the epoch in its own type.
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - BACKDATE;
    params.not_after = now + validity;
}

fn ca_params(distinguished_name: DistinguishedName, key_id: KeyIdMethod) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name;
    // Path length 0: the CA signs node certificates only, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // The CA's subject key id, and the authority key id of every certificate it issues.
    // They must agree: OpenSSL, unlike rustls, will not chain a certificate whose
    // authority key id differs from its issuer's subject key id.
    params.key_identifier_method = key_id;
    params
}

impl CertAuthority {
    /// A new self-signed CA (ECDSA P-256, valid ten years) named
    /// `Tandem cluster CA <cluster_name>`.
    pub fn generate(cluster_name: &str) -> Result<CertAuthority, Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crypto("generating the CA key"))?;
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            format!("Tandem cluster CA {cluster_name}"),
        );
        let mut params = ca_params(name, KeyIdMethod::Sha256);
        set_validity(&mut params, CA_VALIDITY);
        let cert = params
            .self_signed(&key)
            .map_err(crypto("self-signing the CA certificate"))?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: cert,
            key,
        })
    }

    /// Reloads a CA from its certificate and private key, to issue more node certificates.
    /// Refuses a key that is not the certificate's, and a certificate that is not a CA.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<CertAuthority, Error> {
        let bad = |problem: &str| Error::Crypto(format!("CA certificate: {problem}"));
        let mut pem = cert_pem.as_bytes();
        let mut ders = rustls_pemfile::certs(&mut pem);
        let der = match (ders.next(), ders.next()) {
            (Some(Ok(der)), None) => der,
            (None, _) => return Err(bad("no PEM CERTIFICATE block")),
            (Some(Err(e)), _) => return Err(bad(&format!("unreadable PEM: {e}"))),
            (Some(Ok(_)), Some(_)) => return Err(bad("more than one certificate")),
        };
        let fields =
            der::CertFields::parse(&der).ok_or_else(|| bad("not a valid X.509 certificate"))?;
        if !fields.extensions.is_ca {
            return Err(bad("not a CA (its basic constraints do not say cA=TRUE)"));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            Error::Crypto(format!(
                "CA key: not an unencrypted PKCS#8 private key ({e}); \
                     `openssl pkcs8 -topk8 -nocrypt` converts other forms"
            ))
        })?;
        if key.public_key_der() != fields.public_key_info {
            return Err(Error::Crypto(
                "CA key does not belong to the CA certificate".to_owned(),
            ));
        }
        let name = der::distinguished_name(fields.subject_contents)
            .ok_or_else(|| bad("its subject name uses a form this tool cannot reproduce"))?;
        // A CA made by other tools may derive its key id another way (OpenSSL uses SHA-1).
        let key_id = match fields.extensions.subject_key_id {
            Some(id) => KeyIdMethod::PreSpecified(id.to_vec()),
            None => KeyIdMethod::Sha256,
        };
        let issuer = ca_params(name, key_id)
            .self_signed(&key)
            .map_err(crypto("reloading the CA"))?;
        let reproduced = der::CertFields::parse(issuer.der()).map(|f| f.subject);
        if reproduced != Some(fields.subject) {
            return Err(bad(
                "its subject name cannot be reproduced exactly, so issued certificates would not chain to it",
            ));
        }
        Ok(CertAuthority {
            cert_pem: cert_pem.to_owned(),
            issuer,
            key,
        })
    }

    /// The CA certificate, which every node trusts.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key (PKCS#8). Whoever holds it can add nodes to the cluster.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate with common name `node_name` (ECDSA P-256, valid two years), good for
    /// both TLS server and TLS client authentication. Each of `sans` becomes an IP address
    /// subject alt name if it parses as one and a DNS name otherwise; at least one is
    /// needed, because a node is reached by address and a client checks it against these.
    pub fn issue(
        &self,
        node_name: &str,
        node_id: NodeId,
        sans: &[String],
    ) -> Result<IssuedCert, Error> {
        if node_id == 0 {
            return Err(Error::Crypto(format!(
                "node certificate for {node_name}: node ids start at 1"
            )));
        }
        if sans.is_empty() {
            return Err(Error::Crypto(format!(
                "node certificate for {node_name}: needs at least one subject alt name"
            )));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, node_name);
        params.subject_alt_names = sans
            .iter()
            .map(|san| subject_alt_name(san))
            .collect::<Result<_, _>>()?;
        let uri = rcgen::Ia5String::try_from(format!("{NODE_ID_URI}{node_id}"))
            .map_err(crypto("the node id's URI"))?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, NODE_VALIDITY);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(crypto("generating the node key"))?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(crypto("signing the node certificate"))?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Validated the way a TLS client validates the name it connects to, so every SAN in a
/// certificate is one a peer can actually match.
fn subject_alt_name(san: &str) -> Result<SanType, Error> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let bad = || {
        Error::Crypto(format!(
            "subject alt name {san:?} is neither an IP address nor a DNS name"
        ))
    };
    let dns = rustls::pki_types::DnsName::try_from(san).map_err(|_| bad())?;
    let ia5 = rcgen::Ia5String::try_from(dns.as_ref()).map_err(|_| bad())?;
    Ok(SanType::DnsName(ia5))
}

/// Just enough DER reading to reload a CA (a certificate's names, public key and basic
/// constraints, and a name as rcgen's type) and to find a node certificate's id.
mod der {
    use rcgen::{DistinguishedName, DnType, DnValue};

    const SEQUENCE: u8 = 0x30;
    const SET: u8 = 0x31;
    const INTEGER: u8 = 0x02;
    const BOOLEAN: u8 = 0x01;
    const OID: u8 = 0x06;
    const OCTET_STRING: u8 = 0x04;
    const UTF8_STRING: u8 = 0x0c;
    const PRINTABLE_STRING: u8 = 0x13;
    const IA5_STRING: u8 = 0x16;
    const VERSION: u8 = 0xa0;
    const EXTENSIONS: u8 = 0xa3;
    const KEY_ID: u8 = 0x80;
    /// id-ce-basicConstraints, 2.5.29.19.
    const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    /// id-ce-subjectKeyIdentifier, 2.5.29.14.
    const SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
    /// id-ce-authorityKeyIdentifier, 2.5.29.35.
    const AUTHORITY_KEY_ID: &[u8] = &[0x55, 0x1d, 0x23];
    /// id-ce-subjectAltName, 2.5.29.17.
    const SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];
    /// A GeneralName's uniformResourceIdentifier, `[6] IMPLICIT IA5String`.
    const URI: u8 = 0x86;

    /// One tag-length-value: `whole` is all of it, `contents` the value.
    struct Tlv<'a> {
        tag: u8,
        contents: &'a [u8],
        whole: &'a [u8],
    }

    /// Reads one TLV off the front of `input`. Single-byte tags and definite lengths only,
    /// which is all DER certificates use.
    fn read<'a>(input: &mut &'a [u8]) -> Option<Tlv<'a>> {
        let all = *input;
        let (&tag, rest) = all.split_first()?;
        if tag & 0x1f == 0x1f {
            return None;
        }
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            usize::from(first)
        } else {
            let n = usize::from(first & 0x7f);
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let (bytes, after) = rest.split_at(n);
            rest = after;
            bytes
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b))
        };
        if rest.len() < len {
            return None;
        }
        let header = all.len() - rest.len();
        let (whole, remaining) = all.split_at(header + len);
        *input = remaining;
        Some(Tlv {
            tag,
            contents: &whole[header..],
            whole,
        })
    }

    fn expect<'a>(input: &mut &'a [u8], tag: u8) -> Option<Tlv<'a>> {
        read(input).filter(|tlv| tlv.tag == tag)
    }

    /// The fields of a certificate that reloading a CA needs.
    pub(super) struct CertFields<'a> {
        /// The whole issuer Name, tag included. Only tests read it, to check that an
        /// issued certificate names its CA.
        #[cfg_attr(not(test), allow(dead_code))]
        pub issuer: &'a [u8],
        /// The whole subject Name, tag included: what an issued certificate's issuer
        /// must equal byte for byte.
        pub subject: &'a [u8],
        pub subject_contents: &'a [u8],
        /// The whole SubjectPublicKeyInfo.
        pub public_key_info: &'a [u8],
        pub extensions: Extensions<'a>,
    }

    /// The extensions reloading a CA needs; the rest are skipped.
    #[derive(Default)]
    pub(super) struct Extensions<'a> {
        /// Basic constraints say cA=TRUE.
        pub is_ca: bool,
        pub subject_key_id: Option<&'a [u8]>,
        /// The key id of the issuer. Only tests read it, to check that an issued
        /// certificate points at its CA's key the way the CA names it.
        #[cfg_attr(not(test), allow(dead_code))]
        pub authority_key_id: Option<&'a [u8]>,
        /// The URIs among the subject alt names (a node certificate's id).
        pub uris: Vec<&'a str>,
    }

    impl<'a> CertFields<'a> {
        pub fn parse(der: &'a [u8]) -> Option<CertFields<'a>> {
            let mut input = der;
            let mut certificate = expect(&mut input, SEQUENCE)?.contents;
            let mut tbs = expect(&mut certificate, SEQUENCE)?.contents;
            let mut serial = read(&mut tbs)?;
            if serial.tag == VERSION {
                serial = read(&mut tbs)?;
            }
            if serial.tag != INTEGER {
                return None;
            }
            let _signature_algorithm = expect(&mut tbs, SEQUENCE)?;
            let issuer = expect(&mut tbs, SEQUENCE)?;
            let _validity = expect(&mut tbs, SEQUENCE)?;
            let subject = expect(&mut tbs, SEQUENCE)?;
            let public_key_info = expect(&mut tbs, SEQUENCE)?;
            let mut extensions = Extensions::default();
            while let Some(field) = read(&mut tbs) {
                if field.tag == EXTENSIONS {
                    extensions = Extensions::parse(field.contents)?;
                }
            }
            Some(CertFields {
                issuer: issuer.whole,
                subject: subject.whole,
                subject_contents: subject.contents,
                public_key_info: public_key_info.whole,
                extensions,
            })
        }
    }

    impl<'a> Extensions<'a> {
        /// Reads `[3] EXPLICIT SEQUENCE OF Extension`.
        fn parse(explicit: &'a [u8]) -> Option<Extensions<'a>> {
            let mut found = Extensions::default();
            let mut outer = explicit;
            let mut extensions = expect(&mut outer, SEQUENCE)?.contents;
            while !extensions.is_empty() {
                let mut extension = expect(&mut extensions, SEQUENCE)?.contents;
                let oid = expect(&mut extension, OID)?;
                let mut value = read(&mut extension)?;
                if value.tag == BOOLEAN {
                    value = read(&mut extension)?;
                }
                if value.tag != OCTET_STRING {
                    return None;
                }
                let mut value = value.contents;
                match oid.contents {
                    BASIC_CONSTRAINTS => {
                        let mut constraints = expect(&mut value, SEQUENCE)?.contents;
                        found.is_ca = match read(&mut constraints) {
                            Some(ca) if ca.tag == BOOLEAN => ca.contents.iter().any(|&b| b != 0),
                            // cA is DEFAULT FALSE, so DER omits it when false.
                            _ => false,
                        };
                    }
                    SUBJECT_KEY_ID => {
                        found.subject_key_id = Some(expect(&mut value, OCTET_STRING)?.contents);
                    }
                    AUTHORITY_KEY_ID => {
                        let mut fields = expect(&mut value, SEQUENCE)?.contents;
                        found.authority_key_id = expect(&mut fields, KEY_ID).map(|id| id.contents);
                    }
                    SUBJECT_ALT_NAME => {
                        let mut names = expect(&mut value, SEQUENCE)?.contents;
                        while !names.is_empty() {
                            let name = read(&mut names)?;
                            if name.tag == URI {
                                found.uris.push(std::str::from_utf8(name.contents).ok()?);
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(found)
        }
    }

    /// The contents of a Name (`SEQUENCE OF SET OF AttributeTypeAndValue`) as rcgen's
    /// type. `None` for what rcgen cannot write back identically: multi-valued RDNs, a
    /// repeated attribute type, string types other than UTF8, Printable and IA5.
    pub(super) fn distinguished_name(mut name: &[u8]) -> Option<DistinguishedName> {
        let mut dn = DistinguishedName::new();
        while !name.is_empty() {
            let mut rdn = expect(&mut name, SET)?.contents;
            let mut pair = expect(&mut rdn, SEQUENCE)?.contents;
            if !rdn.is_empty() {
                return None;
            }
            let ty = DnType::from_oid(&oid_arcs(expect(&mut pair, OID)?.contents)?);
            let value = read(&mut pair)?;
            let text = String::from_utf8(value.contents.to_vec()).ok()?;
            let value = match value.tag {
                UTF8_STRING => DnValue::Utf8String(text),
                PRINTABLE_STRING => DnValue::PrintableString(text.try_into().ok()?),
                IA5_STRING => DnValue::Ia5String(text.try_into().ok()?),
                _ => return None,
            };
            if dn.get(&ty).is_some() {
                return None;
            }
            dn.push(ty, value);
        }
        Some(dn)
    }

    fn oid_arcs(encoded: &[u8]) -> Option<Vec<u64>> {
        if encoded.last()? & 0x80 != 0 {
            return None;
        }
        let mut subidentifiers = Vec::new();
        let mut current: u64 = 0;
        for &b in encoded {
            current = current.checked_mul(128)? | u64::from(b & 0x7f);
            if b & 0x80 == 0 {
                subidentifiers.push(current);
                current = 0;
            }
        }
        let (&first, rest) = subidentifiers.split_first()?;
        let mut arcs = match first {
            0..=39 => vec![0, first],
            40..=79 => vec![1, first - 40],
            _ => vec![2, first - 80],
        };
        arcs.extend_from_slice(rest);
        Some(arcs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use rustls::server::WebPkiClientVerifier;
    use rustls::{ClientConfig, RootCertStore, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
        let certs = rustls_pemfile::certs(&mut pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(certs.len(), 1, "one certificate per PEM");
        certs
    }

    fn key(pem: &str) -> PrivateKeyDer<'static> {
        rustls_pemfile::private_key(&mut pem.as_bytes())
            .unwrap()
            .expect("a private key")
    }

    fn roots(ca_pem: &str) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for cert in certs(ca_pem) {
            roots.add(cert).unwrap();
        }
        Arc::new(roots)
    }

    /// A server that trusts `server_ca` for client certificates and presents `server`.
    fn server_config(server_ca: &str, server: &IssuedCert) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots(server_ca), provider.clone())
                .build()
                .unwrap();
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&server.cert_pem), key(&server.key_pem))
            .unwrap();
        Arc::new(config)
    }

    fn client_config(client_ca: &str, client: &IssuedCert) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots(client_ca))
            .with_client_auth_cert(certs(&client.cert_pem), key(&client.key_pem))
            .unwrap();
        Arc::new(config)
    }

    /// What each side of a handshake saw: the server the client's certificate or its error,
    /// the client whether the server's reply reached it.
    struct Handshake {
        server: Result<Vec<CertificateDer<'static>>, std::io::Error>,
        client: Result<(), std::io::Error>,
    }

    /// A mutual-TLS handshake over an in-memory pipe, followed by one request and reply,
    /// so a refusal that TLS 1.3 reports only after the client's Finished still shows up.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        server_name: &str,
    ) -> Handshake {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(client);
        let name = ServerName::try_from(server_name.to_owned()).unwrap();
        let server_side = async move {
            let mut tls = acceptor.accept(server_io).await?;
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .map(|c| c.to_vec())
                .unwrap_or_default();
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await?;
            tls.write_all(b"pong").await?;
            tls.shutdown().await?;
            Ok(peer)
        };
        let client_side = async move {
            let mut tls = connector.connect(name, client_io).await?;
            tls.write_all(b"ping").await?;
            let mut pong = [0u8; 4];
            tls.read_exact(&mut pong).await?;
            assert_eq!(&pong, b"pong");
            Ok(())
        };
        let (server, client) = tokio::join!(server_side, client_side);
        Handshake { server, client }
    }

    fn sans(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn issued_certs_authenticate_both_ends_of_a_mutual_tls_link() {
        let ca = CertAuthority::generate("test").unwrap();
        let node_a = ca
            .issue("node-a", 1, &sans(&["127.0.0.1", "node-a.internal"]))
            .unwrap();
        let node_b = ca.issue("node-b", 2, &sans(&["127.0.0.2"])).unwrap();
        // node-b dials node-a, then the other way round: each certificate serves as both
        // server and client identity.
        for (server, client, name) in [
            (&node_a, &node_b, "127.0.0.1"),
            (&node_a, &node_b, "node-a.internal"),
            (&node_b, &node_a, "127.0.0.2"),
        ] {
            let result = handshake(
                server_config(&ca.cert_pem(), server),
                client_config(&ca.cert_pem(), client),
                name,
            )
            .await;
            let peer = result.server.expect("server accepts the client");
            result.client.expect("client accepts the server");
            assert_eq!(
                peer,
                certs(&client.cert_pem),
                "server saw the client's cert"
            );
        }
    }

    #[tokio::test]
    async fn a_client_cert_from_another_ca_is_refused() {
        let ca = CertAuthority::generate("prod").unwrap();
        let other = CertAuthority::generate("prod").unwrap();
        let server = ca.issue("node-a", 1, &sans(&["127.0.0.1"])).unwrap();
        // Same cluster name, so the same CA subject: only the signature tells them apart.
        let intruder = other.issue("node-b", 2, &sans(&["127.0.0.2"])).unwrap();
        let result = handshake(
            server_config(&ca.cert_pem(), &server),
            client_config(&ca.cert_pem(), &intruder),
            "127.0.0.1",
        )
        .await;
        let err = result.server.expect_err("server must refuse the client");
        assert!(
            err.to_string().contains("BadSignature") || err.to_string().contains("UnknownIssuer"),
            "{err}"
        );
        assert!(result.client.is_err(), "client is told");
    }

    #[tokio::test]
    async fn a_server_is_accepted_only_under_a_name_in_its_sans() {
        let ca = CertAuthority::generate("test").unwrap();
        let node_a = ca
            .issue("node-a", 1, &sans(&["127.0.0.1", "node-a.internal"]))
            .unwrap();
        let node_b = ca.issue("node-b", 2, &sans(&["127.0.0.2"])).unwrap();
        for wrong in ["127.0.0.9", "node-b.internal", "node-a"] {
            let result = handshake(
                server_config(&ca.cert_pem(), &node_a),
                client_config(&ca.cert_pem(), &node_b),
                wrong,
            )
            .await;
            let err = result.client.expect_err(wrong);
            assert!(
                err.to_string().contains("not valid for name"),
                "{wrong}: {err}"
            );
        }
    }

    #[tokio::test]
    async fn a_ca_reloaded_from_pem_issues_certs_that_chain_to_the_original() {
        let original = CertAuthority::generate("reload").unwrap();
        let reloaded = CertAuthority::from_pem(&original.cert_pem(), &original.key_pem()).unwrap();
        assert_eq!(reloaded.cert_pem(), original.cert_pem());
        let server = reloaded.issue("node-a", 1, &sans(&["127.0.0.1"])).unwrap();
        let client = reloaded.issue("node-b", 2, &sans(&["127.0.0.2"])).unwrap();
        let old_client = original.issue("node-c", 3, &sans(&["127.0.0.3"])).unwrap();
        for client in [&client, &old_client] {
            // Both sides trust only the original CA certificate.
            let result = handshake(
                server_config(&original.cert_pem(), &server),
                client_config(&original.cert_pem(), client),
                "127.0.0.1",
            )
            .await;
            result.server.expect("server accepts");
            result.client.expect("client accepts");
        }
        let ca_der = certs(&original.cert_pem()).remove(0);
        let node_der = certs(&server.cert_pem).remove(0);
        assert_eq!(
            der::CertFields::parse(&node_der).unwrap().issuer,
            der::CertFields::parse(&ca_der).unwrap().subject,
            "issued by the original CA's name"
        );
        assert_eq!(
            der::CertFields::parse(&node_der)
                .unwrap()
                .extensions
                .authority_key_id,
            der::CertFields::parse(&ca_der)
                .unwrap()
                .extensions
                .subject_key_id,
            "points at the original CA's key id"
        );
    }

    #[tokio::test]
    async fn a_ca_made_elsewhere_with_a_longer_name_reloads() {
        // As an operator's own tooling might make it: several attributes, and a
        // PrintableString where rcgen would write UTF8String.
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CountryName,
            DnValue::PrintableString("SE".try_into().unwrap()),
        );
        name.push(DnType::OrganizationName, "Exempel AB");
        name.push(DnType::CommonName, "Exempel internal CA");
        let mut params = CertificateParams::default();
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Twenty bytes, as OpenSSL's SHA-1 key ids are; not what rcgen would derive.
        let key_id: Vec<u8> = (1..=20).collect();
        params.key_identifier_method = KeyIdMethod::PreSpecified(key_id.clone());
        let ca_pem = params.self_signed(&key).unwrap().pem();
        let ca = CertAuthority::from_pem(&ca_pem, &key.serialize_pem()).unwrap();
        let server = ca.issue("node-a", 1, &sans(&["127.0.0.1"])).unwrap();
        let client = ca.issue("node-b", 2, &sans(&["127.0.0.2"])).unwrap();
        let result = handshake(
            server_config(&ca_pem, &server),
            client_config(&ca_pem, &client),
            "127.0.0.1",
        )
        .await;
        result.server.expect("server accepts");
        result.client.expect("client accepts");
        let node_der = certs(&server.cert_pem).remove(0);
        let node = der::CertFields::parse(&node_der).unwrap();
        assert_eq!(node.extensions.authority_key_id, Some(&key_id[..]));
    }

    #[test]
    fn a_generated_ca_is_a_ca_named_after_its_cluster() {
        let ca = CertAuthority::generate("east").unwrap();
        let der = certs(&ca.cert_pem()).remove(0);
        let fields = der::CertFields::parse(&der).unwrap();
        assert!(fields.extensions.is_ca);
        let name = der::distinguished_name(fields.subject_contents).unwrap();
        assert_eq!(
            name.get(&DnType::CommonName),
            Some(&DnValue::Utf8String("Tandem cluster CA east".to_owned()))
        );
        assert!(format!("{ca:?}").contains("Tandem cluster CA east"));
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        assert!(ca.key_pem().starts_with("-----BEGIN PRIVATE KEY-----"));
    }

    #[test]
    fn from_pem_refuses_a_mismatched_key_a_non_ca_and_garbage() {
        let ca = CertAuthority::generate("a").unwrap();
        let other = CertAuthority::generate("b").unwrap();
        let err = CertAuthority::from_pem(&ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");

        let node = ca.issue("node-a", 1, &sans(&["127.0.0.1"])).unwrap();
        let err = CertAuthority::from_pem(&node.cert_pem, &node.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        let err = CertAuthority::from_pem("hello", &ca.key_pem()).unwrap_err();
        assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");
        let err = CertAuthority::from_pem(&ca.key_pem(), &ca.key_pem()).unwrap_err();
        assert!(err.to_string().contains("no PEM CERTIFICATE"), "{err}");
        let err = CertAuthority::from_pem(&ca.cert_pem(), &ca.cert_pem()).unwrap_err();
        assert!(err.to_string().contains("CA key"), "{err}");
        let both = format!("{}{}", ca.cert_pem(), other.cert_pem());
        let err = CertAuthority::from_pem(&both, &ca.key_pem()).unwrap_err();
        assert!(err.to_string().contains("more than one"), "{err}");
    }

    #[test]
    fn issue_refuses_sans_a_peer_could_never_match() {
        let ca = CertAuthority::generate("a").unwrap();
        for bad in ["", "bad name", "nöde.example", "a..b"] {
            let err = ca.issue("node-a", 1, &sans(&[bad])).unwrap_err();
            assert!(err.to_string().contains("neither an IP"), "{bad:?}: {err}");
        }
        let err = ca.issue("node-a", 1, &[]).unwrap_err();
        assert!(err.to_string().contains("at least one"), "{err}");
        ca.issue(
            "node-a",
            1,
            &sans(&["::1", "10.0.0.1", "node-a.example.com", "localhost"]),
        )
        .unwrap();
    }

    #[test]
    fn a_node_certificate_names_its_node_id_and_nothing_else_is_taken_for_one() {
        let ca = CertAuthority::generate("a").unwrap();
        let node = ca.issue("node-a", 7, &sans(&["127.0.0.1"])).unwrap();
        assert_eq!(node_id_of(&certs(&node.cert_pem)[0]), Some(7));
        assert_eq!(
            node_id_of(&certs(&ca.cert_pem())[0]),
            None,
            "the CA names none"
        );
        assert!(ca.issue("node-a", 0, &sans(&["127.0.0.1"])).is_err());
        assert_eq!(node_id_of(b"not a certificate"), None);
    }

    #[test]
    fn issued_debug_output_hides_the_key() {
        let ca = CertAuthority::generate("a").unwrap();
        let node = ca.issue("node-a", 1, &sans(&["127.0.0.1"])).unwrap();
        assert!(!format!("{node:?}").contains("PRIVATE"));
    }
}
