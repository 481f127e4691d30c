//! A small client of etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/put`, `/v3/kv/txn`,
//! `/v3/lease/grant`, `/v3/lease/keepalive`, `/v3/lease/revoke`; keys and values base64,
//! 64-bit numbers as JSON strings), over the hyper client the workspace already builds.
//!
//! Every call goes to the endpoint that answered last and, when it cannot be reached,
//! times out or answers 5xx, to the next: losing one member of three changes nothing.
//! When the member that went was the leader, the others cannot serve a linearizable read
//! or a write until they have elected a new one (etcd's election timeout is 1 s by
//! default, more on a loaded host): so while some member is up but could not serve
//! (it timed out or answered 5xx), the call asks every endpoint again, 200 ms apart,
//! until [`Etcd::election_wait`] has passed since it began. When no endpoint answers by
//! then, or none could even be connected to, the call fails with
//! [`EtcdError::Unavailable`]: that is how a lost quorum shows.
//!
//! Answers are untrusted bytes: a body over [`MAX_ANSWER_BYTES`] is refused unread, and
//! at most [`MAX_KEYS`] keys are asked for in one range.
//!
//! `https://` endpoints are reached over TLS (rustls) when [`EtcdTls`] names the CA that
//! signed the members' certificates, and a client certificate if etcd asks for one
//! (`--client-cert-auth`); `http://` ones in plain text.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// The largest answer read from etcd.
pub const MAX_ANSWER_BYTES: usize = 8 << 20;
/// The most keys one range asks for.
pub const MAX_KEYS: u64 = 10_000;
/// How long a call goes on asking members that are up but cannot serve (an election).
pub const ELECTION_WAIT: Duration = Duration::from_secs(5);
/// The pause between two rounds of asking every endpoint.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

/// Why one attempt at one endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("{endpoint}: not reachable")]
    Transport {
        endpoint: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{endpoint}: no answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("{endpoint}: answer unreadable or over {MAX_ANSWER_BYTES} bytes")]
    Body { endpoint: String },
    #[error("{endpoint}: answered {status}: {message}")]
    Status { endpoint: String, status: u16, message: String },
    #[error("{endpoint}: answer not the expected JSON")]
    Json {
        endpoint: String,
        #[source]
        source: serde_json::Error,
    },
}

impl AttemptError {
    /// Whether another endpoint may do better (transport, time, the server's fault).
    fn try_next(&self) -> bool {
        match self {
            AttemptError::Status { status, .. } => *status >= 500,
            AttemptError::Json { .. } => false,
            _ => true,
        }
    }

    /// Whether a member is there but could not serve: it may once a leader is elected.
    fn member_up(&self) -> bool {
        !matches!(self, AttemptError::Transport { .. })
    }
}

/// Why a call to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd unavailable (no quorum or no member reachable among {endpoints})")]
    Unavailable {
        endpoints: String,
        #[source]
        last: AttemptError,
    },
    #[error("etcd refused the request")]
    Refused(#[source] AttemptError),
    #[error("etcd answered a value that is not base64")]
    Base64(#[source] base64::DecodeError),
    #[error("lease {0} is gone (expired or revoked)")]
    LeaseGone(i64),
    #[error("etcd TLS: cannot read the {what} in {path}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("etcd TLS: {0}")]
    TlsSettings(&'static str),
    #[error("etcd TLS: the certificates are not usable")]
    Tls(#[source] rustls::Error),
}

/// One key and its value as etcd holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
    pub lease: i64,
}

/// How to reach `https://` members: the CA that signed their certificates, and this
/// node's certificate and key when etcd checks clients (`--client-cert-auth`). PEM files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    fn client_config(tls: Option<&EtcdTls>) -> Result<rustls::ClientConfig, EtcdError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        let file = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| EtcdError::TlsFile { what, path, source }
        };
        if let Some(t) = tls {
            for cert in CertificateDer::pem_file_iter(&t.ca).map_err(file("CA certificates", &t.ca))? {
                roots.add(cert.map_err(file("CA certificates", &t.ca))?).map_err(EtcdError::Tls)?;
            }
            if roots.is_empty() {
                return Err(EtcdError::TlsSettings("the CA file holds no certificate"));
            }
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(EtcdError::Tls)?
            .with_root_certificates(roots);
        match tls.map(|t| (&t.cert, &t.key)) {
            Some((Some(cert), Some(key))) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .map_err(file("certificate", cert))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(file("certificate", cert))?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(file("private key", key))?;
                builder.with_client_auth_cert(chain, key).map_err(EtcdError::Tls)
            }
            Some((None, None)) | None => Ok(builder.with_no_client_auth()),
            Some(_) => Err(EtcdError::TlsSettings("a client certificate needs its key, and a key its certificate")),
        }
    }
}

