//! `flashsale.v1.InventoryAdminService`: catalogue, stock levels and the audit.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{parse_id, parse_ids};
use super::pb::{self, inventory_admin_service_server::InventoryAdminService};
use crate::domain::Checkout;
use crate::domain::products::NewProduct;

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
        let request = request.into_inner();
        let new = NewProduct {
            name: request.name,
            price_cents: request.price_cents,
            stock_total: request.stock_total,
        };
        Ok(Response::new(
            self.checkout.create_product(new).await?.into(),
        ))
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let request = request.into_inner();
        let id = parse_id("product_id", &request.product_id)?;
        Ok(Response::new(
            self.checkout.adjust_stock(id, request.delta).await?.into(),
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
            products,
        }))
    }
}
