//! The one place where domain errors become gRPC statuses, with `google.rpc.ErrorInfo`
//! (reason) and, for bad input, `google.rpc.BadRequest` (field) details.

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::domain::DomainError;

/// `ErrorInfo.domain` of every error this server reports.
pub const ERROR_DOMAIN: &str = "flashsale";

impl From<DomainError> for Status {
    fn from(error: DomainError) -> Self {
        let code = status_code(&error);
        match code {
            Code::Internal => tracing::error!(%error, "internal error"),
            Code::Unavailable => tracing::warn!(%error, "database unavailable"),
            _ => {}
        }
        let mut details =
            ErrorDetails::with_error_info(error.reason(), ERROR_DOMAIN, metadata(&error));
        if let DomainError::InvalidArgument { field, reason } = &error {
            details.add_bad_request_violation(*field, reason.clone());
        }
        Status::with_error_details(code, error.to_string(), details)
    }
}

/// The status code each kind of failure gets.
fn status_code(error: &DomainError) -> Code {
    match error {
        DomainError::InvalidArgument { .. } => Code::InvalidArgument,
        DomainError::NotFound { .. } => Code::NotFound,
        DomainError::InsufficientStock { .. }
        | DomainError::HoldConverted { .. }
        | DomainError::HoldExpired { .. }
        | DomainError::HoldReleased { .. }
        | DomainError::OrderPaid { .. }
        | DomainError::SaleNotStarted { .. }
        | DomainError::SaleEnded { .. }
        | DomainError::StockWithdrawn { .. }
        | DomainError::BuyerLimitExceeded { .. }
        | DomainError::HoldLifetimeExceeded { .. }
        | DomainError::NoRefundOwed { .. }
        | DomainError::AmountMismatch { .. }
        | DomainError::StockBelowCommitted { .. } => Code::FailedPrecondition,
        DomainError::IdempotencyKeyReused { .. } => Code::AlreadyExists,
        DomainError::UniqueViolation { .. } | DomainError::Conflict(_) => Code::Aborted,
        DomainError::Unavailable(_) | DomainError::ShuttingDown => Code::Unavailable,
        DomainError::Unauthenticated => Code::Unauthenticated,
        DomainError::Overloaded => Code::ResourceExhausted,
        DomainError::MissingScope { .. } => Code::PermissionDenied,
        DomainError::Internal(_) => Code::Internal,
    }
}

/// Machine-readable facts about the failure, for `ErrorInfo.metadata`.
fn metadata(error: &DomainError) -> HashMap<String, String> {
    let pairs: Vec<(&str, String)> = match error {
        DomainError::InvalidArgument { field, .. } => vec![("field", field.to_string())],
        DomainError::NotFound { entity, id } => {
            vec![("entity", entity.to_string()), ("id", id.clone())]
        }
        DomainError::InsufficientStock {
            product_id,
            requested,
            available,
        } => vec![
            ("product_id", product_id.to_string()),
            ("requested", requested.to_string()),
            ("available", available.to_string()),
        ],
        DomainError::MissingScope { scope, .. } => vec![("scope", scope.to_string())],
        DomainError::HoldConverted { hold_id }
        | DomainError::HoldExpired { hold_id }
        | DomainError::HoldReleased { hold_id } => vec![("hold_id", hold_id.to_string())],
        DomainError::OrderPaid { order_id } => vec![("order_id", order_id.to_string())],
        DomainError::SaleNotStarted { product_id }
        | DomainError::SaleEnded { product_id }
        | DomainError::StockWithdrawn { product_id } => {
            vec![("product_id", product_id.to_string())]
        }
        DomainError::BuyerLimitExceeded {
            product_id,
            remaining,
        } => vec![
            ("product_id", product_id.to_string()),
            ("remaining", remaining.to_string()),
        ],
        DomainError::HoldLifetimeExceeded { hold_id } => vec![("hold_id", hold_id.to_string())],
        DomainError::NoRefundOwed { key } => vec![("idempotency_key", key.clone())],
        DomainError::IdempotencyKeyReused { field, key } => {
            vec![("field", field.to_string()), ("key", key.clone())]
        }
        DomainError::AmountMismatch { expected, reported } => {
            vec![
                ("expected", expected.to_string()),
                ("reported", reported.to_string()),
            ]
        }
        DomainError::StockBelowCommitted {
            product_id,
            committed,
            ..
        } => {
            vec![
                ("product_id", product_id.to_string()),
                ("committed", committed.to_string()),
            ]
        }
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}
