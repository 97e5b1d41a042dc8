//! Outpost's private PKI and mutual TLS.
//!
//! Identity lives in one SAN URI of each client certificate:
//! `outpost://agent/<node-id>` or `outpost://operator/<name>`. The aggregator
//! trusts that URI and nothing the peer says in its messages.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};
use tonic::transport::{Certificate, ClientTlsConfig, Identity as TlsIdentity, ServerTlsConfig};

const URI_PREFIX: &str = "outpost://";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} already exists; remove it or pick another --dir")]
    Exists { path: PathBuf },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: does not contain {what}")]
    NotPem { path: PathBuf, what: String },
    #[error("invalid identity name {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ -")]
    BadName(String),
}

/// Who a peer is, as its client certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Agent(String),
    Operator(String),
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Agent(id) => write!(f, "agent {id}"),
            Identity::Operator(name) => write!(f, "operator {name}"),
        }
    }
}

impl Identity {
    pub fn uri(&self) -> String {
        match self {
            Identity::Agent(id) => format!("{URI_PREFIX}agent/{id}"),
            Identity::Operator(name) => format!("{URI_PREFIX}operator/{name}"),
        }
    }

    fn from_uri(uri: &str) -> Option<Identity> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        let (role, name) = rest.split_once('/')?;
        if !valid_name(name) {
            return None;
        }
        match role {
            "agent" => Some(Identity::Agent(name.to_string())),
            "operator" => Some(Identity::Operator(name.to_string())),
            _ => None,
        }
    }

    /// Reads the identity from a DER certificate that TLS already verified
    /// against the CA.
    pub fn from_der(der: &[u8]) -> Option<Identity> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Identity::from_uri(uri),
            _ => None,
        })
    }
}

/// When a DER certificate stops being valid, in Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// When a certificate expires (Unix s) and its serial number, from one
/// parse of its DER encoding.
pub fn expiry_and_serial(der: &[u8]) -> Option<(i64, Vec<u8>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((
        cert.validity().not_after.timestamp(),
        cert.raw_serial().to_vec(),
    ))
}

/// The serials every revocation list in a PEM file revokes.
pub fn revoked_serials(path: &Path) -> Result<std::collections::HashSet<Vec<u8>>, TlsError> {
    let pem = fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let not_crl = || TlsError::NotPem {
        path: path.to_path_buf(),
        what: "a revocation list".into(),
    };
    let mut serials = std::collections::HashSet::new();
    for block in x509_parser::pem::Pem::iter_from_buffer(&pem) {
        let block = block.map_err(|_| not_crl())?;
        let (_, crl) = x509_parser::parse_x509_crl(&block.contents).map_err(|_| not_crl())?;
        serials.extend(
            crl.iter_revoked_certificates()
                .map(|r| r.raw_serial().to_vec()),
        );
    }
    Ok(serials)
}

/// `not_after` of the first certificate in a PEM file.
pub fn pem_not_after(path: &Path) -> Option<i64> {
    let pem = fs::read(path).ok()?;
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    not_after(&parsed.contents)
}

/// Certificates are warned about this long before they expire...
pub const EXPIRY_WARN_SECS: i64 = 30 * 86_400;
/// ... and raise a finding this long before.
pub const EXPIRY_FINDING_SECS: i64 = 7 * 86_400;

/// Logs a certificate's coming expiry: a warning inside 30 days, an error
/// inside 7 or once it has passed. Returns the days left.
pub fn log_expiry(what: &str, path: &Path, not_after: i64, now_s: i64) -> i64 {
    let left = not_after - now_s;
    let days = left.div_euclid(86_400);
    if left <= EXPIRY_FINDING_SECS {
        tracing::error!(certificate = %path.display(), days_left = days, "{what} expires in {days} days: renew it");
    } else if left <= EXPIRY_WARN_SECS {
        tracing::warn!(certificate = %path.display(), days_left = days, "{what} expires in {days} days");
    }
    days
}

/// Node ids and operator names: short, printable, safe in file names and keys.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// File names inside a PKI directory made by `outpost certs`.
pub struct PkiLayout {
    pub dir: PathBuf,
}

impl PkiLayout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        PkiLayout { dir: dir.into() }
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.pem"))
    }
    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }
    /// The revocation list `outpost certs revoke` writes (`tls.crl`).
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
}

fn validity(days: i64) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (now - Duration::hours(1), now + Duration::days(days))
}

