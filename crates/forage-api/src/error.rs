//! Errors of the API's routes and the status code each one answers with.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use forage_state::StateError;

use crate::views::ErrorBody;

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
    /// The thing is not in a state the request can apply to (409).
    #[error("{0}")]
    Conflict(String),
    /// The daemon refused or failed an action (500).
    #[error("cannot {action} {id:?}: {message}")]
    Control {
        action: &'static str,
        id: String,
        message: String,
    },
    /// A control call panicked (500).
    #[error("the daemon's control call did not finish")]
    Task(#[from] tokio::task::JoinError),
    /// The state file failed (500).
    #[error(transparent)]
    State(#[from] StateError),
    /// Building the metrics text failed (500).
    #[error("cannot encode metrics")]
    Metrics(#[from] std::fmt::Error),
}

impl ApiError {
    /// The status code this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::NotFound { .. } | ApiError::NoRoute(_) => StatusCode::NOT_FOUND,
            ApiError::State(StateError::NotFound { .. }) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Control { .. }
            | ApiError::Task(_)
            | ApiError::State(_)
            | ApiError::Metrics(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // The whole chain: a state error's cause is the SQLite message.
        let mut error = self.to_string();
        let mut source = std::error::Error::source(&self);
        while let Some(cause) = source {
            error.push_str(": ");
            error.push_str(&cause.to_string());
            source = cause.source();
        }
        if status.is_server_error() {
            tracing::error!(%status, %error, "api request failed");
        } else {
            tracing::debug!(%status, %error, "api request refused");
        }
        (status, Json(ErrorBody { error })).into_response()
    }
}
