//! Rows as the database stores them, and the status enums stored as text.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::Text;
use diesel::{AsExpression, FromSqlRow};
use uuid::Uuid;

use super::schema::{holds, orders, payment_events, products};

/// Implements diesel's `TEXT` conversions for an enum whose text strum derives
/// (`IntoStaticStr` and `EnumString`); the migration's `CHECK` constraint lists the same texts.
macro_rules! text_column {
    ($name:ident) => {
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
pub(crate) use text_column;

/// Where a hold is in its life: only `Active` holds reserve stock on their own.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    AsExpression,
    FromSqlRow,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[diesel(sql_type = Text)]
#[strum(serialize_all = "snake_case")]
pub enum HoldStatus {
    Active,
    Converted,
    Expired,
    Released,
}
text_column!(HoldStatus);

/// Where an order is in its life; it only moves forward, from `Pending`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    AsExpression,
    FromSqlRow,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[diesel(sql_type = Text)]
#[strum(serialize_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    Cancelled,
}
text_column!(OrderStatus);

/// What the payment provider reported.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    AsExpression,
    FromSqlRow,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[diesel(sql_type = Text)]
#[strum(serialize_all = "snake_case")]
pub enum PaymentResult {
    Success,
    Failure,
}
text_column!(PaymentResult);

/// What a stored payment event did (a duplicate delivery is never stored).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    AsExpression,
    FromSqlRow,
    strum::EnumString,
    strum::IntoStaticStr,
)]
#[diesel(sql_type = Text)]
#[strum(serialize_all = "snake_case")]
pub enum EventOutcome {
    Applied,
    Deferred,
    Ignored,
}
text_column!(EventOutcome);

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
}
