//! Node identity on the wire: mutual TLS 1.3 (over QUIC) in which each side
//! proves its [`NodeId`], and only cluster members get past the handshake.
//!
//! Each node presents a self-signed certificate whose key is its ed25519
//! node key, so the certificate's subject public key *is* the node id. The
//! certificate chain and names mean nothing here: a peer is accepted when
//! its certificate holds an ed25519 key on the member list and the TLS 1.3
//! handshake signature verifies under that key (which proves it holds the
//! secret). Both sides check, so a non-member is refused whichever side
//! dials.

use std::collections::BTreeSet;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use weftlog_proto::{Keypair, NodeId};

/// The ALPN protocol both sides require.
pub const ALPN: &[u8] = b"weftlog/1";
/// The server name a client asks for; certificates are not checked against it.
pub const SERVER_NAME: &str = "weftlog";

/// Who may connect: the member list, or anyone (an open cluster, for demos).
#[derive(Clone, Debug)]
pub enum Members {
    /// Only these nodes.
    Only(Arc<BTreeSet<NodeId>>),
    /// Any node that proves its id.
    Anyone,
}

impl Members {
    /// Whether `id` may connect.
    pub fn admits(&self, id: &NodeId) -> bool {
        match self {
            Members::Only(set) => set.contains(id),
            Members::Anyone => true,
        }
    }

    /// Parses a member file: one node id (64 hex digits) per line; blank
    /// lines and lines starting with `#` are skipped. A node id that is not
    /// a usable key ([`NodeId::check_key`]: a weak or non-canonical one) is
    /// refused, naming the line.
    pub fn parse(text: &str) -> Result<Members, String> {
        let mut set = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let id = line.parse().map_err(|e| format!("line {}: {e}", i + 1))?;
            set.insert(id);
        }
        Ok(Members::Only(Arc::new(set)))
    }
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate could not be made.
    #[error("cannot make the node certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// The node's certificate and its private key (the node key, PKCS#8).
///
/// The certificate's serial number is `incarnation`: a random value each
/// time the node starts, which its peers read back
/// ([`incarnation`]) to tell a restarted node's new connection from a
/// duplicate of a live one.
pub fn node_certificate(
    key: &Keypair,
    incarnation: u64,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), TlsError> {
    // PKCS#8 v1 for an Ed25519 seed (RFC 8410): a fixed prefix and the seed.
    let mut pkcs8 = vec![
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    pkcs8.extend_from_slice(&key.secret());
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, key.node_id().to_string());
    // A positive serial: the top bit clear keeps DER from padding it.
    params.serial_number = Some(rcgen::SerialNumber::from_slice(
        &(incarnation & (u64::MAX >> 1)).to_be_bytes(),
    ));
    let cert = params.self_signed(&pair)?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(der)))
}

/// The node id a certificate holds: its subject public key, which must be
/// a usable ed25519 key ([`NodeId::check_key`]).
pub fn node_id_of(cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
    let bad = |why: &str| rustls::Error::General(format!("peer certificate: {why}"));
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|_| bad("not a DER X.509 certificate"))?;
    let spki = x509.public_key();
    // id-Ed25519, RFC 8410.
    if spki.algorithm.algorithm.to_id_string() != "1.3.101.112" {
        return Err(bad("the key is not ed25519"));
    }
    let key: [u8; 32] = spki
        .subject_public_key
        .data
        .as_ref()
        .try_into()
        .map_err(|_| bad("the ed25519 key is not 32 bytes"))?;
    let id = NodeId(key);
    // A weak key proves nothing: anyone can sign under it.
    id.check_key().map_err(|e| bad(&e.to_string()))?;
    Ok(id)
}

/// The node id the peer of a connection proved in the handshake.
pub fn peer_id(conn: &quinn::Connection) -> Option<NodeId> {
    node_id_of(&peer_certificate(conn)?).ok()
}

/// The peer's incarnation: its certificate's serial number, which changes
/// every time the peer process starts ([`node_certificate`]).
pub fn incarnation(conn: &quinn::Connection) -> Option<u64> {
    let cert = peer_certificate(conn)?;
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let raw = x509.raw_serial();
    let tail = &raw[raw.len().saturating_sub(8)..];
    let mut b = [0u8; 8];
    b[8 - tail.len()..].copy_from_slice(tail);
    Some(u64::from_be_bytes(b))
}

fn peer_certificate(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    certs.first().cloned()
}

/// Checks peers against the member list, for both ends of a connection.
#[derive(Debug)]
struct MemberVerifier {
    members: Members,
    provider: Arc<CryptoProvider>,
}

