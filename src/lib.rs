//! idemd — an idempotency authority for polyglot microservices.
//!
//! Data flows one way: `api` decodes a gRPC request into a validated `domain` command, a `store`
//! applies the domain's state machine with its own clock, and `api` encodes the outcome.

pub mod api;
pub mod auth;
pub mod config;
pub mod console;
pub mod defaults;
pub mod domain;
pub mod gateway;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;

/// Code generated from `proto/`.
pub mod proto {
    pub mod idempotency {
        pub mod v1 {
            #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
            tonic::include_proto!("idempotency.v1");
        }
        pub mod admin {
            pub mod v1 {
                #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
                tonic::include_proto!("idempotency.admin.v1");
            }
        }
    }
}
