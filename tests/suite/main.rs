//! idemd's integration suite: real gRPC on 127.0.0.1, real PostgreSQL (a fresh database per
//! test on the shared server, or a throwaway cluster for outage tests).

mod chaos;
mod client;
mod clients;
mod concurrency;
mod conformance;
mod deploy;
mod durability;
mod failover;
mod faults;
mod fuzzing;
mod grpcurl;
mod harness;
mod hostile;
mod model;
mod operations;
mod processes;
mod production;
mod replay_cache;
mod security;
mod soak;
mod validation;
mod wait;
