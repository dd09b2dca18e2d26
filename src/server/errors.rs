//! OpenAI-shaped errors: every failure the server answers is `{"error": {"message", "type",
//! "code", "param"}}` with the matching HTTP status, including axum's own body rejections.
//!
//! Invariant: no response with a status >= 400 leaves the server without this shape; every 401
//! carries `WWW-Authenticate: Bearer` (RFC 6750).

use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use moe_runtime::batch::Refused;
use moe_runtime::Error as RtError;

/// An error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<String>,
    /// Seconds for a `Retry-After` header (429, 503).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
            retry_after: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn param(mut self, param: &str) -> ApiError {
        self.param = Some(param.to_string());
        self
    }

    pub fn unauthorized() -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key: send `Authorization: Bearer <key>`",
        )
        .code("invalid_api_key")
    }

    pub fn unknown_model(asked: &str, served: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{asked}` does not exist; this server serves `{served}`"),
        )
        .code("model_not_found")
        .param("model")
    }

    pub fn not_found(path: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no route {path}"),
        )
        .code("not_found")
    }

    /// A body over `server.max_request_bytes` (declared or received).
    pub fn too_large() -> ApiError {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "the request body is larger than the server accepts (server.max_request_bytes)",
        )
        .code("request_too_large")
    }

    /// A body that did not all arrive within `server.body_timeout_s`.
    pub fn body_timeout() -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "the request body did not arrive in time (server.body_timeout_s): send it at once",
        )
        .code("request_timeout")
    }

    pub fn loading() -> ApiError {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "the model is still loading",
        )
        .code("model_loading");
        e.retry_after = Some(1);
        e
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
            .code("internal_error")
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
                "param": self.param,
            }
        })
    }
}

impl ApiError {
    /// The same error with another status.
    pub fn into_response_with(mut self, status: StatusCode) -> Response {
        self.status = status;
        self.into_response()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"moe-serve\""),
            );
        }
        r
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        match r {
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "invalid_request_error",
                "the body must be JSON with `Content-Type: application/json`",
            ),
            JsonRejection::BytesRejection(b) => ApiError::from(b),
            // Syntax errors and fields of the wrong type or missing: 400 (axum says 422).
            other => ApiError::bad_request(other.body_text()).code("invalid_json"),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> ApiError {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large()
        } else {
            ApiError::bad_request(r.body_text())
        }
    }
}

impl From<RtError> for ApiError {
    fn from(e: RtError) -> ApiError {
        match &e {
            RtError::ContextOverflow { .. } => ApiError::bad_request(e.to_string())
                .code("context_length_exceeded")
                .param("max_tokens"),
            RtError::InvalidRequest(_) | RtError::Tokenizer(_) => {
                ApiError::bad_request(e.to_string())
            }
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<Refused> for ApiError {
    fn from(r: Refused) -> ApiError {
        let (status, code) = match r {
            Refused::QueueFull { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_exceeded"),
            Refused::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        };
        let mut e = ApiError::new(status, "server_error", r.to_string()).code(code);
        e.retry_after = Some(1);
        e
    }
}
