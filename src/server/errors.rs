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
    /// By kind: the request's own faults are 400; a model whose files changed on disk is 503
    /// until a restart; everything else (an expert that could not be loaded, I/O, the cache, a
    /// thread that could not start) is the server's fault, 500, never 400.
    fn from(e: RtError) -> ApiError {
        match &e {
            RtError::ContextOverflow { .. } => ApiError::bad_request(e.to_string())
                .code("context_length_exceeded")
                .param("max_tokens"),
            RtError::InvalidRequest(_) | RtError::Tokenizer(_) => {
                ApiError::bad_request(e.to_string())
            }
            _ if e.model_unusable() => {
                let mut api = ApiError::internal(e.to_string()).code("model_files_changed");
                api.status = StatusCode::SERVICE_UNAVAILABLE;
                api
            }
            RtError::ExpertLoad { .. } => {
                ApiError::internal(e.to_string()).code("expert_load_failed")
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Status, `type` and `code` of the response for `e`, after checking the body's shape.
    fn answer(e: RtError) -> (StatusCode, String, String) {
        let text = e.to_string();
        let api = ApiError::from(e);
        let body = api.body();
        let err = &body["error"];
        assert_eq!(err["message"], text.as_str(), "{body}");
        for field in ["message", "type", "code", "param"] {
            assert!(err.get(field).is_some(), "`{field}` missing: {body}");
        }
        let r = api.clone().into_response();
        assert_eq!(r.status(), api.status);
        (
            api.status,
            err["type"].as_str().unwrap().into(),
            err["code"].as_str().unwrap_or_default().into(),
        )
    }

    fn expert_load(cause: RtError) -> RtError {
        RtError::ExpertLoad {
            layer: 3,
            expert: 17,
            source: Arc::new(cause),
        }
    }

    #[test]
    fn an_expert_that_fails_to_load_is_a_500_not_a_bad_request() {
        let disk = expert_load(RtError::Io {
            path: "/models/m/model-00002-of-00004.safetensors".into(),
            source: std::io::Error::other("Input/output error"),
        });
        let checksum = expert_load(RtError::Cache {
            path: "/state/cache/m.moeq".into(),
            reason: "checksum mismatch in expert 17 of layer 3".into(),
        });
        for e in [disk, checksum] {
            let (status, kind, code) = answer(e);
            assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
            assert_eq!(
                (kind.as_str(), code.as_str()),
                ("server_error", "expert_load_failed")
            );
        }
    }

    #[test]
    fn failures_of_the_files_or_the_process_are_never_400() {
        let changed = || RtError::FileChanged {
            path: "/models/m/model.safetensors".into(),
            role: "model file",
            change: "truncated",
        };
        let cases = [
            (
                RtError::Internal("cannot start 8 threads: out of memory".into()),
                500,
            ),
            (
                RtError::Io {
                    path: "/models/m/config.json".into(),
                    source: std::io::Error::other("gone"),
                },
                500,
            ),
            (
                RtError::Cache {
                    path: "/state/cache/m.moeq".into(),
                    reason: "cannot be written".into(),
                },
                500,
            ),
            (
                RtError::BadTensor {
                    name: "model.layers.0.mlp.down_proj.weight".into(),
                    reason: "3 absmax values for 4 blocks of 64".into(),
                },
                500,
            ),
            // A model whose files changed is unusable until a restart, whether found directly
            // or while loading an expert.
            (changed(), 503),
            (expert_load(changed()), 503),
        ];
        for (e, want) in cases {
            let text = e.to_string();
            let (status, kind, _) = answer(e);
            assert_eq!(status.as_u16(), want, "{text}");
            assert_eq!(kind, "server_error", "{text}");
        }
    }

    #[test]
    fn request_errors_stay_400() {
        let (status, kind, _) = answer(RtError::InvalidRequest("temperature must be >= 0".into()));
        assert_eq!(
            (status, kind.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        );
        let (status, _, code) = answer(RtError::ContextOverflow {
            needed_tokens: 9000,
            max_context_tokens: 4096,
        });
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "context_length_exceeded")
        );
    }
}
