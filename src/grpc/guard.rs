//! Every call to a guarded service passes the [`Authorizer`] first: the scope it needs
//! follows from its method, and a refusal is answered without reaching the handler. An
//! allowed call carries its [`Caller`] in the request's extensions, for the handler
//! ([`super::convert::caller`]).

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::Either;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;

use crate::auth::{Authorizer, Scope};
use crate::domain::Caller;

/// A service whose calls need a token with the scope `scope_of` gives for their method.
#[derive(Clone)]
pub struct Guarded<S> {
    /// The service behind the guard.
    inner: S,
    /// Decides each call.
    authorizer: Arc<Authorizer>,
    /// The scope a method (the last segment of the call's path) needs.
    scope_of: fn(&str) -> Scope,
}

impl<S> Guarded<S> {
    /// Guards `inner`.
    pub fn new(inner: S, authorizer: Arc<Authorizer>, scope_of: fn(&str) -> Scope) -> Self {
        Guarded {
            inner,
            authorizer,
            scope_of,
        }
    }
}

/// CheckoutService: payments for the webhook, checkout for everything else.
pub fn checkout_scope(method: &str) -> Scope {
    match method {
        "HandlePaymentWebhook" => Scope::Payments,
        _ => Scope::Checkout,
    }
}

/// InventoryAdminService: admin for everything.
pub fn admin_scope(_method: &str) -> Scope {
    Scope::Admin
}

impl<S> tower::Service<http::Request<Body>> for Guarded<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    /// The service's own future when allowed, the refusal at once when not: no allocation.
    type Future = Either<S::Future, Ready<Result<Self::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        match self
            .authorizer
            .authorize(request.headers(), (self.scope_of)(method))
        {
            Ok(caller) => {
                request.extensions_mut().insert::<Caller>(caller);
                Either::Left(self.inner.call(request))
            }
            Err(refusal) => Either::Right(ready(Ok(Status::from(refusal).into_http()))),
        }
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}
