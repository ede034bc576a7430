//! idemd's integration suite: real gRPC on 127.0.0.1, real PostgreSQL (a fresh database per
//! test on the shared server, or a throwaway cluster for outage tests).

mod admin;
mod admin_auth;
mod behaviour;
mod chaos;
mod client;
mod clients;
mod concurrency;
mod conformance;
mod console;
mod cross_language;
mod deploy;
mod durability;
mod failover;
mod fake_idemd;
mod faults;
mod fuzzing;
mod go_client;
mod grpcurl;
mod harness;
mod hostile;
mod http_json;
mod http_layer;
mod http_middleware;
mod java_client;
mod model;
mod operations;
mod plans;
mod processes;
mod production;
mod replay_cache;
mod security;
mod soak;
mod tracing_otlp;
mod validation;
mod wait;
