//! Refunds owed: successes that could not be applied (see [`super::payments`]), listed for
//! the operators until they mark them refunded; and the retention of webhook keys.

use std::time::Duration;

use chrono::TimeDelta;

use super::products::page_limit;
use super::{Checkout, DomainError, check_key};
use crate::db::models::PaymentEvent;
use crate::db::payments::{
    RefundCursor, delete_expired_events, find_event, list_refunds_owed, mark_refunded,
};

/// One page of refunds owed.
#[derive(Debug, Clone)]
pub struct RefundPage {
    /// The events, oldest first.
    pub refunds: Vec<PaymentEvent>,
    /// Where the next page starts; `None` on the last page.
    pub next_after: Option<RefundCursor>,
}

impl Checkout {
    /// A page of the refunds still owed, oldest first; `page_size` 0 means the default.
    pub async fn list_refunds_required(
        &self,
        page_size: i64,
        after: Option<RefundCursor>,
    ) -> Result<RefundPage, DomainError> {
        let limit = page_limit(page_size)?;
        let mut conn = self.conn().await?;
        // One more than the page, to know whether another page follows.
        let mut refunds = list_refunds_owed(&mut conn, after.as_ref(), limit + 1).await?;
        let next_after = if refunds.len() as i64 > limit {
            refunds.truncate(limit as usize);
            refunds.last().map(|event| RefundCursor {
                received_at: event.received_at,
                caller: event.caller.clone(),
                idempotency_key: event.idempotency_key.clone(),
            })
        } else {
            None
        };
        Ok(RefundPage {
            refunds,
            next_after,
        })
    }

    /// Records that the refund `caller`'s webhook `key` required was made; marking it again
    /// changes nothing. An unknown key is `NotFound`; an event that owes no refund is
    /// refused.
    pub async fn mark_refunded(
        &self,
        caller: &str,
        key: &str,
    ) -> Result<PaymentEvent, DomainError> {
        if key.is_empty() {
            return Err(DomainError::invalid("idempotency_key", "must not be empty"));
        }
        check_key("idempotency_key", key)?;
        check_key("caller", caller)?;
        let mut conn = self.conn().await?;
        if let Some(event) = mark_refunded(&mut conn, caller, key).await? {
            return Ok(event);
        }
        match find_event(&mut conn, caller, key).await? {
            Some(_) => Err(DomainError::NoRefundOwed {
                key: key.to_owned(),
            }),
            None => Err(DomainError::not_found("payment event", key)),
        }
    }

    /// Deletes up to `batch_size` webhook events received more than `retention` ago (never
    /// one still waiting on its hold, nor a refund still owed); returns how many.
    pub async fn delete_expired_webhook_keys(
        &self,
        retention: Duration,
        batch_size: i64,
    ) -> Result<usize, DomainError> {
        let retention = TimeDelta::from_std(retention).unwrap_or(TimeDelta::MAX);
        let mut conn = self.conn().await?;
        Ok(delete_expired_events(&mut conn, retention, batch_size).await?)
    }
}
