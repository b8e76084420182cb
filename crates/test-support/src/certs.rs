//! Certificates for TLS tests: a private CA and a `localhost` certificate it signed.

/// PEM texts of a CA, and of a certificate for `localhost` and 127.0.0.1 (and its key)
/// signed by it.
pub struct LocalhostCert {
    pub ca: String,
    pub cert: String,
    pub key: String,
}

impl LocalhostCert {
    pub fn generate() -> LocalhostCert {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test kas CA");
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("params")
                .signed_by(&key, &ca, &ca_key)
                .expect("leaf");
        LocalhostCert {
            ca: ca.pem(),
            cert: leaf.pem(),
            key: key.serialize_pem(),
        }
    }
}