impl MemberVerifier {
    fn admit(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let id = node_id_of(cert)?;
        if self.members.admits(&id) {
            Ok(())
        } else {
            tracing::warn!(peer = %id, "refused a peer that is not a member");
            Err(rustls::Error::General(format!("node {id} is not a member")))
        }
    }

    // The same handshake signature checks serve both ends; only TLS 1.3 is
    // offered, so the TLS 1.2 one is there for the traits' sake.
    fn tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        // Node keys are ed25519: nothing else can prove a node id.
        vec![SignatureScheme::ED25519]
    }
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.admit(end_entity)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for MemberVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.admit(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

fn verifier(members: Members) -> (Arc<MemberVerifier>, Arc<CryptoProvider>) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    (
        Arc::new(MemberVerifier {
            members,
            provider: provider.clone(),
        }),
        provider,
    )
}

/// The QUIC server configuration of a node: it requires a member's
/// certificate from every client.
pub fn server_config(
    key: &Keypair,
    members: Members,
    incarnation: u64,
) -> Result<quinn::ServerConfig, TlsError> {
    let (cert, secret) = node_certificate(key, incarnation)?;
    let (verifier, provider) = verifier(members);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], secret)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// The QUIC client configuration of a node: it presents the node's
/// certificate and accepts only a member's.
pub fn client_config(
    key: &Keypair,
    members: Members,
    incarnation: u64,
) -> Result<quinn::ClientConfig, TlsError> {
    let (cert, secret) = node_certificate(key, incarnation)?;
    let (verifier, provider) = verifier(members);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], secret)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The identity point: a key of order 1, under which anyone can sign.
    const IDENTITY: &str = "0100000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn a_member_list_with_a_weak_key_is_refused() {
        let a = Keypair::from_secret([1; 32]).node_id();
        let err =
            Members::parse(&format!("{a}\n# the next one is weak\n{IDENTITY}\n")).unwrap_err();
        assert_eq!(
            err,
            format!("line 3: node id {IDENTITY} is a weak (small-order) ed25519 key")
        );
        // y = p + 3: a point, but not its canonical encoding.
        let non_canonical = "f0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f";
        let err = Members::parse(non_canonical).unwrap_err();
        assert!(
            err.starts_with(&format!(
                "line 1: node id {non_canonical} is not a canonical point encoding"
            )),
            "{err}"
        );
    }

    /// The certificate `PROTOCOL.md` §9.8 describes: self-signed by the
    /// node key, CN the node id, one extension (subjectAltName `weftlog`),
    /// the incarnation as its serial, and the peer reads back both.
    #[test]
    fn the_node_certificate_is_as_protocol_md_says() {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        assert_eq!((ALPN, SERVER_NAME), (&b"weftlog/1"[..], "weftlog"));
        let key = Keypair::from_secret([5; 32]);
        let incarnation = 0x8123_4567_89ab_cdef;
        let (cert, _) = node_certificate(&key, incarnation).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).unwrap();
        assert_eq!(x509.version(), x509_parser::x509::X509Version::V3);
        assert_eq!(x509.subject(), x509.issuer());
        let cn = x509.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), key.node_id().to_string());
        assert_eq!(
            x509.public_key().algorithm.algorithm.to_id_string(),
            "1.3.101.112"
        );
        assert_eq!(
            x509.public_key().subject_public_key.data.as_ref(),
            &key.node_id().0
        );
        let exts = x509.extensions();
        assert_eq!(exts.len(), 1, "{exts:?}");
        match exts[0].parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                assert_eq!(san.general_names, vec![GeneralName::DNSName("weftlog")]);
            }
            other => panic!("unexpected extension {other:?}"),
        }
        // The top bit is cleared: a positive serial below 2^63.
        let serial = incarnation & (u64::MAX >> 1);
        assert_eq!(x509.raw_serial(), &serial.to_be_bytes()[..]);
        assert_eq!(node_id_of(&cert).unwrap(), key.node_id());
    }

    #[test]
    fn a_certificate_with_a_weak_key_proves_no_node_id() {
        let key = Keypair::from_secret([5; 32]);
        let (cert, _) = node_certificate(&key, 7).unwrap();
        assert_eq!(node_id_of(&cert).unwrap(), key.node_id());
        // The same certificate with its subject key replaced by the
        // identity point (the signature over it is not what is checked here).
        let der = cert.as_ref().to_vec();
        let id = key.node_id().0;
        let at = der
            .windows(32)
            .position(|w| w == id)
            .expect("the certificate holds the key");
        let mut weak = der.clone();
        weak[at..at + 32].copy_from_slice(&NodeId([0; 32]).0);
        weak[at] = 1;
        let err = node_id_of(&CertificateDer::from(weak))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "peer certificate: node id {IDENTITY} is a weak (small-order) ed25519 key"
            )),
            "{err}"
        );
    }
}
