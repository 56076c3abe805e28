//! The controller API's server side: [`server`] (routes over the Unix socket) and the
//! sandbox routes (exec, files, forward, attach, rollback, state). The wire types and the
//! client are in agentvm-client.

mod sandbox;
pub mod server;

#[cfg(test)]
mod tests_server;
