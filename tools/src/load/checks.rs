//! The checks at the end of a scenario: each prints `check: <what>: PASS|FAIL`; any
//! failure makes the run return an error, so `flashsale-tools load` exits non-zero.

use super::conn::Connection;

use super::LoadError;
use flashsale::domain::products::MAX_AUDITED_PRODUCTS;
use flashsale::grpc::pb::{
    self, checkout_service_client::CheckoutServiceClient,
    inventory_admin_service_client::InventoryAdminServiceClient,
};

/// The checks of one run and which of them failed.
#[derive(Debug, Default)]
pub struct Checks {
    /// What each failed check claimed, for the final error.
    failures: Vec<String>,
}

impl Checks {
    /// Prints one check and remembers it if it failed.
    pub fn expect(&mut self, passed: bool, what: impl std::fmt::Display) {
        let verdict = if passed { "PASS" } else { "FAIL" };
        println!("check: {what}: {verdict}");
        if !passed {
            self.failures.push(what.to_string());
        }
    }

    /// The books of `product_ids`: no oversell on any product (`available >= 0`,
    /// `stock_total == available + reserved + sold`) and `AuditInventory` consistent.
    /// Returns the products as read, for the scenario's own checks.
    pub async fn books(
        &mut self,
        connection: &Connection,
        product_ids: &[String],
    ) -> Result<Vec<pb::Product>, LoadError> {
        let products = read_products(connection, product_ids).await?;
        let oversold: Vec<&pb::Product> = products.iter().filter(|p| !adds_up(p)).collect();
        for product in &oversold {
            println!(
                "  product {}: stock_total {} available {} reserved {} sold {}",
                product.id, product.stock_total, product.available, product.reserved, product.sold
            );
        }
        let audited = audit(connection, product_ids).await?;
        for entry in audited.iter().filter(|entry| !entry.consistent) {
            println!(
                "  audit {}: stored {:?} recomputed {:?}",
                entry.product_id, entry.stored, entry.recomputed
            );
        }
        let consistent = audited.iter().all(|entry| entry.consistent);
        let audited_all = audited.len() == product_ids.len();
        self.expect(
            consistent && audited_all && oversold.is_empty(),
            "audit consistent, no oversell",
        );
        Ok(products)
    }

    /// `Ok` when every check passed, else an error naming the failed ones.
    pub fn finish(self) -> Result<(), LoadError> {
        if self.failures.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{} check(s) failed: {}",
            self.failures.len(),
            self.failures.join("; ")
        )
        .into())
    }
}

/// Whether a product's counters add up and nothing is oversold.
fn adds_up(product: &pb::Product) -> bool {
    product.available >= 0
        && product.stock_total == product.available + product.reserved + product.sold
}

/// Reads each product with GetProduct.
pub async fn read_products(
    connection: &Connection,
    product_ids: &[String],
) -> Result<Vec<pb::Product>, LoadError> {
    let mut checkout = CheckoutServiceClient::new(connection.clone());
    let mut products = Vec::with_capacity(product_ids.len());
    for id in product_ids {
        let request = pb::GetProductRequest {
            product_id: id.clone(),
        };
        let product = checkout
            .get_product(request)
            .await
            .map_err(|status| format!("cannot read product {id}: {}", status.message()))?;
        products.push(product.into_inner());
    }
    Ok(products)
}

/// Runs AuditInventory on `product_ids`, as many at a time as one call may name.
async fn audit(
    connection: &Connection,
    product_ids: &[String],
) -> Result<Vec<pb::ProductAudit>, LoadError> {
    let mut admin = InventoryAdminServiceClient::new(connection.clone());
    let mut audited = Vec::with_capacity(product_ids.len());
    for chunk in product_ids.chunks(MAX_AUDITED_PRODUCTS) {
        let request = pb::AuditInventoryRequest {
            product_ids: chunk.to_vec(),
        };
        let response = admin
            .audit_inventory(request)
            .await
            .map_err(|status| format!("cannot audit the inventory: {}", status.message()))?;
        audited.extend(response.into_inner().products);
    }
    Ok(audited)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_check_fails_the_run() {
        let mut checks = Checks::default();
        checks.expect(true, "fine");
        assert!(Checks::default().finish().is_ok());
        checks.expect(false, "reserved 1 == 0");
        let error = checks.finish().unwrap_err().to_string();
        assert!(error.contains("reserved 1 == 0"), "{error}");
    }

    #[test]
    fn oversell_is_seen() {
        let product = |available, reserved, sold| pb::Product {
            stock_total: 10,
            available,
            reserved,
            sold,
            ..Default::default()
        };
        assert!(adds_up(&product(2, 3, 5)));
        assert!(!adds_up(&product(-1, 6, 5)));
        assert!(!adds_up(&product(3, 3, 5)));
    }
}
