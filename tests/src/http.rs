//! The tests' one HTTP client (hyper, HTTP/1.1), in two shapes over the same code:
//!
//! - async, for `#[tokio::test]`s: [`send`] leaves the body unread (streams, read with
//!   [`Events`]); [`fetch`], [`get_json`] and [`post_json`] read it whole;
//! - blocking, for plain `#[test]`s: [`Client`] builds a [`Request`] whose [`Request::send`]
//!   runs it on a runtime of the calling thread. The socket is therefore made by that thread,
//!   so a request sent from a thread inside a test network namespace
//!   ([`crate::netns::Netns::run`]) leaves from that namespace.

use std::{
    fmt::Display,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request as HyperRequest, Response, StatusCode, body::Incoming, header::HeaderMap};
use hyper_util::{
    client::legacy::{Client as HyperClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// How long a blocking request may take, connect to last byte.
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(30);

fn hyper_client() -> HyperClient<HttpConnector, Full<Bytes>> {
    HyperClient::builder(TokioExecutor::new()).build_http()
}

/// Sends a request; the answer comes back with its body unread.
async fn open(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<Response<Incoming>> {
    let mut req = HyperRequest::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body))?;
    hyper_client()
        .request(req)
        .await
        .with_context(|| format!("{method} {url}"))
}

/// Sends a request and returns the response with its body unread (for streams); panics when
/// no answer comes.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Response<Incoming> {
    open(method, url, headers, body.into())
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A whole response: status, headers, body bytes.
pub async fn fetch(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, HeaderMap, Bytes) {
    let resp = send(method, url, headers, body).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, body)
}

pub async fn get_json(url: &str) -> (StatusCode, Value) {
    let (status, _, body) = fetch("GET", url, &[], Bytes::new()).await;
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// POSTs a JSON body (with `extra` headers) and parses the JSON answer (a string when the
/// answer is not JSON).
pub async fn post_json(
    url: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> (StatusCode, HeaderMap, Value) {
    let mut headers = vec![("content-type", "application/json")];
    headers.extend_from_slice(extra);
    let (status, headers, body) = fetch("POST", url, &headers, body.to_string()).await;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, headers, value)
}

/// Makes blocking requests (see the module docs).
#[derive(Debug, Clone, Copy, Default)]
pub struct Client;

impl Client {
    pub fn new() -> Client {
        Client
    }

    pub fn get(&self, url: impl Into<String>) -> Request {
        Request::new("GET", url)
    }

    pub fn post(&self, url: impl Into<String>) -> Request {
        Request::new("POST", url)
    }

    pub fn request(&self, method: &str, url: impl Into<String>) -> Request {
        Request::new(method, url)
    }
}

/// A request being built; [`Request::send`] sends it and blocks for the whole answer.
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Bytes,
}

impl Request {
    fn new(method: &str, url: impl Into<String>) -> Request {
        Request {
            method: method.to_owned(),
            url: url.into(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn header(mut self, name: &str, value: impl Into<String>) -> Request {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer_auth(self, token: impl Display) -> Request {
        self.header("authorization", format!("Bearer {token}"))
    }

    /// A JSON body, with its content type.
    pub fn json(self, body: &impl Serialize) -> Request {
        let text = serde_json::to_string(body).expect("serializable body");
        self.header("content-type", "application/json").body(text)
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Request {
        self.body = body.into();
        self
    }

    /// Sends the request on a runtime of the calling thread and reads the whole answer; an
    /// error when no answer comes within 30 s.
    pub fn send(self) -> Result<Reply> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a runtime for a blocking request")?;
        let what = format!("{} {}", self.method, self.url);
        runtime.block_on(async move {
            tokio::time::timeout(crate::patience(BLOCKING_TIMEOUT), async {
                let headers: Vec<(&str, &str)> = self
                    .headers
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let resp = open(&self.method, &self.url, &headers, self.body.clone()).await?;
                let status = resp.status();
                let headers = resp.headers().clone();
                let body = resp.into_body().collect().await?.to_bytes();
                Ok(Reply {
                    status,
                    headers,
                    body,
                })
            })
            .await
            .with_context(|| {
                format!(
                    "{what}: no answer within {:?}",
                    crate::patience(BLOCKING_TIMEOUT)
                )
            })?
        })
    }
}

/// A whole answer to a blocking request.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    pub fn bytes(self) -> Result<Bytes> {
        Ok(self.body)
    }

    pub fn text(self) -> Result<String> {
        String::from_utf8(self.body.to_vec()).context("body is not UTF-8")
    }

    pub fn json<T: DeserializeOwned>(self) -> Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "body is not JSON: {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Reads server-sent events from a response as they arrive: each `data:` payload with the
/// time it arrived. Stops at the end of the body or on a body error (reported as `Err`).
pub struct Events {
    body: Incoming,
    buf: Vec<u8>,
}

impl Events {
    pub fn new(resp: Response<Incoming>) -> Self {
        Events {
            body: resp.into_body(),
            buf: Vec::new(),
        }
    }

    /// The next event's data, `Ok(None)` at the end of the stream.
    pub async fn next(&mut self) -> Result<Option<String>, String> {
        loop {
            if let Some(pos) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let event: Vec<u8> = self.buf.drain(..pos + 2).collect();
                let text = String::from_utf8_lossy(&event).into_owned();
                let data: Vec<&str> = text
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(str::trim_start)
                    .collect();
                if data.is_empty() {
                    continue;
                }
                return Ok(Some(data.join("\n")));
            }
            match self.body.frame().await {
                None => {
                    return if self.buf.iter().all(u8::is_ascii_whitespace) {
                        Ok(None)
                    } else {
                        Err(format!(
                            "stream ended inside an event: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    };
                }
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `within` passed; returns whether it held.
pub async fn eventually<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
