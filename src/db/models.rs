//! Rows as the database stores them, and the status enums stored as text.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use uuid::Uuid;

use super::schema::{holds, orders, payment_events, products};

/// Declares an enum stored as a lowercase `TEXT` column (the schema's `CHECK` constraint
/// lists the same texts): strum derives the text (`snake_case` of the variant), and the
/// diesel conversions go through it.
macro_rules! text_enum {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, diesel::AsExpression, diesel::FromSqlRow)]
        #[derive(strum::EnumString, strum::IntoStaticStr)]
        #[diesel(sql_type = diesel::sql_types::Text)]
        #[strum(serialize_all = "snake_case")]
        $vis enum $name { $($variant),+ }

        impl diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut diesel::serialize::Output<'b, '_, diesel::pg::Pg>,
            ) -> diesel::serialize::Result {
                let text: &'static str = self.into();
                <str as diesel::serialize::ToSql<diesel::sql_types::Text, diesel::pg::Pg>>::to_sql(
                    text, out,
                )
            }
        }

        impl diesel::deserialize::FromSql<diesel::sql_types::Text, diesel::pg::Pg> for $name {
            fn from_sql(value: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
                let text = <String as diesel::deserialize::FromSql<
                    diesel::sql_types::Text,
                    diesel::pg::Pg,
                >>::from_sql(value)?;
                Ok(text.parse::<$name>()?)
            }
        }
    };
}
pub(crate) use text_enum;

text_enum! {
    /// Where a hold is in its life: only `Active` holds reserve stock on their own.
    pub enum HoldStatus { Active, Converted, Expired, Released }
}

text_enum! {
    /// Where an order is in its life; it only moves forward, from `Pending`.
    pub enum OrderStatus { Pending, Paid, Cancelled }
}

text_enum! {
    /// Why a cancelled order was cancelled.
    pub enum CancelReason { PaymentFailed, PaymentTimeout, BuyerCancelled }
}

text_enum! {
    /// What the payment provider reported.
    pub enum PaymentResult { Success, Failure }
}

text_enum! {
    /// What a stored payment event did (a duplicate delivery is never stored).
    pub enum EventOutcome { Applied, Deferred, Ignored, RefundRequired }
}

impl OrderStatus {
    /// Paid and cancelled orders never change again.
    pub fn is_final(self) -> bool {
        self != OrderStatus::Pending
    }
}

/// A product row with its stock counters.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable)]
#[diesel(table_name = products, check_for_backend(diesel::pg::Pg))]
pub struct Product {
    pub id: Uuid,
    pub name: String,
    pub price_cents: i64,
    pub stock_total: i64,
    pub reserved: i64,
    pub sold: i64,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Most units one buyer may hold or have ordered; 0: no limit.
    pub max_per_buyer: i64,
    /// Holds are granted from here (if set)...
    pub sale_starts_at: Option<DateTime<Utc>>,
    /// ...until before here (if set).
    pub sale_ends_at: Option<DateTime<Utc>>,
    /// Buyers waiting in its waitlist.
    pub waiting: i64,
}

impl Product {
    /// Units nobody holds or bought: `stock_total - reserved - sold`.
    pub fn available(&self) -> i64 {
        self.stock_total - self.reserved - self.sold
    }
}

/// A hold row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable, Insertable)]
#[diesel(table_name = holds, check_for_backend(diesel::pg::Pg))]
pub struct Hold {
    pub id: Uuid,
    pub product_id: Uuid,
    pub qty: i64,
    pub status: HoldStatus,
    pub client_request_id: Option<String>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The buyer it was taken for, counted against its product's max_per_buyer.
    pub buyer_id: Option<String>,
}

/// An order row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, QueryableByName, Selectable, Insertable)]
#[diesel(table_name = orders, check_for_backend(diesel::pg::Pg))]
pub struct Order {
    pub id: Uuid,
    pub hold_id: Uuid,
    pub product_id: Uuid,
    pub qty: i64,
    pub total_cents: i64,
    pub status: OrderStatus,
    pub failure_reason: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// Still pending then, the order is cancelled (`PaymentTimeout`).
    pub payment_due_at: DateTime<Utc>,
    /// Set exactly when the order is cancelled.
    pub cancel_reason: Option<CancelReason>,
}

/// A stored payment webhook delivery, keyed by its idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = payment_events, check_for_backend(diesel::pg::Pg))]
pub struct PaymentEvent {
    pub idempotency_key: String,
    pub target_order_id: Option<Uuid>,
    pub target_hold_id: Option<Uuid>,
    pub result: PaymentResult,
    pub failure_reason: String,
    pub amount_cents: i64,
    pub outcome: EventOutcome,
    pub order_id: Option<Uuid>,
    pub order_status: Option<OrderStatus>,
    pub received_at: DateTime<Utc>,
    pub processed_at: Option<DateTime<Utc>>,
    /// The name of the token that delivered it; the key is unique per caller.
    pub caller: String,
    /// When an operator said the refund it requires was made.
    pub refunded_at: Option<DateTime<Utc>>,
}
