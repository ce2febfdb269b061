//! Every call to a guarded service passes the [`Authorizer`] first: the scope it needs
//! follows from its method, and a refusal is answered without reaching the handler. An
//! allowed call carries its [`Caller`] in the request's extensions, for the handler
//! ([`super::convert::caller`]). Then the in-flight limit: a unary call takes a slot for as
//! long as it runs; with none free it is answered `RESOURCE_EXHAUSTED` at once, not
//! queued. Streams (WatchAvailability, JoinWaitlist) live long and take none. Last, the
//! database budget: a call not answered within the database timeout fails `UNAVAILABLE`
//! (every call's work is the database's), whatever it was waiting for; for a stream, the
//! budget covers opening it.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::Either;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Timeout;
use tonic::Status;
use tonic::body::Body;
use tonic::server::NamedService;
use tracing::Instrument;
use tracing::instrument::Instrumented;

use crate::auth::{Authorizer, Scope};
use crate::domain::{Caller, DomainError};
use crate::metrics::CallSeries;

/// The methods that answer with a long-lived stream: they take no in-flight slot.
const STREAMING_METHODS: [&str; 2] = ["WatchAvailability", "JoinWaitlist"];

/// Every method of the guarded services, so metrics label calls with `'static` names.
const METHODS: [&str; 18] = [
    "GetProduct",
    "ListProducts",
    "CreateHold",
    "GetHold",
    "ReleaseHold",
    "ExtendHold",
    "CreateOrder",
    "GetOrder",
    "CancelOrder",
    "HandlePaymentWebhook",
    "WatchAvailability",
    "JoinWaitlist",
    "CreateProduct",
    "UpdateProduct",
    "AdjustStock",
    "AuditInventory",
    "ListRefundsRequired",
    "MarkRefunded",
];

/// A service whose calls need a token with the scope `scope_of` gives for their method.
#[derive(Clone)]
pub struct Guarded<S> {
    /// The service behind the guard.
    inner: S,
    /// Decides each call.
    authorizer: Arc<Authorizer>,
    /// The scope a method (the last segment of the call's path) needs.
    scope_of: fn(&str) -> Scope,
    /// One permit per unary call running, shared by every guarded service.
    in_flight: Arc<Semaphore>,
    /// The metric series of each of [`METHODS`], then of any other method ("unknown").
    series: Arc<[CallSeries]>,
    /// How long a call may wait for its answer (from the database) before it fails.
    db_timeout: Duration,
    /// Set once migrations ran: before that, the tables a call needs may not exist yet, so
    /// every call is refused UNAVAILABLE (a retry soon succeeds) rather than failing INTERNAL.
    migrated: Arc<AtomicBool>,
}

impl<S: NamedService> Guarded<S> {
    /// Guards `inner`; unary calls share the slots of `in_flight`, each call is answered
    /// within `db_timeout`, and none is let through before `migrated` is set.
    pub fn new(
        inner: S,
        authorizer: Arc<Authorizer>,
        scope_of: fn(&str) -> Scope,
        in_flight: Arc<Semaphore>,
        db_timeout: Duration,
        migrated: Arc<AtomicBool>,
    ) -> Self {
        Guarded {
            inner,
            authorizer,
            scope_of,
            in_flight,
            series: METHODS
                .iter()
                .chain(&["unknown"])
                .map(|method| CallSeries::new(S::NAME, method))
                .collect(),
            db_timeout,
            migrated,
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
    type Future =
        Either<InFlight<Instrumented<S::Future>>, Ready<Result<Self::Response, Infallible>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().rsplit('/').next().unwrap_or_default();
        let metric = CallMetric::start(&self.series, method);
        let refuse = |refusal: DomainError, metric: CallMetric| {
            let status = Status::from(refusal);
            metric.finish(status.code() as i32);
            Either::Right(ready(Ok(status.into_http())))
        };
        let caller = match self
            .authorizer
            .authorize(request.headers(), (self.scope_of)(method))
        {
            Ok(caller) => caller,
            Err(refusal) => return refuse(refusal, metric),
        };
        if !self.migrated.load(Ordering::Acquire) {
            return refuse(DomainError::not_migrated(), metric);
        }
        let slot = if STREAMING_METHODS.contains(&method) {
            None
        } else {
            match self.in_flight.clone().try_acquire_owned() {
                Ok(slot) => Some(slot),
                Err(_) => return refuse(DomainError::Overloaded, metric),
            }
        };
        let span = call_span(method, &caller, request.headers());
        request.extensions_mut().insert::<Caller>(caller);
        let call = self.inner.call(request).instrument(span);
        Either::Left(InFlight {
            inner: tokio::time::timeout(self.db_timeout, call),
            _slot: slot,
            metric: Some(metric),
            db_timeout: self.db_timeout,
        })
    }
}

impl<S: NamedService> NamedService for Guarded<S> {
    const NAME: &'static str = S::NAME;
}

pin_project_lite::pin_project! {
    /// A call's response future, holding its in-flight slot until it completes, and
    /// answering UNAVAILABLE in its place once the database budget is spent.
    pub struct InFlight<F> {
        // The service's future, dropped (with whatever it holds) when the budget runs out.
        #[pin]
        inner: Timeout<F>,
        // Given back when the call's future completes or is dropped.
        _slot: Option<OwnedSemaphorePermit>,
        // Recorded when the call's answer is ready (or, dropped unanswered, as Canceled).
        metric: Option<CallMetric>,
        // The budget, to say what ran out.
        db_timeout: Duration,
    }
}

impl<F> Future for InFlight<F>
where
    F: Future<Output = Result<http::Response<Body>, Infallible>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = match std::task::ready!(this.inner.poll(cx)) {
            Ok(answer) => answer,
            Err(_elapsed) => Ok(out_of_time(*this.db_timeout)),
        };
        if let (Some(metric), Ok(response)) = (this.metric.take(), &answer) {
            // An error is in the headers (trailers-only); an answer's status follows its body.
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            metric.finish(code);
        }
        Poll::Ready(answer)
    }
}