/// An etcd cluster at some client URLs (`http://HOST:PORT`, or `https://` with [`EtcdTls`]).
pub struct Etcd {
    endpoints: Vec<String>,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// Per endpoint and attempt.
    pub timeout: Duration,
    /// How long a call asks again while a member is up but cannot serve ([`ELECTION_WAIT`]).
    pub election_wait: Duration,
    preferred: AtomicUsize,
}

#[derive(Deserialize)]
struct Num(#[serde(deserialize_with = "int64")] i64);

/// etcd's gateway writes int64 as a JSON string (and omits zeros).
fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::String(s) => s.parse().map_err(serde::de::Error::custom),
        Value::Number(n) => n.as_i64().ok_or_else(|| serde::de::Error::custom("not an int64")),
        _ => Err(serde::de::Error::custom("not an int64")),
    }
}

#[derive(Deserialize, Default)]
struct RawKv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mod_revision: Option<Num>,
    #[serde(default)]
    lease: Option<Num>,
}

#[derive(Deserialize, Default)]
struct RangeAnswer {
    #[serde(default)]
    kvs: Vec<RawKv>,
}

#[derive(Deserialize)]
struct LeaseAnswer {
    #[serde(rename = "ID", default)]
    id: Option<Num>,
    #[serde(rename = "TTL", default)]
    ttl: Option<Num>,
}

#[derive(Deserialize)]
struct KeepAliveAnswer {
    #[serde(default)]
    result: Option<LeaseAnswer>,
}

#[derive(Deserialize)]
struct TxnAnswer {
    #[serde(default)]
    succeeded: bool,
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default)]
    revision: Option<Num>,
}

#[derive(Deserialize)]
struct RangesAnswer {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    responses: Vec<RangeResponse>,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    response_range: Option<RangeAnswer>,
}

#[derive(Deserialize)]
struct CreateOrReadAnswer {
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<RangeResponse>,
}

#[derive(Deserialize)]
struct Ignored {}

fn b64(s: &[u8]) -> String {
    B64.encode(s)
}

/// The end of the range of keys that start with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn decode_kvs(kvs: Vec<RawKv>) -> Result<Vec<KeyValue>, EtcdError> {
    kvs.into_iter()
        .map(|kv| {
            let key = B64.decode(kv.key).map_err(EtcdError::Base64)?;
            Ok(KeyValue {
                key: String::from_utf8_lossy(&key).into_owned(),
                value: B64.decode(kv.value).map_err(EtcdError::Base64)?,
                mod_revision: kv.mod_revision.map_or(0, |n| n.0),
                lease: kv.lease.map_or(0, |n| n.0),
            })
        })
        .collect()
}

impl Etcd {
    /// A client of the members at `endpoints` (none contacted yet), in plain text (an
    /// `https://` endpoint then fails: no CA is trusted).
    pub fn new(endpoints: Vec<String>) -> Self {
        Self::with_tls(endpoints, None).expect("TLS settings without files are valid")
    }

