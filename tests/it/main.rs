//! Integration tests: the real server over real gRPC on a real PostgreSQL, one fresh
//! database per test. One test binary (modules below) so the suite links once.

mod support;

mod auth;

mod coalescing;
mod crash;
mod deadlines;
mod flash_crowd;
mod histories;
mod holds;
mod orders;
mod outages;
mod overload;
mod products;
mod reaper;
mod refunds;
mod sale_terms;
mod scaling;
mod schema;
mod service;
mod settlements;
mod smoke;
mod stream;
mod transport;
mod validation;
mod waitlist;
mod webhooks;
mod wire;
