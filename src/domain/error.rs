//! The one error type of the domain, and the one place where database errors become it.

use std::sync::Arc;

use diesel::result::{DatabaseErrorKind, Error as DieselError};
use uuid::Uuid;

/// The error underneath a failure, kept for logs (shared, since a batch's failure answers
/// every caller in it).
pub type Source = Arc<dyn std::error::Error + Send + Sync>;

/// Why a domain operation did not happen. Every variant means nothing was changed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DomainError {
    /// The caller sent a value the operation cannot take; `field` names it as in the API.
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },

    /// No such product, hold or order.
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: String },

    /// Fewer units available than asked for.
    #[error(
        "not enough stock for product {product_id}: requested {requested}, available {available}"
    )]
    InsufficientStock {
        product_id: Uuid,
        requested: i64,
        available: i64,
    },

    /// The hold already became an order.
    #[error("hold {hold_id} was converted into an order")]
    HoldConverted { hold_id: Uuid },

    /// The hold's TTL passed; its units went back to stock.
    #[error("hold {hold_id} expired")]
    HoldExpired { hold_id: Uuid },

    /// The hold was released; its units went back to stock.
    #[error("hold {hold_id} was released")]
    HoldReleased { hold_id: Uuid },

    /// The product's sale window has not opened yet.
    #[error("the sale of product {product_id} has not started")]
    SaleNotStarted { product_id: Uuid },

    /// The product's sale window has closed.
    #[error("the sale of product {product_id} has ended")]
    SaleEnded { product_id: Uuid },

    /// The hold would take its buyer past the product's per-buyer limit.
    #[error("buyer may take only {remaining} more units of product {product_id}")]
    BuyerLimitExceeded { product_id: Uuid, remaining: i64 },

    /// Stock was withdrawn while buyers waited for it.
    #[error("stock of product {product_id} was withdrawn")]
    StockWithdrawn { product_id: Uuid },

    /// The hold cannot be extended past its maximum lifetime.
    #[error("hold {hold_id} reached its maximum lifetime")]
    HoldLifetimeExceeded { hold_id: Uuid },

    /// Too many calls are running: this one is refused at once rather than queued.
    #[error("the server is at its limit of concurrent calls; retry with backoff")]
    Overloaded,

    /// The order is paid: it can no longer be cancelled.
    #[error("order {order_id} is paid")]
    OrderPaid { order_id: Uuid },

    /// The payment event exists but owes no refund.
    #[error("payment event {key:?} owes no refund")]
    NoRefundOwed { key: String },

    /// An idempotency key (or client request id) came back with a different request.
    #[error("{field} {key:?} was already used for a different request")]
    IdempotencyKeyReused { field: &'static str, key: String },

    /// A payment reported an amount other than the order total.
    #[error("amount_cents {reported} does not match the order total {expected}")]
    AmountMismatch { expected: i64, reported: i64 },

    /// A withdrawal would take stock_total below what is already reserved or sold.
    #[error(
        "stock_total would become {requested_total}, below the {committed} units reserved or sold"
    )]
    StockBelowCommitted {
        product_id: Uuid,
        requested_total: i64,
        committed: i64,
    },

    /// A unique constraint refused a row no operation expected to collide (expected races,
    /// such as a taken client request id, are resolved where they happen): ABORTED.
    #[error("unique constraint {constraint} refused a duplicate")]
    UniqueViolation { constraint: String },

    /// The call carried no token, or one nobody knows.
    #[error("a valid bearer token is required (authorization: Bearer <token>)")]
    Unauthenticated,

    /// The caller's token lacks the scope the call needs.
    #[error("token {token:?} lacks the scope {scope:?}")]
    MissingScope { token: String, scope: &'static str },

    /// The database cannot be reached, went away mid-call or did not answer in time;
    /// nothing was applied, unless the answer was lost with the commit in flight (so
    /// callers retry with the same key).
    #[error("database unavailable: {0}")]
    Unavailable(#[source] Source),

    /// This server is shutting down; the caller should go to another instance.
    #[error("server is shutting down; reconnect to another instance")]
    ShuttingDown,

    /// The transaction lost a race it cannot win now (deadlock, serialization); retry.
    #[error("transaction conflict: {0}")]
    Conflict(#[source] Source),

    /// A bug or an unexpected database state.
    #[error("internal error: {0}")]
    Internal(#[source] Source),
}

impl DomainError {
    /// The database is reachable but its schema is not in place yet (the server is
    /// starting and migrations have not finished): `Unavailable`, retry shortly.
    pub fn not_migrated() -> Self {
        DomainError::Unavailable(message_source(
            "the database is not migrated yet (the server is starting); retry shortly",
        ))
    }

    /// Shorthand for [`DomainError::InvalidArgument`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        DomainError::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// Shorthand for [`DomainError::NotFound`].
    pub fn not_found(entity: &'static str, id: impl ToString) -> Self {
        DomainError::NotFound {
            entity,
            id: id.to_string(),
        }
    }

    /// Shorthand for [`DomainError::Internal`] with a message of our own.
    pub fn internal(message: impl Into<String>) -> Self {
        DomainError::Internal(message_source(message))
    }

    /// Shorthand for [`DomainError::Conflict`] with a message of our own.
    pub fn conflict(message: impl Into<String>) -> Self {
        DomainError::Conflict(message_source(message))
    }

    /// The machine-readable reason clients switch on (`google.rpc.ErrorInfo.reason`).
    pub fn reason(&self) -> &'static str {
        match self {
            DomainError::InvalidArgument { .. } => "INVALID_ARGUMENT",
            DomainError::NotFound { .. } => "NOT_FOUND",
            DomainError::InsufficientStock { .. } => "INSUFFICIENT_STOCK",
            DomainError::HoldConverted { .. } => "HOLD_CONVERTED",
            DomainError::HoldExpired { .. } => "HOLD_EXPIRED",
            DomainError::HoldReleased { .. } => "HOLD_RELEASED",
            DomainError::OrderPaid { .. } => "ORDER_PAID",
            DomainError::Overloaded => "OVERLOADED",
            DomainError::SaleNotStarted { .. } => "SALE_NOT_STARTED",
            DomainError::SaleEnded { .. } => "SALE_ENDED",
            DomainError::StockWithdrawn { .. } => "STOCK_WITHDRAWN",
            DomainError::BuyerLimitExceeded { .. } => "BUYER_LIMIT_EXCEEDED",
            DomainError::HoldLifetimeExceeded { .. } => "HOLD_LIFETIME_EXCEEDED",
            DomainError::NoRefundOwed { .. } => "NO_REFUND_OWED",
            DomainError::IdempotencyKeyReused { .. } => "IDEMPOTENCY_KEY_REUSED",
            DomainError::AmountMismatch { .. } => "AMOUNT_MISMATCH",
            DomainError::StockBelowCommitted { .. } => "STOCK_BELOW_COMMITTED",
            DomainError::UniqueViolation { .. } => "DUPLICATE",
            DomainError::Unavailable(_) => "DATABASE_UNAVAILABLE",
            DomainError::ShuttingDown => "SHUTTING_DOWN",
            DomainError::Unauthenticated => "UNAUTHENTICATED",
            DomainError::MissingScope { .. } => "MISSING_SCOPE",
            DomainError::Conflict(_) => "TRANSACTION_CONFLICT",
            DomainError::Internal(_) => "INTERNAL",
        }
    }
}

/// A message of our own as an error source.
fn message_source(message: impl Into<String>) -> Source {
    Arc::from(Box::<dyn std::error::Error + Send + Sync>::from(
        message.into(),
    ))
}

/// Message fragments of PostgreSQL errors that mean the server or the connection went away
/// (SQLSTATE 57P01..57P03 and lost sockets; diesel reports them without a kind of their own).
const CONNECTION_LOST_MESSAGES: &[&str] = &[
    "terminating connection",
    "the database system is",
    "connection closed",
    "server closed the connection",
];

impl From<DieselError> for DomainError {
    fn from(error: DieselError) -> Self {
        let kind = match &error {
            DieselError::DatabaseError(kind, info) => match kind {
                DatabaseErrorKind::UniqueViolation => {
                    return DomainError::UniqueViolation {
                        constraint: info.constraint_name().unwrap_or_default().to_owned(),
                    };
                }
                DatabaseErrorKind::SerializationFailure => DomainError::Conflict,
                DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand => {
                    DomainError::Unavailable
                }
                _ if info.message().contains("deadlock detected") => DomainError::Conflict,
                // lock_timeout: another transaction held the row too long; worth a retry.
                _ if info.message().contains("due to lock timeout") => DomainError::Conflict,
                // statement_timeout: the database is too slow to answer now.
                _ if info.message().contains("due to statement timeout") => {
                    DomainError::Unavailable
                }
                _ if CONNECTION_LOST_MESSAGES
                    .iter()
                    .any(|needle| info.message().contains(needle)) =>
                {
                    DomainError::Unavailable
                }
                _ => DomainError::Internal,
            },
            DieselError::BrokenTransactionManager => DomainError::Unavailable,
            _ => DomainError::Internal,
        };
        kind(Arc::new(error))
    }
}

impl From<diesel_async::pooled_connection::deadpool::PoolError> for DomainError {
    fn from(error: diesel_async::pooled_connection::deadpool::PoolError) -> Self {
        DomainError::Unavailable(Arc::new(error))
    }
}