    /// A client of the members at `endpoints`, `https://` ones checked against `tls`.
    pub fn with_tls(endpoints: Vec<String>, tls: Option<&EtcdTls>) -> Result<Self, EtcdError> {
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(EtcdTls::client_config(tls)?)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
        Ok(Self {
            endpoints,
            client,
            timeout: Duration::from_secs(2),
            election_wait: ELECTION_WAIT,
            preferred: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    async fn attempt<T: DeserializeOwned>(&self, endpoint: &str, path: &str, body: &Value) -> Result<T, AttemptError> {
        let endpoint_owned = || endpoint.to_string();
        let request = hyper::Request::post(format!("{endpoint}{path}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a well-formed request");
        let exchange = async {
            let answer = self
                .client
                .request(request)
                .await
                .map_err(|source| AttemptError::Transport { endpoint: endpoint_owned(), source })?;
            let status = answer.status().as_u16();
            let bytes = Limited::new(answer.into_body(), MAX_ANSWER_BYTES)
                .collect()
                .await
                .map_err(|_| AttemptError::Body { endpoint: endpoint_owned() })?
                .to_bytes();
            Ok::<_, AttemptError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AttemptError::Timeout { endpoint: endpoint_owned(), timeout: self.timeout })??;
        if status != 200 {
            #[derive(Deserialize)]
            struct Failure {
                #[serde(default)]
                error: String,
                #[serde(default)]
                message: String,
            }
            let message = serde_json::from_slice::<Failure>(&bytes)
                .map(|f| if f.message.is_empty() { f.error } else { f.message })
                .unwrap_or_else(|_| "no error body".into());
            let message: String = message.chars().take(300).collect();
            return Err(AttemptError::Status { endpoint: endpoint_owned(), status, message });
        }
        serde_json::from_slice(&bytes).map_err(|source| AttemptError::Json { endpoint: endpoint_owned(), source })
    }

    /// `path` with `body` at the preferred endpoint, then the others; again, while a
    /// member is up but cannot serve, until [`Etcd::election_wait`] has passed.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T, EtcdError> {
        let began = tokio::time::Instant::now();
        let n = self.endpoints.len().max(1);
        loop {
            let first = self.preferred.load(Ordering::Relaxed) % n;
            let (mut last, mut up) = (None, false);
            for i in 0..self.endpoints.len() {
                let at = (first + i) % n;
                match self.attempt(&self.endpoints[at], path, &body).await {
                    Ok(v) => {
                        self.preferred.store(at, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) if e.try_next() => {
                        up |= e.member_up();
                        last = Some(e);
                    }
                    Err(e) => return Err(EtcdError::Refused(e)),
                }
            }
            if !up || began.elapsed() + ROUND_PAUSE >= self.election_wait {
                let last =
                    last.unwrap_or(AttemptError::Timeout { endpoint: "(no endpoint)".into(), timeout: self.timeout });
                return Err(EtcdError::Unavailable { endpoints: self.endpoints.join(","), last });
            }
            tracing::debug!(path, "no etcd member could serve; asking again (an election may be under way)");
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }

    /// Every key starting with `prefix` (at most [`MAX_KEYS`]), read linearizably.
    pub async fn range_prefix(&self, prefix: &str) -> Result<Vec<KeyValue>, EtcdError> {
        let body = json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)), "limit": MAX_KEYS});
        let answer: RangeAnswer = self.call("/v3/kv/range", body).await?;
        decode_kvs(answer.kvs)
    }

    /// Every key under each of `prefixes`, read in one transaction: all at the same
    /// revision, which is returned with them.
    pub async fn ranges_at_once(&self, prefixes: &[String]) -> Result<(i64, Vec<Vec<KeyValue>>), EtcdError> {
        let ranges: Vec<Value> = prefixes
            .iter()
            .map(|p| {
                json!({"request_range": {"key": b64(p.as_bytes()), "range_end": b64(&prefix_end(p)), "limit": MAX_KEYS}})
            })
            .collect();
        let answer: RangesAnswer = self.call("/v3/kv/txn", json!({"success": ranges})).await?;
        let revision = answer.header.revision.map_or(0, |n| n.0);
        let mut out = Vec::with_capacity(prefixes.len());
        for r in answer.responses.into_iter().take(prefixes.len()) {
            out.push(decode_kvs(r.response_range.map(|r| r.kvs).unwrap_or_default())?);
        }
        out.resize(prefixes.len(), Vec::new());
        Ok((revision, out))
    }

    /// Create `key` (attached to `lease`) only if no key under `prefix` and not `exact`
    /// was written after `revision`, and `exact` exists: an optimistic lock on what a
    /// decision read at `revision`. Whether it was written.
    pub async fn put_if_untouched_since(
        &self,
        prefix: &str,
        exact: &str,
        revision: i64,
        key: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<bool, EtcdError> {
        let after = (revision + 1).to_string();
        let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let body = json!({
            "compare": [
                {"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix)),
                 "target": "MOD", "result": "LESS", "mod_revision": after},
                {"key": b64(exact.as_bytes()), "target": "MOD", "result": "LESS", "mod_revision": after},
                {"key": b64(exact.as_bytes()), "target": "VERSION", "result": "GREATER", "version": "0"},
            ],
            "success": [{"request_put": put}],
        });
        let answer: TxnAnswer = self.call("/v3/kv/txn", body).await?;
        Ok(answer.succeeded)
    }

    /// Write `key` (attached to `lease`) and delete `deletes`, in one transaction.
    pub async fn put_and_delete(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        deletes: &[String],
    ) -> Result<(), EtcdError> {
        let mut put = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let mut ops = vec![json!({"request_put": put})];
        ops.extend(deletes.iter().map(|k| json!({"request_delete_range": {"key": b64(k.as_bytes())}})));
        let _: Ignored = self.call("/v3/kv/txn", json!({"success": ops})).await?;
        Ok(())
    }

    /// Create `key` (attached to `lease`) if no one holds it, in one transaction that
    /// otherwise reads it: the key as it now is, whoever wrote it.
    pub async fn create_or_read(&self, key: &str, value: &[u8], lease: i64) -> Result<KeyValue, EtcdError> {
        let k = b64(key.as_bytes());
        let mut put = json!({"key": k, "value": b64(value)});
        if lease != 0 {
            put["lease"] = json!(lease.to_string());
        }
        let body = json!({
            "compare": [{"key": k, "target": "VERSION", "result": "EQUAL", "version": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": k}}],
        });
        let answer: CreateOrReadAnswer = self.call("/v3/kv/txn", body).await?;
        if answer.succeeded {
            return Ok(KeyValue { key: key.into(), value: value.to_vec(), mod_revision: 0, lease });
        }
        let kvs = answer.responses.into_iter().next().and_then(|r| r.response_range).map(|r| r.kvs);
        // Held a moment ago and gone since (its lease expired): no one holds it now.
        Ok(decode_kvs(kvs.unwrap_or_default())?.into_iter().next().unwrap_or(KeyValue {
            key: key.into(),
            value: Vec::new(),
            mod_revision: 0,
            lease: 0,
        }))
    }

    /// Write `key` (attached to `lease`, or to none with 0).
    pub async fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<(), EtcdError> {
        let mut body = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            body["lease"] = json!(lease.to_string());
        }
        let _: Ignored = self.call("/v3/kv/put", body).await?;
        Ok(())
    }

    /// Write `key` only if it was last written at `mod_revision` (a transaction);
    /// whether it was written.
    pub async fn put_if_unchanged(&self, key: &str, value: &[u8], mod_revision: i64) -> Result<bool, EtcdError> {
        let k = b64(key.as_bytes());
        let body = json!({
            "compare": [{"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision.to_string()}],
            "success": [{"request_put": {"key": k, "value": b64(value)}}],
        });
        let answer: TxnAnswer = self.call("/v3/kv/txn", body).await?;
        Ok(answer.succeeded)
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        let _: Ignored = self.call("/v3/kv/deleterange", json!({"key": b64(key.as_bytes())})).await?;
        Ok(())
    }

    /// A new lease of `ttl_s` seconds: its id.
    pub async fn lease_grant(&self, ttl_s: u64) -> Result<i64, EtcdError> {
        let answer: LeaseAnswer = self.call("/v3/lease/grant", json!({"TTL": ttl_s.to_string()})).await?;
        answer.id.map(|n| n.0).filter(|&id| id != 0).ok_or(EtcdError::LeaseGone(0))
    }

    /// Renew `lease`: the seconds it has left.
    pub async fn lease_keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let answer: KeepAliveAnswer = self.call("/v3/lease/keepalive", json!({"ID": lease.to_string()})).await?;
        match answer.result.and_then(|r| r.ttl).map(|n| n.0) {
            Some(ttl) if ttl > 0 => Ok(ttl),
            _ => Err(EtcdError::LeaseGone(lease)),
        }
    }

    /// End `lease` now: its keys go with it.
    pub async fn lease_revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let _: Ignored = self.call("/v3/lease/revoke", json!({"ID": lease.to_string()})).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_where_its_last_byte_grows() {
        assert_eq!(prefix_end("/a/"), b"/a0");
        assert_eq!(prefix_end(""), vec![0]);
    }

    #[test]
    fn int64_comes_as_a_string_or_a_number() {
        let a: LeaseAnswer = serde_json::from_str(r#"{"ID":"7587","TTL":10}"#).unwrap();
        assert_eq!((a.id.unwrap().0, a.ttl.unwrap().0), (7587, 10));
        assert!(serde_json::from_str::<LeaseAnswer>(r#"{"ID":"x"}"#).is_err());
    }
}