/// Creates a CA and the aggregator's server certificate in `dir`.
/// Returns the paths written.
pub fn init_pki(dir: &Path, extra_sans: &[String], days: i64) -> Result<Vec<PathBuf>, TlsError> {
    let pki = PkiLayout::new(dir);
    none_exist([pki.ca_cert(), pki.ca_key()])?;
    fs::create_dir_all(dir).map_err(|source| TlsError::Io {
        path: dir.to_path_buf(),
        source,
    })?;

    let mut ca = CertificateParams::default();
    ca.distinguished_name.push(DnType::CommonName, "Outpost CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (ca.not_before, ca.not_after) = validity(days.max(3650));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write_file(&pki.ca_cert(), ca_cert.pem().as_bytes(), 0o644)?;
    write_file(&pki.ca_key(), ca_key.serialize_pem().as_bytes(), 0o600)?;

    let mut sans = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    sans.extend(extra_sans.iter().cloned());
    let issuer = Issuer::new(ca, ca_key);
    let mut written = vec![pki.ca_cert(), pki.ca_key()];
    written.extend(issue_server(&pki, &issuer, "aggregator", &sans, days)?);
    Ok(written)
}

/// Issues the server certificate of one more aggregator (of a pair or a
/// shard), signed by the CA in `dir`: `aggregator-<name>.pem/.key`, valid
/// for `name` and every extra name or address in `sans`.
pub fn issue_aggregator(
    dir: &Path,
    name: &str,
    extra_sans: &[String],
    days: i64,
) -> Result<Vec<PathBuf>, TlsError> {
    let stem = format!("aggregator-{name}");
    let (pki, issuer) = issuer_for(dir, name, &stem)?;
    let mut sans = vec![name.to_string()];
    sans.extend(extra_sans.iter().filter(|s| *s != name).cloned());
    issue_server(&pki, &issuer, &stem, &sans, days)
}

/// Refuses to write over a certificate or key that is there already.
fn none_exist(paths: [PathBuf; 2]) -> Result<(), TlsError> {
    match paths.into_iter().find(|p| p.exists()) {
        Some(path) => Err(TlsError::Exists { path }),
        None => Ok(()),
    }
}

/// The CA in `dir`, to issue `stem`'s certificate for `name` with: refused
/// for a name unfit for a file or URI, or a stem already issued.
fn issuer_for(
    dir: &Path,
    name: &str,
    stem: &str,
) -> Result<(PkiLayout, Issuer<'static, KeyPair>), TlsError> {
    if !valid_name(name) {
        return Err(TlsError::BadName(name.to_string()));
    }
    let pki = PkiLayout::new(dir);
    none_exist([pki.cert(stem), pki.key(stem)])?;
    let issuer = load_issuer(&pki)?;
    Ok((pki, issuer))
}

fn load_issuer(pki: &PkiLayout) -> Result<Issuer<'static, KeyPair>, TlsError> {
    let ca_pem = read_to_string(&pki.ca_cert())?;
    let key_pem = read_to_string(&pki.ca_key())?;
    let key = KeyPair::from_pem(&key_pem)?;
    Ok(Issuer::from_ca_cert_pem(&ca_pem, key)?)
}