/// The answer of a call the database did not answer within `budget`: what it was doing is
/// dropped (a transaction in flight is rolled back as its connection closes).
fn out_of_time(budget: Duration) -> http::Response<Body> {
    let silence = std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer within {}", humantime::format_duration(budget)),
    );
    Status::from(DomainError::Unavailable(Arc::new(silence))).into_http()
}

/// One call as the gRPC metrics see it: started when made, handled once with its code.
struct CallMetric {
    /// The series of every method of the service.
    series: Arc<[CallSeries]>,
    /// The index of the call's method in `series`.
    method: usize,
    /// For the handling time.
    started: std::time::Instant,
    /// Whether it was recorded as handled.
    done: bool,
}

impl CallMetric {
    /// Counts a call of `method` as started, in `series` (laid out as [`Guarded::series`]).
    fn start(series: &Arc<[CallSeries]>, method: &str) -> CallMetric {
        let method = METHODS
            .iter()
            .position(|known| *known == method)
            .unwrap_or(METHODS.len());
        series[method].started();
        CallMetric {
            series: series.clone(),
            method,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    /// Counts the call as handled with gRPC status `code`.
    fn finish(mut self, code: i32) {
        self.record(code);
    }

    /// Records once.
    fn record(&mut self, code: i32) {
        if !std::mem::replace(&mut self.done, true) {
            self.series[self.method].handled(code, self.started.elapsed());
        }
    }
}

impl Drop for CallMetric {
    /// A call dropped before its answer (deadline passed, client went away) was cancelled.
    fn drop(&mut self) {
        self.record(tonic::Code::Cancelled as i32);
    }
}

/// The span a call's log lines carry: its method, its caller's token name, and the trace
/// it belongs to when the caller sent a W3C `traceparent`.
fn call_span(method: &str, caller: &Caller, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "call",
        rpc = method,
        caller = caller.name(),
        trace_id = tracing::field::Empty,
        parent_span_id = tracing::field::Empty,
    );
    if !span.is_disabled()
        && let Some((trace_id, parent)) = headers
            .get("traceparent")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_traceparent)
    {
        span.record("trace_id", trace_id);
        span.record("parent_span_id", parent);
    }
    span
}

/// The trace id and parent span id of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`).
fn parse_traceparent(value: &str) -> Option<(&str, &str)> {
    let mut parts = value.trim().split('-');
    let (_version, trace_id, parent, _flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |text: &str, len: usize| {
        text.len() == len
            && text.bytes().all(|b| b.is_ascii_hexdigit())
            && text.bytes().any(|b| b != b'0')
    };
    (hex(trace_id, 32) && hex(parent, 16)).then_some((trace_id, parent))
}

#[cfg(test)]
mod tests {
    use super::parse_traceparent;

    #[test]
    fn a_w3c_traceparent_gives_its_trace_and_parent_and_a_malformed_one_nothing() {
        assert_eq!(
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some(("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"))
        );
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-zzf067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }
}
