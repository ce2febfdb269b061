//! Conversions between proto messages and domain values. Parsing failures name the
//! request field they came from.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::pb;
use crate::db::audit::AuditRow;
use crate::db::models::{
    Hold, HoldStatus, Order, OrderStatus, PaymentEvent, PaymentResult, Product,
};
use crate::db::payments::RefundCursor;
use crate::domain::availability::StockSnapshot;
use crate::domain::payments::{WebhookOutcome, WebhookReceipt};
use crate::domain::{Caller, DomainError};

/// Who sent a call, as the guard in front of the service found out
/// ([`super::guard::Guarded`]); a call that did not pass a guard is refused.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<Caller, DomainError> {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| DomainError::internal("the call did not pass the token guard"))
}

/// Parses an id field; `field` names it in the error.
pub fn parse_id(field: &'static str, value: &str) -> Result<Uuid, DomainError> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    Uuid::parse_str(value).map_err(|_| {
        DomainError::invalid(
            field,
            format!("{} is not a valid id (a UUID)", preview(value)),
        )
    })
}

/// How many characters of a bad value an error quotes.
const PREVIEW_CHARS: usize = 40;

/// A bad value as an error quotes it: escaped, and only its first [`PREVIEW_CHARS`]
/// characters, so a hostile value cannot bloat the answer or the logs.
pub fn preview(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    match chars.next() {
        None => format!("{head:?}"),
        Some(_) => format!("{head:?}... ({} bytes)", value.len()),
    }
}

/// Parses a list of ids; the error names the field and the position.
pub fn parse_ids(field: &'static str, values: &[String]) -> Result<Vec<Uuid>, DomainError> {
    values.iter().map(|value| parse_id(field, value)).collect()
}

/// An optional text field: empty means absent.
pub fn optional_text(value: String) -> Option<String> {
    (!value.is_empty()).then_some(value)
}

/// The payment result of a webhook; unspecified is refused.
pub fn payment_result(value: i32) -> Result<PaymentResult, DomainError> {
    match pb::PaymentResult::try_from(value) {
        Ok(pb::PaymentResult::Success) => Ok(PaymentResult::Success),
        Ok(pb::PaymentResult::Failure) => Ok(PaymentResult::Failure),
        _ => Err(DomainError::invalid(
            "result",
            "must be PAYMENT_RESULT_SUCCESS or PAYMENT_RESULT_FAILURE",
        )),
    }
}

/// A protobuf timestamp.
fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

impl From<Product> for pb::Product {
    fn from(product: Product) -> Self {
        pb::Product {
            available: product.available(),
            id: product.id.to_string(),
            name: product.name,
            price_cents: product.price_cents,
            stock_total: product.stock_total,
            reserved: product.reserved,
            sold: product.sold,
            version: product.version,
            max_per_buyer: product.max_per_buyer,
            sale_starts_at: product.sale_starts_at.map(timestamp),
            sale_ends_at: product.sale_ends_at.map(timestamp),
            waiting: product.waiting,
        }
    }
}

impl From<HoldStatus> for pb::HoldStatus {
    fn from(status: HoldStatus) -> Self {
        match status {
            HoldStatus::Active => pb::HoldStatus::Active,
            HoldStatus::Converted => pb::HoldStatus::Converted,
            HoldStatus::Expired => pb::HoldStatus::Expired,
            HoldStatus::Released => pb::HoldStatus::Released,
        }
    }
}

impl From<Hold> for pb::Hold {
    fn from(hold: Hold) -> Self {
        pb::Hold {
            hold_id: hold.id.to_string(),
            product_id: hold.product_id.to_string(),
            qty: hold.qty,
            status: pb::HoldStatus::from(hold.status).into(),
            expires_at: Some(timestamp(hold.expires_at)),
            created_at: Some(timestamp(hold.created_at)),
            client_request_id: hold.client_request_id.unwrap_or_default(),
            buyer_id: hold.buyer_id.unwrap_or_default(),
        }
    }
}

impl From<OrderStatus> for pb::OrderStatus {
    fn from(status: OrderStatus) -> Self {
        match status {
            OrderStatus::Pending => pb::OrderStatus::Pending,
            OrderStatus::Paid => pb::OrderStatus::Paid,
            OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
        }
    }
}

