//! Errors of the API's routes and the status code each one answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forage_state::StateError;

use crate::views::ErrorBody;

/// Whose fault a refused or failed action of the daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The thing named does not exist (404).
    NotFound,
    /// It exists, not in a state the action applies to: busy, not movable (409).
    Conflict,
    /// The request cannot be carried out as given (400).
    BadRequest,
    /// The daemon failed (500).
    Internal,
    /// Something the daemon needs is out of reach now (etcd without quorum); try later (503).
    Unavailable,
}

/// An error of an action of the daemon ([`crate::Control`]), typed by the daemon: its
/// fault, and the daemon's own error (shown as this error; its causes follow in the
/// chain).
#[derive(Debug)]
pub struct ActionError {
    pub fault: Fault,
    pub error: Box<dyn std::error::Error + Send + Sync>,
}

impl std::fmt::Display for ActionError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ActionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl ActionError {
    pub fn new(fault: Fault, error: impl std::error::Error + Send + Sync + 'static) -> Self {
        Self { fault, error: Box::new(error) }
    }

    pub fn status(&self) -> StatusCode {
        match self.fault {
            Fault::NotFound => StatusCode::NOT_FOUND,
            Fault::Conflict => StatusCode::CONFLICT,
            Fault::BadRequest => StatusCode::BAD_REQUEST,
            Fault::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Fault::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// Why a route failed; turned into `{"error": "..."}` with the matching status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A query or path the route cannot take (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such thing (404).
    #[error("no {kind} with id {id:?}")]
    NotFound { kind: &'static str, id: String },
    /// No route at this path (404).
    #[error("no route {0}")]
    NoRoute(String),
    /// The route exists, not with this method (405).
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    /// No valid token for a route that needs one (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Signed in, but the request does not prove it comes from the signed-in page (a
    /// missing or wrong CSRF token, another origin) (403).
    #[error("{0}")]
    Forbidden(String),
    /// Too many of something at once; try later (503).
    #[error("{0}")]
    Busy(String),
    /// The thing is not in a state the request can apply to (409).
    #[error("{0}")]
    Conflict(String),
    /// The daemon refused or failed an action: the status says whose fault it was.
    #[error("cannot {action} {id:?}")]
    Control {
        action: &'static str,
        id: String,
        #[source]
        source: ActionError,
    },
    /// The cloudlet was not started with `--cluster` (404).
    #[error("this cloudlet is not in a cluster (forage serve --cluster URLS)")]
    NotInCluster,
    /// A control call panicked (500).
    #[error("the daemon's control call did not finish")]
    Task(#[from] tokio::task::JoinError),
    /// The state file failed (500).
    #[error(transparent)]
    State(#[from] StateError),
    /// No randomness for a session cookie (500).
    #[error("cannot sign in")]
    NoRandomness(#[from] crate::websession::NoRandomness),
    /// Building the metrics text failed (500).
    #[error("cannot encode metrics")]
    Metrics(#[from] std::fmt::Error),
}

impl ApiError {
    /// The status code this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } | ApiError::NoRoute(_) | ApiError::NotInCluster => StatusCode::NOT_FOUND,
            ApiError::State(StateError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Control { source, .. } => source.status(),
            ApiError::Task(_) | ApiError::State(_) | ApiError::Metrics(_) | ApiError::NoRandomness(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // The whole chain: a state error's cause is the SQLite message.
        let error = one_line(&self);
        if status.is_server_error() {
            tracing::error!(%status, %error, "api request failed");
        } else {
            tracing::debug!(%status, %error, "api request refused");
        }
        (status, Json(ErrorBody { error })).into_response()
    }
}

/// An error and its causes on one line (`a: b: c`), as the API and devices are told.
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}
