//! The TLS listener's rustls server config, from PEM text, with the crypto provider named
//! explicitly (the same aws-lc-rs provider the client side uses).

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use crate::client::{crypto_provider, pem_certificates};

/// Builds the acceptor for `cert_chain_pem` (leaf first) and `key_pem` (PKCS#8, PKCS#1 or
/// SEC1). The error says which part is wrong.
pub fn acceptor(cert_chain_pem: &[u8], key_pem: &[u8]) -> Result<TlsAcceptor, String> {
    let chain = pem_certificates(cert_chain_pem);
    if chain.is_empty() {
        return Err("the certificate chain holds no PEM certificate".to_owned());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("reading the private key: {e}"))?
        .ok_or_else(|| "the key file holds no PEM private key".to_owned())?;
    let config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_matching_pair_is_accepted_and_bad_input_names_what_is_wrong() {
        let a = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (a.cert.pem(), a.signing_key.serialize_pem());
        assert!(acceptor(cert.as_bytes(), key.as_bytes()).is_ok());
        let err = |r: Result<TlsAcceptor, String>| r.err().expect("refused");
        assert!(err(acceptor(b"", key.as_bytes())).contains("no PEM certificate"));
        assert!(err(acceptor(cert.as_bytes(), b"")).contains("no PEM private key"));
        let other_key = b.signing_key.serialize_pem();
        assert!(err(acceptor(cert.as_bytes(), other_key.as_bytes())).contains("do not fit"));
    }
}
