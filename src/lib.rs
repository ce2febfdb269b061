//! flashsale: a gRPC inventory and checkout server for flash sales.
//!
//! A map of the crate, from the outside in:
//!
//! - [`cli`]: the `flashsale` command line (`serve`, `seed`); `main.rs` only calls it.
//! - [`server`]: wiring. [`server::run`] takes a bound listener, a [`config::ServerConfig`]
//!   and a shutdown future (SIGTERM from `main`, a oneshot from tests).
//! - [`transport`]: accepted connections whose small writes (one HTTP/2 frame per
//!   streamed update) are coalesced into few syscalls.
//! - [`grpc`]: the API surface: generated code ([`grpc::pb`]), the token check in front
//!   of each service, thin handlers, proto <-> domain conversions, and the one
//!   `From<DomainError> for Status`.
//! - [`auth`]: who may call what: scoped bearer tokens from a file of hashes.
//! - [`domain`]: the checkout rules, transport-neutral: holds, orders, settlement,
//!   payments, products, the reaper and the availability fan-out, and the coalesced paths
//!   (hold batches, stock folds) on shared lanes; every operation returns
//!   `Result<_, DomainError>`.
//! - [`db`]: PostgreSQL: pool, embedded migrations, generated schema, rows, one module
//!   of query functions per table, the change feed (LISTEN), statements that stay
//!   prepared, and the i/o thread that drives the connections. The SQL itself, every
//!   table, function and trigger: `migrations/schema.sql`.
//! - [`local_pg`]: a private PostgreSQL from the machine's binaries, for `serve` without
//!   `DATABASE_URL` and for the test harness.
//! - [`config`]: the server's settings, parsed once into types.
//! - [`metrics`]: the Prometheus series and the endpoint that serves them.
//!
//! `ARCHITECTURE.md` walks a CreateHold and a payment webhook through these layers and
//! names where each invariant is enforced.
//!
//! The load generator and the benchmark are a package of their own, `tools/`
//! (`flashsale-tools load`, `flashsale-tools bench`).

pub mod auth;
pub mod cli;
pub mod config;
pub mod db;
pub mod domain;
pub mod grpc;
pub mod local_pg;
pub mod metrics;
pub mod server;
pub mod transport;
