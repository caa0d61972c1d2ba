//! The request pipeline of the worker (see docs/data-plane.md): the router and
//! its layers (`app`), OpenAI request handling (`openai`), authorization and pool choice
//! (`authz`), quotas (`limits`), host choice within a pool (`route`), the upstream proxy
//! (`proxy`), health endpoints and request ids.

pub mod app;
pub mod authz;
pub mod health;
pub mod limits;
pub mod openai;
pub mod proxy;
pub mod request_id;
pub mod route;
