//! `flashsale.v1.CheckoutService`: converts requests, calls the domain, converts answers.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::convert::{caller, optional_text, parse_id, parse_ids, payment_result};
use super::pb::checkout_service_server::CheckoutService;
use super::pb::{self, handle_payment_webhook_request::Target};
use crate::domain::holds::NewHold;
use crate::domain::payments::{PaymentTarget, PaymentWebhook};
use crate::domain::waitlist::{JoinRequest, WaitlistEvent};
use crate::domain::{Checkout, DomainError};

/// The checkout API over the shared domain.
pub struct CheckoutApi {
    /// The operations every handler delegates to.
    checkout: Arc<Checkout>,
}

impl CheckoutApi {
    /// Wires the API to the domain.
    pub fn new(checkout: Arc<Checkout>) -> Self {
        CheckoutApi { checkout }
    }
}

/// The stream type of JoinWaitlist.
type WaitlistUpdates = Pin<Box<dyn Stream<Item = Result<pb::WaitlistUpdate, Status>> + Send>>;

/// The stream type of WatchAvailability.
type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::AvailabilityUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl CheckoutService for CheckoutApi {
    async fn get_product(
        &self,
        request: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let id = parse_id("product_id", &request.get_ref().product_id)?;
        Ok(Response::new(self.checkout.get_product(id).await?.into()))
    }

    async fn list_products(
        &self,
        request: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let request = request.into_inner();
        let after = optional_text(request.page_token)
            .map(|token| parse_id("page_token", &token))
            .transpose()?;
        let page = self
            .checkout
            .list_products(request.page_size.into(), after)
            .await?;
        Ok(Response::new(pb::ListProductsResponse {
            products: page.products.into_iter().map(Into::into).collect(),
            next_page_token: page.next_after.map(|id| id.to_string()).unwrap_or_default(),
        }))
    }

    async fn create_hold(
        &self,
        request: Request<pb::CreateHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let new = NewHold {
            product_id: parse_id("product_id", &request.product_id)?,
            qty: request.qty,
            caller,
            buyer_id: optional_text(request.buyer_id),
            client_request_id: optional_text(request.client_request_id),
        };
        Ok(Response::new(self.checkout.create_hold(new).await?.into()))
    }

    async fn get_hold(
        &self,
        request: Request<pb::GetHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let id = parse_id("hold_id", &request.get_ref().hold_id)?;
        Ok(Response::new(self.checkout.get_hold(id).await?.into()))
    }

    async fn release_hold(
        &self,
        request: Request<pb::ReleaseHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let id = parse_id("hold_id", &request.get_ref().hold_id)?;
        Ok(Response::new(self.checkout.release_hold(id).await?.into()))
    }

    async fn extend_hold(
        &self,
        request: Request<pb::ExtendHoldRequest>,
    ) -> Result<Response<pb::Hold>, Status> {
        let id = parse_id("hold_id", &request.get_ref().hold_id)?;
        Ok(Response::new(self.checkout.extend_hold(id).await?.into()))
    }

    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let id = parse_id("hold_id", &request.get_ref().hold_id)?;
        Ok(Response::new(self.checkout.create_order(id).await?.into()))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let id = parse_id("order_id", &request.get_ref().order_id)?;
        Ok(Response::new(self.checkout.get_order(id).await?.into()))
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let id = parse_id("order_id", &request.get_ref().order_id)?;
        Ok(Response::new(self.checkout.cancel_order(id).await?.into()))
    }

    async fn handle_payment_webhook(
        &self,
        request: Request<pb::HandlePaymentWebhookRequest>,
    ) -> Result<Response<pb::HandlePaymentWebhookResponse>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let target = match request.target {
            Some(Target::OrderId(id)) => PaymentTarget::Order(parse_id("order_id", &id)?),
            Some(Target::HoldId(id)) => PaymentTarget::Hold(parse_id("hold_id", &id)?),
            None => return Err(DomainError::invalid("target", "set order_id or hold_id").into()),
        };
        let webhook = PaymentWebhook {
            caller,
            idempotency_key: request.idempotency_key,
            target,
            result: payment_result(request.result)?,
            failure_reason: request.failure_reason,
            amount_cents: request.amount_cents,
        };
        Ok(Response::new(
            self.checkout.handle_payment_webhook(webhook).await?.into(),
        ))
    }

    type JoinWaitlistStream = WaitlistUpdates;

    async fn join_waitlist(
        &self,
        request: Request<pb::JoinWaitlistRequest>,
    ) -> Result<Response<Self::JoinWaitlistStream>, Status> {
        let caller = caller(&request)?;
        let request = request.into_inner();
        let join = JoinRequest {
            product_id: parse_id("product_id", &request.product_id)?,
            qty: request.qty,
            buyer_id: optional_text(request.buyer_id),
            caller,
        };
        let events = self.checkout.join_waitlist(join).await?;
        let updates = events.map(|event| match event {
            WaitlistEvent::Position(position) => Ok(pb::WaitlistUpdate {
                update: Some(pb::waitlist_update::Update::Position(position)),
            }),
            WaitlistEvent::Served(hold) => Ok(pb::WaitlistUpdate {
                update: Some(pb::waitlist_update::Update::Hold(hold.into())),
            }),
            WaitlistEvent::Ended(error) => Err(error.into()),
        });
        Ok(Response::new(Box::pin(updates)))
    }

    type WatchAvailabilityStream = UpdateStream;

    async fn watch_availability(
        &self,
        request: Request<pb::WatchAvailabilityRequest>,
    ) -> Result<Response<Self::WatchAvailabilityStream>, Status> {
        let ids = parse_ids("product_ids", &request.get_ref().product_ids)?;
        // Watchers of one connection are woken together, so their updates share writes.
        let connection = request.remote_addr();
        let updates = self.checkout.watch_availability(ids, connection).await?;
        // Updates only end when the server shuts down.
        let shutting_down = futures::stream::once(async { Err(DomainError::ShuttingDown.into()) });
        let stream = updates
            .map(|snapshot| Ok(pb::AvailabilityUpdate::from(snapshot)))
            .chain(shutting_down);
        Ok(Response::new(Box::pin(stream)))
    }
}
