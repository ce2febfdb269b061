//! `flashsale.v1.InventoryAdminService`: catalogue, stock levels and the audit.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{
    caller, optional_text, parse_id, parse_ids, parse_refund_page_token, parse_timestamp,
    refund_page_token,
};
use super::pb::{self, inventory_admin_service_server::InventoryAdminService};
use crate::db::products::SaleTerms;
use crate::domain::Checkout;
use crate::domain::DomainError;
use crate::domain::products::{NewProduct, StockAdjustment, TermsUpdate};

/// The admin API over the shared domain.
pub struct AdminApi {
    /// The operations every handler delegates to.
    checkout: Arc<Checkout>,
}

impl AdminApi {
    /// Wires the API to the domain.
    pub fn new(checkout: Arc<Checkout>) -> Self {
        AdminApi { checkout }
    }
}

#[tonic::async_trait]
impl InventoryAdminService for AdminApi {
    async fn create_product(
        &self,
        request: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let new = NewProduct {
            name: request.name,
            price_cents: request.price_cents,
            stock_total: request.stock_total,
            terms: SaleTerms {
                max_per_buyer: request.max_per_buyer,
                sale_starts_at: optional_timestamp("sale_starts_at", request.sale_starts_at)?,
                sale_ends_at: optional_timestamp("sale_ends_at", request.sale_ends_at)?,
            },
            caller,
            request_id: optional_text(request.request_id),
        };
        Ok(Response::new(
            self.checkout.create_product(new).await?.into(),
        ))
    }

    async fn update_product(
        &self,
        request: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let request = request.into_inner();
        let product = request
            .product
            .ok_or_else(|| DomainError::invalid("product", "must name the product to update"))?;
        let id = parse_id("product.id", &product.id)?;
        let paths = request
            .update_mask
            .map(|mask| mask.paths)
            .unwrap_or_default();
        if paths.is_empty() {
            return Err(
                DomainError::invalid("update_mask", "must name the fields to change").into(),
            );
        }
        let mut update = TermsUpdate::default();
        for path in &paths {
            match path.as_str() {
                "max_per_buyer" => update.max_per_buyer = Some(product.max_per_buyer),
                "sale_starts_at" => {
                    update.sale_starts_at = Some(optional_timestamp(
                        "product.sale_starts_at",
                        product.sale_starts_at,
                    )?)
                }
                "sale_ends_at" => {
                    update.sale_ends_at = Some(optional_timestamp(
                        "product.sale_ends_at",
                        product.sale_ends_at,
                    )?)
                }
                _ => {
                    return Err(DomainError::invalid(
                        "update_mask",
                        "may name max_per_buyer, sale_starts_at and sale_ends_at",
                    )
                    .into());
                }
            }
        }
        Ok(Response::new(
            self.checkout.update_product(id, update).await?.into(),
        ))
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let adjustment = StockAdjustment {
            product_id: parse_id("product_id", &request.product_id)?,
            delta: request.delta,
            caller,
            request_id: optional_text(request.request_id),
        };
        Ok(Response::new(
            self.checkout.adjust_stock(adjustment).await?.into(),
        ))
    }

    async fn audit_inventory(
        &self,
        request: Request<pb::AuditInventoryRequest>,
    ) -> Result<Response<pb::AuditInventoryResponse>, Status> {
        let ids = parse_ids("product_ids", &request.get_ref().product_ids)?;
        let products: Vec<pb::ProductAudit> = self
            .checkout
            .audit(&ids)
            .await?
            .into_iter()
            .map(Into::into)
            .collect();
        Ok(Response::new(pb::AuditInventoryResponse {
            consistent: products.iter().all(|product| product.consistent),
            overdue_orders: products.iter().map(|product| product.overdue_orders).sum(),
            refunds_owed: products.iter().map(|product| product.refunds_owed).sum(),
            products,
        }))
    }

    async fn list_refunds_required(
        &self,
        request: Request<pb::ListRefundsRequiredRequest>,
    ) -> Result<Response<pb::ListRefundsRequiredResponse>, Status> {
        let request = request.into_inner();
        let after = optional_text(request.page_token)
            .map(|token| parse_refund_page_token("page_token", &token))
            .transpose()?;
        let page = self
            .checkout
            .list_refunds_required(request.page_size.into(), after)
            .await?;
        Ok(Response::new(pb::ListRefundsRequiredResponse {
            refunds: page.refunds.into_iter().map(Into::into).collect(),
            next_page_token: page
                .next_after
                .as_ref()
                .map(refund_page_token)
                .unwrap_or_default(),
        }))
    }

    async fn mark_refunded(
        &self,
        request: Request<pb::MarkRefundedRequest>,
    ) -> Result<Response<pb::Refund>, Status> {
        let request = request.into_inner();
        let event = self
            .checkout
            .mark_refunded(&request.caller, &request.idempotency_key)
            .await?;
        Ok(Response::new(event.into()))
    }
}

/// An optional timestamp field; `field` names it if it is not a valid time.
fn optional_timestamp(
    field: &'static str,
    value: Option<prost_types::Timestamp>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, DomainError> {
    value.map(|value| parse_timestamp(field, value)).transpose()
}
