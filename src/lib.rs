//! weftlog, the node: file storage, the node with group commit, the JSON
//! views the CLI prints, SQL read models, and the CLI itself. The sans-IO core is
//! [`weftlog_proto`].

pub mod auth;
pub mod batch;
pub mod cli;
pub mod daemon;
pub mod demo;
pub mod desk;
pub mod event_view;
pub mod http;
pub mod json;
pub mod metrics;
pub mod net;
pub mod node;
pub mod notices;
pub mod notify;
pub mod projections;
pub mod reconnects;
pub mod remote;
pub mod run;
pub mod sql;
pub mod sse;
pub mod storage;
pub mod subscribe;
pub mod tls;
pub mod transport;
pub mod venue;

pub use node::Node;
