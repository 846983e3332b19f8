//! A small client for the daemon's admin API, on one keep-alive HTTP/1.1 connection.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpStream;

use super::BenchError;

pub struct AdminClient {
    sender: SendRequest<Full<Bytes>>,
    token: String,
    host: String,
}

impl AdminClient {
    pub async fn connect(addr: SocketAddr, token: &str) -> Result<Self, BenchError> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| BenchError::Connect { addr, source })?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Self {
            sender,
            token: token.to_owned(),
            host: addr.to_string(),
        })
    }

    /// GETs `path` as text (`/metrics`), expecting a 2xx status.
    pub async fn text(&mut self, path: &str) -> Result<String, BenchError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", &self.host)
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::new()))
            .expect("a well-formed request");
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        let body = String::from_utf8_lossy(&bytes).into_owned();
        if !(200..300).contains(&status) {
            return Err(BenchError::Status {
                method: Method::GET,
                path: path.to_owned(),
                status,
                body,
            });
        }
        Ok(body)
    }

    /// Sends JSON, expects JSON and a 2xx status.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Value, BenchError> {
        let request = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", &self.host)
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .expect("a well-formed request");
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status().as_u16();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !(200..300).contains(&status) {
            return Err(BenchError::Status {
                method,
                path: path.to_owned(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}
