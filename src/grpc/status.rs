//! gRPC statuses: the inference layer's errors and refused credentials as gRPC codes, in one
//! place, and the codes' names as the request metrics label them.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::api_key::KeyRefusal;
use crate::infer::InferError;

/// Milliseconds a client told RESOURCE_EXHAUSTED should wait before retrying, sent as gRPC's
/// retry pushback (`grpc-retry-pushback-ms`), as REST sends `Retry-After`.
pub const RETRY_PUSHBACK_MS: u64 = 1000;

/// The status of a call the inference layer refused or failed.
pub fn from_infer(error: InferError) -> Status {
    let message = error.to_string();
    match error {
        InferError::InvalidInput(_) | InferError::Image { .. } => Status::invalid_argument(message),
        InferError::UnknownModel { .. } => Status::not_found(message),
        InferError::Overloaded { .. } => {
            let mut status = Status::resource_exhausted(format!(
                "{message}; retry after {RETRY_PUSHBACK_MS} ms"
            ));
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                MetadataValue::from(RETRY_PUSHBACK_MS),
            );
            status
        }
        InferError::NotReady | InferError::ShuttingDown => Status::unavailable(message),
        InferError::Timeout { .. } => Status::deadline_exceeded(message),
        InferError::Internal(_) => Status::internal(message),
    }
}

/// The status of a call without the right API key.
pub fn from_key_refusal(refusal: KeyRefusal) -> Status {
    let message = match refusal {
        KeyRefusal::Missing => {
            "this method needs the API key: send the metadata `authorization: Bearer <key>`"
                .to_owned()
        }
        KeyRefusal::Invalid => refusal.to_string(),
    };
    Status::unauthenticated(message)
}

/// The code's name in the gRPC specification, as `resnet_requests_total{status}` holds it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::PreprocessError;

    #[test]
    fn every_inference_error_has_its_code_and_keeps_its_message() {
        let cases = [
            (
                InferError::InvalidInput("shape".into()),
                Code::InvalidArgument,
            ),
            (
                InferError::Image {
                    index: Some(1),
                    error: PreprocessError::Decode("bad".into()),
                },
                Code::InvalidArgument,
            ),
            (
                InferError::UnknownModel {
                    requested: "a".into(),
                    served: "b".into(),
                },
                Code::NotFound,
            ),
            (
                InferError::Overloaded { capacity: 2 },
                Code::ResourceExhausted,
            ),
            (InferError::NotReady, Code::Unavailable),
            (InferError::ShuttingDown, Code::Unavailable),
            (InferError::Timeout { ms: 9 }, Code::DeadlineExceeded),
            (InferError::Internal("x".into()), Code::Internal),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let status = from_infer(error);
            assert_eq!(status.code(), code, "{message}");
            assert!(
                status.message().starts_with(&message),
                "{}",
                status.message()
            );
        }
        let overloaded = from_infer(InferError::Overloaded { capacity: 2 });
        assert_eq!(
            overloaded.metadata().get("grpc-retry-pushback-ms").unwrap(),
            "1000"
        );
    }

    #[test]
    fn refused_keys_are_unauthenticated() {
        let status = from_key_refusal(KeyRefusal::Missing);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("authorization: Bearer"));
        assert_eq!(code_name(status.code()), "UNAUTHENTICATED");
    }
}
