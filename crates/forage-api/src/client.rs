//! A typed client of the API (the operator's CLI, the benches): the same types the
//! server answers with, the bearer token, and errors that keep the API's own words.

use std::time::Duration;

use crate::{
    ErrorBody, HandoffReport, HandoffRequest, InstanceDockReport, InstanceDockRequest, InstanceList, InstanceView,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the cloudlet's API at {base} answered {status}: {message}")]
    Refused { base: String, status: u16, message: String },
    #[error("the cloudlet's API at {base}")]
    Transport {
        base: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("the cloudlet's API at {base}: unreadable answer")]
    Body {
        base: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no running instance has endpoint {0}")]
    NoEndpoint(String),
}

/// The API at `http://ADDR`, with the operator's token.
pub struct ApiClient {
    base: String,
    auth: String,
}

impl ApiClient {
    pub fn new(addr: std::net::SocketAddr, token: &str) -> Self {
        Self { base: format!("http://{addr}"), auth: format!("Bearer {token}") }
    }

    fn answer<T: serde::de::DeserializeOwned>(&self, r: Result<ureq::Response, ureq::Error>) -> Result<T, ClientError> {
        match r {
            Ok(r) => r.into_json().map_err(|source| ClientError::Body { base: self.base.clone(), source }),
            Err(ureq::Error::Status(status, r)) => {
                let message = r.into_json::<ErrorBody>().map(|b| b.error).unwrap_or_else(|_| "no error body".into());
                Err(ClientError::Refused { base: self.base.clone(), status, message })
            }
            Err(e) => Err(ClientError::Transport { base: self.base.clone(), source: Box::new(e) }),
        }
    }

    /// `GET /v1/instances` (running ones, or all).
    pub fn instances(&self, all: bool) -> Result<InstanceList, ClientError> {
        self.answer(ureq::get(&format!("{}/v1/instances?all={all}", self.base)).set("Authorization", &self.auth).call())
    }

    /// `DELETE /v1/instances/{id}`.
    pub fn stop(&self, id: &str) -> Result<InstanceView, ClientError> {
        self.answer(ureq::delete(&format!("{}/v1/instances/{id}", self.base)).set("Authorization", &self.auth).call())
    }

    /// `POST /v1/instances/{id}/handoff`: waits (up to an hour) until the instance moved
    /// or failed to.
    pub fn handoff(&self, id: &str, request: &HandoffRequest) -> Result<HandoffReport, ClientError> {
        self.answer(
            ureq::post(&format!("{}/v1/instances/{id}/handoff", self.base))
                .set("Authorization", &self.auth)
                .timeout(Duration::from_secs(3600))
                .send_json(request),
        )
    }

    /// `POST /v1/instances/{id}/dock`: waits (up to an hour) until the instance is
    /// docked (and has ended) or failed to be.
    pub fn dock(&self, id: &str, request: &InstanceDockRequest) -> Result<InstanceDockReport, ClientError> {
        self.answer(
            ureq::post(&format!("{}/v1/instances/{id}/dock", self.base))
                .set("Authorization", &self.auth)
                .timeout(Duration::from_secs(3600))
                .send_json(request),
        )
    }

    /// `GET /v1/cluster`.
    pub fn cluster(&self) -> Result<forage_cluster::ClusterStatus, ClientError> {
        self.answer(ureq::get(&format!("{}/v1/cluster", self.base)).set("Authorization", &self.auth).call())
    }

    /// `POST /v1/cluster/nodes/{node}/drain`.
    pub fn drain_node(&self, node: &str) -> Result<forage_cluster::ClusterStatus, ClientError> {
        self.answer(
            ureq::post(&format!("{}/v1/cluster/nodes/{node}/drain", self.base)).set("Authorization", &self.auth).call(),
        )
    }

    /// `POST /v1/cluster/placements`.
    pub fn place(&self, request: &forage_cluster::PlacementRequest) -> Result<forage_cluster::Placement, ClientError> {
        self.answer(
            ureq::post(&format!("{}/v1/cluster/placements", self.base))
                .set("Authorization", &self.auth)
                .send_json(request),
        )
    }

    /// The id of the running instance whose service relay is `endpoint`.
    pub fn instance_at(&self, endpoint: &str) -> Result<String, ClientError> {
        self.instances(false)?
            .instances
            .into_iter()
            .find(|i| i.endpoint == endpoint)
            .map(|i| i.id)
            .ok_or_else(|| ClientError::NoEndpoint(endpoint.into()))
    }
}
