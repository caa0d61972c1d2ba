//! The request pipeline of the worker (see docs/data-plane.md): the router and its layers
//! (`app`; the request id, `request_id`, and the announced body size, `body_limit`), the state
//! every handler reaches (`state`), the OpenAI endpoints (`openai`), authorization and pool
//! choice (`authz`), quotas (`quota`), host choice within a pool (`route`), the prefix-cache
//! scope (`cache_salt`), the upstream proxy (`proxy`), the metering of answers (`metered`),
//! what the client sees of an answer (`answer`) and the health endpoints.

pub mod answer;
pub mod app;
pub mod authz;
pub mod body_limit;
pub mod cache_salt;
pub mod health;
pub mod metered;
pub mod openai;
pub mod proxy;
pub mod quota;
pub mod request_id;
pub mod route;
pub mod state;
#[cfg(test)]
mod test_bodies;