impl From<Order> for pb::Order {
    fn from(order: Order) -> Self {
        pb::Order {
            order_id: order.id.to_string(),
            hold_id: order.hold_id.to_string(),
            product_id: order.product_id.to_string(),
            qty: order.qty,
            total_cents: order.total_cents,
            status: pb::OrderStatus::from(order.status).into(),
            failure_reason: order.failure_reason,
            created_at: Some(timestamp(order.created_at)),
            updated_at: Some(timestamp(order.updated_at)),
            payment_due_at: Some(timestamp(order.payment_due_at)),
            cancel_reason: order
                .cancel_reason
                .map(|reason| <&'static str>::from(reason).to_owned())
                .unwrap_or_default(),
        }
    }
}

impl From<WebhookOutcome> for pb::WebhookOutcome {
    fn from(outcome: WebhookOutcome) -> Self {
        match outcome {
            WebhookOutcome::Applied => pb::WebhookOutcome::Applied,
            WebhookOutcome::Duplicate => pb::WebhookOutcome::Duplicate,
            WebhookOutcome::Deferred => pb::WebhookOutcome::Deferred,
            WebhookOutcome::Ignored => pb::WebhookOutcome::Ignored,
            WebhookOutcome::RefundRequired => pb::WebhookOutcome::RefundRequired,
        }
    }
}

impl From<WebhookReceipt> for pb::HandlePaymentWebhookResponse {
    fn from(receipt: WebhookReceipt) -> Self {
        pb::HandlePaymentWebhookResponse {
            idempotency_key: receipt.idempotency_key,
            order_id: receipt
                .order_id
                .map(|id| id.to_string())
                .unwrap_or_default(),
            order_status: receipt
                .order_status
                .map(pb::OrderStatus::from)
                .unwrap_or_default()
                .into(),
            outcome: pb::WebhookOutcome::from(receipt.outcome).into(),
        }
    }
}

impl From<StockSnapshot> for pb::AvailabilityUpdate {
    fn from(snapshot: StockSnapshot) -> Self {
        pb::AvailabilityUpdate {
            available: snapshot.available(),
            product_id: snapshot.product_id.to_string(),
            stock_total: snapshot.stock_total,
            reserved: snapshot.reserved,
            sold: snapshot.sold,
            version: snapshot.version,
            changed_at: Some(timestamp(snapshot.changed_at)),
            max_per_buyer: snapshot.max_per_buyer,
            sale_starts_at: snapshot.sale_starts_at.map(timestamp),
            sale_ends_at: snapshot.sale_ends_at.map(timestamp),
            waiting: snapshot.waiting,
        }
    }
}

impl From<AuditRow> for pb::ProductAudit {
    fn from(row: AuditRow) -> Self {
        let counters = |stock_total: i64, reserved: i64, sold: i64, waiting: i64, owed: i64| {
            pb::StockCounters {
                stock_total,
                reserved,
                sold,
                available: stock_total - reserved - sold,
                waiting,
                owed,
            }
        };
        pb::ProductAudit {
            consistent: row.consistent(),
            product_id: row.product_id.to_string(),
            stored: Some(counters(
                row.stock_total,
                row.reserved,
                row.sold,
                row.waiting,
                row.owed,
            )),
            recomputed: Some(counters(
                row.recomputed_stock_total,
                row.recomputed_reserved,
                row.recomputed_sold,
                row.recomputed_waiting,
                row.recomputed_owed,
            )),
            overdue_orders: row.overdue_orders,
            refunds_owed: row.refunds_owed,
        }
    }
}

impl From<PaymentEvent> for pb::Refund {
    fn from(event: PaymentEvent) -> Self {
        let target = match (event.target_order_id, event.target_hold_id) {
            (Some(order_id), _) => Some(pb::refund::Target::OrderId(order_id.to_string())),
            (None, Some(hold_id)) => Some(pb::refund::Target::HoldId(hold_id.to_string())),
            (None, None) => None,
        };
        pb::Refund {
            caller: event.caller,
            idempotency_key: event.idempotency_key,
            target,
            amount_cents: event.amount_cents,
            received_at: Some(timestamp(event.received_at)),
            refunded_at: event.refunded_at.map(timestamp),
        }
    }
}

/// Separates the parts of a refunds page token (keys and token names hold no control
/// characters).
const CURSOR_SEPARATOR: char = '\n';

/// The opaque token of the page after `cursor`: URL-safe base64 of its parts.
pub fn refund_page_token(cursor: &RefundCursor) -> String {
    let text = format!(
        "{}{CURSOR_SEPARATOR}{}{CURSOR_SEPARATOR}{}",
        cursor.received_at.timestamp_micros(),
        cursor.caller,
        cursor.idempotency_key
    );
    URL_SAFE_NO_PAD.encode(text)
}

/// Reads a token made by [`refund_page_token`]; `field` names it in the error.
pub fn parse_refund_page_token(
    field: &'static str,
    token: &str,
) -> Result<RefundCursor, DomainError> {
    let invalid = || DomainError::invalid(field, "is not a page token this server gave");
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let mut parts = text.splitn(3, CURSOR_SEPARATOR);
    let (Some(micros), Some(caller), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(invalid());
    };
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let received_at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok(RefundCursor {
        received_at,
        caller: caller.to_owned(),
        idempotency_key: key.to_owned(),
    })
}

/// A timestamp field as the domain takes it; `field` names it in the error.
pub fn parse_timestamp(
    field: &'static str,
    value: prost_types::Timestamp,
) -> Result<DateTime<Utc>, DomainError> {
    u32::try_from(value.nanos)
        .ok()
        .and_then(|nanos| DateTime::from_timestamp(value.seconds, nanos))
        .ok_or_else(|| DomainError::invalid(field, "is not a valid timestamp"))
}
