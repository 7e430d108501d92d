//! The client's `grpc-timeout` over the whole call, answered as DEADLINE_EXCEEDED.
//!
//! tonic's server honours `grpc-timeout` too, but answers a call that outlives it with CANCELLED
//! ("Timeout expired"), which clients do not take for their deadline; and the handler's own
//! deadline starts later, once the request is decoded, so which of the two answered was a race.
//! This layer sits inside tonic's: it is called just before tonic starts its clock, so its
//! deadline is never the later one, and it is polled first whenever the call wakes, so a call
//! past its deadline always ends here, as DEADLINE_EXCEEDED.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http;
use tokio::time::Instant;

use super::service::grpc_timeout;
use super::status::from_infer;
use crate::infer::{Deadline, InferError};

/// Wraps every gRPC service in [`ClientDeadline`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClientDeadlineLayer;

impl<S> tower::Layer<S> for ClientDeadlineLayer {
    type Service = ClientDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientDeadline { inner }
    }
}

/// A gRPC service whose calls end with DEADLINE_EXCEEDED once their `grpc-timeout` has passed.
#[derive(Debug, Clone)]
pub struct ClientDeadline<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for ClientDeadline<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline =
            grpc_timeout(request.headers()).map(|timeout| Deadline::after(Instant::now(), timeout));
        let call = self.inner.call(request);
        Box::pin(async move {
            let Some(deadline) = deadline else {
                return call.await;
            };
            match tokio::time::timeout_at(deadline.at(), call).await {
                Ok(response) => response,
                Err(_) => Ok(from_infer(InferError::Timeout {
                    ms: deadline.budget_ms(),
                })
                .into_http()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::time::Duration;

    use tonic::Code;
    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// A service that answers 200 after `delay`.
    fn slow(
        delay: Duration,
    ) -> impl Service<
        http::Request<()>,
        Response = http::Response<String>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone {
        tower::service_fn(move |_: http::Request<()>| async move {
            tokio::time::sleep(delay).await;
            Ok::<_, Infallible>(http::Response::new("done".to_string()))
        })
    }

    fn request(timeout: Option<&str>) -> http::Request<()> {
        let mut request = http::Request::new(());
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert("grpc-timeout", timeout.parse().expect("a header value"));
        }
        request
    }

    fn grpc_code(response: &http::Response<String>) -> Option<Code> {
        tonic::Status::from_header_map(response.headers()).map(|status| status.code())
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_past_the_client_deadline_is_deadline_exceeded() {
        let service = ClientDeadlineLayer.layer(slow(Duration::from_millis(50)));
        let response = service
            .oneshot(request(Some("10m")))
            .await
            .expect("infallible");
        assert_eq!(grpc_code(&response), Some(Code::DeadlineExceeded));
        assert!(response.body().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn calls_within_their_deadline_or_without_one_are_untouched() {
        for timeout in [Some("100m"), Some("1H"), None, Some("not a timeout")] {
            let service = ClientDeadlineLayer.layer(slow(Duration::from_millis(50)));
            let response = service.oneshot(request(timeout)).await.expect("infallible");
            assert_eq!(grpc_code(&response), None, "{timeout:?}");
            assert_eq!(response.body(), "done", "{timeout:?}");
        }
    }
}
