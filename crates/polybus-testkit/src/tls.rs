//! A throw-away PKI for TLS tests, generated with [rcgen](https://docs.rs/rcgen) (ECDSA P-256,
//! valid for two days): one piece of code for every broker's TLS, mutual TLS and refusal tests.
//!
//! [`TestPki::generate`] writes PEM files into a fresh temporary directory (removed on drop):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca-key.pem` | the test CA |
//! | `server.pem`, `server-key.pem` | server certificate for `127.0.0.1` and `localhost`, signed by the CA |
//! | `wrong-host.pem`, `wrong-host-key.pem` | server certificate for `not-this-host.invalid` only, signed by the CA: a client connecting to 127.0.0.1 must refuse it |
//! | `client.pem`, `client-key.pem` | client certificate (`CN=polybus-client`), signed by the CA |
//! | `other-ca.pem` | an unrelated CA: trusting only it must make the handshake fail |
//! | `other-client.pem`, `other-client-key.pem` | client certificate signed by the other CA: a broker that verifies clients must refuse it |
//!
//! Keys are PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), which nats-server, mosquitto,
//! librdkafka, rustls and tansu read.
//!
//! ```
//! let pki = polybus_testkit::tls::TestPki::generate()?;
//! assert!(pki.ca().exists() && pki.server_cert().exists() && pki.client_key().exists());
//! assert!(std::fs::read_to_string(pki.ca())?.starts_with("-----BEGIN CERTIFICATE-----"));
//! # Ok::<(), anyhow::Error>(())
//! ```

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// Certificates and keys for one test, in a temporary directory (see the [module docs](self)).
#[derive(Debug)]
pub struct TestPki {
    dir: tempfile::TempDir,
}

/// A CA that signs leaf certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(common_name: &str) -> Result<(Self, String, String)> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
        Ok((
            Ca {
                issuer: Issuer::new(params, key),
            },
            cert_pem,
            key_pem,
        ))
    }

    /// A leaf certificate for `names` (IP addresses or DNS names), for servers or clients.
    fn leaf(&self, common_name: &str, names: &[&str], server: bool) -> Result<(String, String)> {
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())?;
        params.distinguished_name = name(common_name);
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "polybus tests");
    dn
}

/// From yesterday (clock skew) to the day after tomorrow.
fn validity(params: &mut CertificateParams) {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let now = rcgen::date_time_ymd(1970, 1, 1) + since_epoch;
    params.not_before = now - std::time::Duration::from_secs(86_400);
    params.not_after = now + std::time::Duration::from_secs(2 * 86_400);
}

impl TestPki {
    /// Generates the CA, server and client certificates into a fresh temporary directory.
    ///
    /// # Errors
    /// Key generation or writing the files failed.
    pub fn generate() -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("polybus-pki-")
            .tempdir()
            .context("creating the PKI directory")?;
        let write = |file: &str, text: &str| -> Result<()> {
            std::fs::write(dir.path().join(file), text).with_context(|| format!("writing {file}"))
        };
        let (ca, ca_pem, ca_key) = Ca::new("polybus test CA")?;
        write("ca.pem", &ca_pem)?;
        write("ca-key.pem", &ca_key)?;
        let (cert, key) = ca.leaf("polybus-server", &["127.0.0.1", "localhost"], true)?;
        write("server.pem", &cert)?;
        write("server-key.pem", &key)?;
        let (cert, key) = ca.leaf("polybus-wrong-host", &["not-this-host.invalid"], true)?;
        write("wrong-host.pem", &cert)?;
        write("wrong-host-key.pem", &key)?;
        let (cert, key) = ca.leaf("polybus-client", &[], false)?;
        write("client.pem", &cert)?;
        write("client-key.pem", &key)?;
        let (other, other_pem, _) = Ca::new("polybus unrelated CA")?;
        write("other-ca.pem", &other_pem)?;
        let (cert, key) = other.leaf("polybus-intruder", &[], false)?;
        write("other-client.pem", &cert)?;
        write("other-client-key.pem", &key)?;
        Ok(TestPki { dir })
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `dir/file`.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The contents of `dir/file` (PEM text as bytes).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn read(&self, file: &str) -> Result<Vec<u8>> {
        std::fs::read(self.path(file)).with_context(|| format!("reading {file}"))
    }

    /// The test CA certificate (`ca.pem`).
    pub fn ca(&self) -> PathBuf {
        self.path("ca.pem")
    }
    /// An unrelated CA (`other-ca.pem`).
    pub fn other_ca(&self) -> PathBuf {
        self.path("other-ca.pem")
    }
    /// The server certificate for 127.0.0.1 and localhost (`server.pem`).
    pub fn server_cert(&self) -> PathBuf {
        self.path("server.pem")
    }
    /// The server key (`server-key.pem`).
    pub fn server_key(&self) -> PathBuf {
        self.path("server-key.pem")
    }
    /// A server certificate for another host name only (`wrong-host.pem`).
    pub fn wrong_host_cert(&self) -> PathBuf {
        self.path("wrong-host.pem")
    }
    /// Its key (`wrong-host-key.pem`).
    pub fn wrong_host_key(&self) -> PathBuf {
        self.path("wrong-host-key.pem")
    }
    /// The client certificate signed by the test CA (`client.pem`).
    pub fn client_cert(&self) -> PathBuf {
        self.path("client.pem")
    }
    /// The client key (`client-key.pem`).
    pub fn client_key(&self) -> PathBuf {
        self.path("client-key.pem")
    }
    /// A client certificate signed by the unrelated CA (`other-client.pem`).
    pub fn other_client_cert(&self) -> PathBuf {
        self.path("other-client.pem")
    }
    /// Its key (`other-client-key.pem`).
    pub fn other_client_key(&self) -> PathBuf {
        self.path("other-client-key.pem")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_every_file_as_pem() {
        let pki = TestPki::generate().unwrap();
        for f in [
            "ca.pem",
            "server.pem",
            "wrong-host.pem",
            "client.pem",
            "other-ca.pem",
            "other-client.pem",
        ] {
            let text = std::fs::read_to_string(pki.path(f)).unwrap();
            assert!(text.starts_with("-----BEGIN CERTIFICATE-----"), "{f}");
        }
        for f in [
            "ca-key.pem",
            "server-key.pem",
            "wrong-host-key.pem",
            "client-key.pem",
            "other-client-key.pem",
        ] {
            let text = std::fs::read_to_string(pki.path(f)).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{f}");
        }
        let dir = pki.dir().to_owned();
        drop(pki);
        assert!(!dir.exists(), "removed on drop");
    }
}
