//! The device's side of the four other provisioning mechanisms and of a substrate's
//! activation: Hello without offers, Welcome, Provision (or Activate), then Ready with the
//! endpoint (or Error), the first request to the service, and a session that keeps the
//! instance alive until [`Provisioned::close`] (or drop, or the cloudlet's idle timeout).

use std::net::SocketAddr;
use std::time::Instant;

use forage_proto::asynchronous::{read, write};
use forage_proto::{DeviceMessage as Message, ProtoError, Provision, VERSION_MAX, VERSION_MIN};
use serde::{Deserialize, Serialize};

use crate::held::Ended;
use crate::{first_response, ClientError};

/// What a device asks a cloudlet for without an overlay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ask {
    /// One of the four other mechanisms of tactical cloudlets.
    Provision(Provision),
    /// A VM substrate of the cloudlet's pool, activated with `vcpus` and `memory_mib`.
    Activate { substrate: String, vcpus: u32, memory_mib: u64 },
}

impl Ask {
    /// The mechanism's name in reports (`substrate` for an activation).
    pub fn mechanism(&self) -> &'static str {
        match self {
            Ask::Provision(p) => p.mechanism(),
            Ask::Activate { .. } => "substrate",
        }
    }

    fn message(self) -> Message {
        match self {
            Ask::Provision(request) => Message::Provision { request },
            Ask::Activate { substrate, vcpus, memory_mib } => Message::Activate { substrate, vcpus, memory_mib },
        }
    }
}

impl From<Provision> for Ask {
    fn from(p: Provision) -> Self {
        Ask::Provision(p)
    }
}

/// What a provisioning took, from the connection (`forage offload ... --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionReport {
    /// `cached_vm`, `cloudlet_push`, `on_demand`, `app_virtualization` or `substrate`.
    pub mechanism: String,
    pub cloudlet: String,
    /// Bytes the device sent to provision (its Hello and Provision frames).
    pub payload_bytes: u64,
    /// Until the cloudlet said the service is up (Ready).
    pub ready_s: f64,
    /// Until the service's first answer arrived (application ready), if a request was given.
    pub first_response_s: Option<f64>,
    /// The relay's address (what `service` says too).
    pub endpoint: String,
    /// How this device reaches the service (its token included).
    pub service: forage_proto::ServiceEndpoint,
    pub answer: Option<String>,
}

/// An instance provisioned for this device: it runs until this is closed or dropped.
pub struct Provisioned {
    stream: crate::CloudletStream,
    addr: SocketAddr,
}

impl Provisioned {
    /// Say Bye: the cloudlet stops the instance.
    pub async fn close(mut self) {
        let _ = write(&mut self.stream, &Message::Bye).await;
    }

    /// Wait until the cloudlet ends the instance (idle timeout, operator): its reason.
    /// A handoff ends it here too, with where the instance went.
    pub async fn ended(&mut self) -> Ended {
        self.ended_following(&mut tokio::sync::mpsc::unbounded_channel().1).await
    }

    /// [`Provisioned::ended`], asking the instance to follow the device to each cloudlet
    /// (`HOST:PORT`) that `follow` names meanwhile; a refusal (NotFollowed) is logged and
    /// the instance stays.
    pub async fn ended_following(&mut self, follow: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> Ended {
        let addr = self.addr;
        let (mut rd, mut wr) = tokio::io::split(&mut self.stream);
        // One read for the whole wait: a frame is never cut by a Follow being written.
        let reading = async {
            loop {
                match read(&mut rd).await {
                    Ok(Message::NotFollowed { message }) => {
                        tracing::warn!("the instance did not follow: {message}")
                    }
                    other => return other,
                }
            }
        };
        tokio::pin!(reading);
        loop {
            tokio::select! {
                m = &mut reading => return match m {
                    Ok(Message::Moved { cloudlet, service }) => Ended::Moved { cloudlet, service },
                    other => Ended::Stopped(Self::reason(addr, other)),
                },
                Some(to) = follow.recv() => {
                    if let Err(e) = write(&mut wr, &Message::Follow { to }).await {
                        return Ended::Stopped(ClientError::Proto { addr, source: e });
                    }
                }
            }
        }
    }

    fn reason(addr: SocketAddr, got: Result<Message, forage_proto::ProtoError>) -> ClientError {
        match got {
            Ok(Message::Error { code, message }) => ClientError::Refused { addr, code, message },
            Ok(other) => ClientError::Sequence { addr, expected: "Error", got: other.name() },
            Err(source) => ClientError::Proto { addr, source },
        }
    }
}

/// Ask the cloudlet at `addr` for `request` (a [`Provision`] or an [`Ask`]); with `line`,
/// send it to the service and wait for its answer (the application is ready when it
/// answers).
pub async fn provision(
    addr: SocketAddr,
    credentials: &std::sync::Arc<rustls::ClientConfig>,
    device: &str,
    request: impl Into<Ask>,
    line: Option<String>,
) -> Result<(ProvisionReport, Provisioned), ClientError> {
    let request: Ask = request.into();
    let proto = |source: ProtoError| ClientError::Proto { addr, source };
    let start = Instant::now();
    let mut stream = crate::connect(addr, credentials, None).await?;
    let mechanism = request.mechanism().to_string();
    let hello = Message::Hello {
        versions: (VERSION_MIN, VERSION_MAX),
        device: device.into(),
        offers: Vec::new(),
        early_start: false,
        store_and_forward: false,
    };
    let provision = request.message();
    let payload_bytes = (forage_proto::encode(&hello).len() + forage_proto::encode(&provision).len()) as u64;
    write(&mut stream, &hello).await.map_err(proto)?;
    let cloudlet = match read(&mut stream).await.map_err(proto)? {
        Message::Welcome { cloudlet, .. } => cloudlet,
        Message::Error { code, message } => return Err(ClientError::Refused { addr, code, message }),
        other => return Err(ClientError::Sequence { addr, expected: "Welcome", got: other.name() }),
    };
    write(&mut stream, &provision).await.map_err(proto)?;
    let service = match read(&mut stream).await {
        Ok(Message::Ready { service, .. }) => service,
        Ok(Message::Error { code, message }) => return Err(ClientError::Refused { addr, code, message }),
        Ok(other) => return Err(ClientError::Sequence { addr, expected: "Ready", got: other.name() }),
        Err(ProtoError::Closed) => return Err(ClientError::Closed { addr, what: "the instance was ready" }),
        Err(e) => return Err(proto(e)),
    };
    let ready_s = start.elapsed().as_secs_f64();
    let (answer, first_response_s) = match line {
        Some(line) => (Some(first_response(service.clone(), line).await?), Some(start.elapsed().as_secs_f64())),
        None => (None, None),
    };
    if answer.is_some() {
        // The cloudlet notes when the service first answered (its sessions' breakdown).
        let checkpoint = Message::Checkpoint { label: forage_proto::device::FIRST_RESPONSE.into() };
        write(&mut stream, &checkpoint).await.map_err(proto)?;
        match read(&mut stream).await {
            Ok(Message::Usage { .. }) => {}
            Ok(Message::Error { code, message }) => return Err(ClientError::Refused { addr, code, message }),
            Ok(other) => return Err(ClientError::Sequence { addr, expected: "Usage", got: other.name() }),
            Err(e) => return Err(proto(e)),
        }
    }
    let report = ProvisionReport {
        mechanism,
        cloudlet,
        payload_bytes,
        ready_s,
        first_response_s,
        endpoint: service.addr.clone(),
        service,
        answer,
    };
    Ok((report, Provisioned { stream, addr }))
}