fn issue_server(
    pki: &PkiLayout,
    issuer: &Issuer<'_, KeyPair>,
    stem: &str,
    sans: &[String],
    days: i64,
) -> Result<Vec<PathBuf>, TlsError> {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "Outpost aggregator");
    params.subject_alt_names = sans
        .iter()
        .map(|s| match s.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(s.as_str().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = validity(days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, issuer)?;
    write_file(&pki.cert(stem), cert.pem().as_bytes(), 0o644)?;
    write_file(&pki.key(stem), key.serialize_pem().as_bytes(), 0o600)?;
    Ok(vec![pki.cert(stem), pki.key(stem)])
}

/// The file stem of an identity's certificate and key.
pub fn stem(identity: &Identity) -> String {
    match identity {
        Identity::Agent(id) => format!("agent-{id}"),
        Identity::Operator(n) => format!("operator-{n}"),
    }
}

/// How long a revocation list says it is current; the aggregator does not
/// refuse an older one (a lapsed list still lists what it revoked).
const CRL_DAYS: i64 = 365;

/// Adds the certificate of `identity` in `dir` to the CA's revocation list
/// `crl.pem` there (made on first use), keeping what it already lists.
/// Returns the list's path. Aggregators with `tls.crl` pointing at a copy of
/// it refuse the certificate at the handshake once they reload (SIGHUP).
pub fn revoke(dir: &Path, identity: &Identity) -> Result<PathBuf, TlsError> {
    use rcgen::{CertificateRevocationListParams, KeyIdMethod, RevokedCertParams, SerialNumber};
    let pki = PkiLayout::new(dir);
    let cert_path = pki.cert(&stem(identity));
    let pem = fs::read(&cert_path).map_err(|source| TlsError::Io {
        path: cert_path.clone(),
        source,
    })?;
    let not_cert = || TlsError::NotPem {
        path: cert_path.clone(),
        what: "a PEM certificate".into(),
    };
    let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).map_err(|_| not_cert())?;
    let cert = parsed.parse_x509().map_err(|_| not_cert())?;
    let serial = cert.raw_serial().to_vec();
    let now = OffsetDateTime::now_utc();
    let mut revoked = Vec::new();
    let mut number = 1u64;
    let crl_path = pki.crl();
    if crl_path.exists() {
        let text = fs::read(&crl_path).map_err(|source| TlsError::Io {
            path: crl_path.clone(),
            source,
        })?;
        let not_crl = || TlsError::NotPem {
            path: crl_path.clone(),
            what: "a PEM revocation list".into(),
        };
        let (_, pem) = x509_parser::pem::parse_x509_pem(&text).map_err(|_| not_crl())?;
        let (_, crl) =
            <x509_parser::revocation_list::CertificateRevocationList as x509_parser::prelude::FromDer<_>>::from_der(&pem.contents)
                .map_err(|_| not_crl())?;
        number = crl
            .crl_number()
            .map_or(0, |n| n.to_u64_digits().first().copied().unwrap_or(0))
            + 1;
        for r in crl.iter_revoked_certificates() {
            revoked.push(RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                    .unwrap_or(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    if !revoked
        .iter()
        .any(|r| r.serial_number.as_ref() == serial.as_slice())
    {
        revoked.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial),
            revocation_time: now,
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = CertificateRevocationListParams {
        this_update: now - Duration::minutes(5),
        next_update: now + Duration::days(CRL_DAYS),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: revoked,
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&load_issuer(&pki)?)?;
    let tmp = dir.join(".crl.pem.tmp");
    let _ = fs::remove_file(&tmp);
    write_file(&tmp, crl.pem()?.as_bytes(), 0o644)?;
    fs::rename(&tmp, &crl_path).map_err(|source| TlsError::Io {
        path: crl_path.clone(),
        source,
    })?;
    Ok(crl_path)
}

/// Issues a client certificate for an agent or an operator, signed by the CA
/// in `dir`. Files are named `agent-<id>.pem/.key` or `operator-<name>.pem/.key`.
pub fn issue_client(dir: &Path, identity: &Identity, days: i64) -> Result<Vec<PathBuf>, TlsError> {
    issue_client_between(dir, identity, validity(days))
}

/// `issue_client`, valid from `.0` until `.1`.
pub fn issue_client_between(
    dir: &Path,
    identity: &Identity,
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<Vec<PathBuf>, TlsError> {
    let stem = stem(identity);
    let name = match identity {
        Identity::Agent(id) | Identity::Operator(id) => id,
    };
    let (pki, issuer) = issuer_for(dir, name, &stem)?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, identity.to_string());
    params.subject_alt_names = vec![SanType::URI(identity.uri().as_str().try_into()?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    (params.not_before, params.not_after) = (not_before, not_after);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    write_file(&pki.cert(&stem), cert.pem().as_bytes(), 0o644)?;
    write_file(&pki.key(&stem), key.serialize_pem().as_bytes(), 0o600)?;
    Ok(vec![pki.cert(&stem), pki.key(&stem)])
}

fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn read_to_string(path: &Path) -> Result<String, TlsError> {
    fs::read_to_string(path).map_err(|source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The files a TLS endpoint needs.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The aggregator's side: a PEM certificate revocation list by the CA
    /// (`outpost certs revoke`); client certificates it lists are refused
    /// at the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads the three PEM files, checking that each holds what it should.
    pub(crate) fn read(&self) -> Result<(String, String, String), TlsError> {
        let pem = |path: &Path, marker: &str, what: &str| -> Result<String, TlsError> {
            let text = read_to_string(path)?;
            if text.contains(marker) {
                Ok(text)
            } else {
                Err(TlsError::NotPem {
                    path: path.to_path_buf(),
                    what: what.to_string(),
                })
            }
        };
        Ok((
            pem(&self.ca, "-----BEGIN CERTIFICATE-----", "a PEM certificate")?,
            pem(
                &self.cert,
                "-----BEGIN CERTIFICATE-----",
                "a PEM certificate",
            )?,
            pem(&self.key, "PRIVATE KEY-----", "a PEM private key")?,
        ))
    }

    /// Server side: present our cert, and verify client certs against the CA
    /// when one is offered. Client certs are optional at the TLS layer so that
    /// a caller without one gets a gRPC status that says so; every service
    /// checks the identity itself.
    pub fn server_config(&self) -> Result<ServerTlsConfig, TlsError> {
        let (ca, cert, key) = self.read()?;
        Ok(ServerTlsConfig::new()
            .identity(TlsIdentity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca))
            .client_auth_optional(true))
    }

    pub fn client_config(&self, domain: &str) -> Result<ClientTlsConfig, TlsError> {
        let (ca, cert, key) = self.read()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(TlsIdentity::from_pem(cert, key))
            .domain_name(domain))
    }

    /// The identity in our own certificate (agents check it against node_id).
    pub fn own_identity(&self) -> Result<Option<Identity>, TlsError> {
        let pem = fs::read(&self.cert).map_err(|source| TlsError::Io {
            path: self.cert.clone(),
            source,
        })?;
        let Ok((_, parsed)) = x509_parser::pem::parse_x509_pem(&pem) else {
            return Ok(None);
        };
        Ok(Identity::from_der(&parsed.contents))
    }
}

/// Call once at start-up: rustls needs exactly one process-wide crypto provider.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serial_of(path: &Path) -> Vec<u8> {
        let pem = fs::read(path).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        expiry_and_serial(&parsed.contents).unwrap().1
    }

    #[test]
    fn a_revocation_list_names_the_serials_it_revokes() {
        let dir = tempfile::tempdir().unwrap();
        init_pki(dir.path(), &[], 30).unwrap();
        let pki = PkiLayout::new(dir.path());
        for node in ["node-1", "node-2"] {
            issue_client(dir.path(), &Identity::Agent(node.into()), 30).unwrap();
        }
        let crl = revoke(dir.path(), &Identity::Agent("node-2".into())).unwrap();
        let revoked = revoked_serials(&crl).unwrap();
        assert!(revoked.contains(&serial_of(&pki.cert("agent-node-2"))));
        assert!(!revoked.contains(&serial_of(&pki.cert("agent-node-1"))));
        // Not a revocation list: a one-line error naming the file.
        let e = revoked_serials(&pki.cert("agent-node-1")).unwrap_err();
        assert!(e.to_string().contains("agent-node-1"), "{e}");
    }

    #[test]
    fn each_aggregator_gets_a_certificate_for_its_own_names() {
        let dir = tempfile::tempdir().unwrap();
        // Without a CA there is nothing to sign with: the error names the file.
        let e = issue_aggregator(dir.path(), "agg-b", &[], 30).unwrap_err();
        assert!(e.to_string().contains("ca.pem"), "{e}");
        init_pki(dir.path(), &[], 30).unwrap();
        let sans = ["10.0.0.7".to_string(), "agg-b.example.net".to_string()];
        issue_aggregator(dir.path(), "agg-b", &sans, 30).unwrap();
        let pki = PkiLayout::new(dir.path());
        let pem = fs::read(pki.cert("aggregator-agg-b")).unwrap();
        let (_, parsed) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        let cert = parsed.parse_x509().unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            names,
            [
                "DNSName(agg-b)",
                "IPAddress(0a:00:00:07)",
                "DNSName(agg-b.example.net)"
            ],
        );
        let ca_pem = fs::read(pki.ca_cert()).unwrap();
        let (_, ca) = x509_parser::pem::parse_x509_pem(&ca_pem).unwrap();
        let ca = ca.parse_x509().unwrap();
        assert_eq!(cert.issuer(), ca.subject());
        // A second run does not overwrite the key a host already has.
        let e = issue_aggregator(dir.path(), "agg-b", &[], 30).unwrap_err();
        assert!(e.to_string().contains("aggregator-agg-b"), "{e}");
        assert!(matches!(
            issue_aggregator(dir.path(), "../x", &[], 30),
            Err(TlsError::BadName(_))
        ));
    }
}
