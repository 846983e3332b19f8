//! The WebSocket benchmark's baseline: a bare tokio-tungstenite broadcast server with no
//! pipeline, no zones, no store. It answers joins and heartbeats, answers each `agent_move`
//! `ok` at once (echoing its refs, so the harness can time the reply) and rebroadcasts it to the
//! topic's subscribers (serialised once, as the real server does), so the same clients can load
//! it and the report can state what the pipeline costs.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

type Topics = Arc<Mutex<HashMap<String, broadcast::Sender<Utf8Bytes>>>>;

/// A running baseline server; dropping it stops accepting.
pub struct BaselineServer {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for BaselineServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

pub async fn start() -> std::io::Result<BaselineServer> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let topics: Topics = Arc::default();
    let accept = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(connection(stream, topics.clone()));
        }
    });
    Ok(BaselineServer { addr, accept })
}

fn reply(join_ref: &Value, msg_ref: &Value, topic: &str) -> Message {
    Message::text(
        json!([join_ref, msg_ref, topic, "phx_reply", {"status": "ok", "response": {}}])
            .to_string(),
    )
}

async fn connection(stream: TcpStream, topics: Topics) {
    let _ = stream.set_nodelay(true);
    // The same buffer sizes as the real server, so the comparison is about the pipeline.
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(2 * 1024);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(1024);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut forwarders = Vec::new();
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(text) = msg else { continue };
        let Ok(Value::Array(f)) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if f.len() != 5 {
            continue;
        }
        let topic = f[2].as_str().unwrap_or_default().to_owned();
        match f[3].as_str().unwrap_or_default() {
            "phx_join" => {
                let bus = topics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(topic.clone())
                    .or_insert_with(|| broadcast::channel(4096).0)
                    .clone();
                let _ = tx.send(reply(&f[0], &f[1], &topic)).await;
                let mut sub = bus.subscribe();
                let tx = tx.clone();
                forwarders.push(tokio::spawn(async move {
                    while let Ok(frame) = sub.recv().await {
                        if tx.send(Message::Text(frame)).await.is_err() {
                            return;
                        }
                    }
                }));
            }
            "agent_move" => {
                let _ = tx.send(reply(&f[0], &f[1], &topic)).await;
                let payload = json!({"agent_id": "baseline", "position": f[4]["position"], "sent_at": f[4]["sent_at"]});
                let frame =
                    Utf8Bytes::from(json!([null, null, topic, "agent_moved", payload]).to_string());
                let bus = topics
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&topic)
                    .cloned();
                if let Some(bus) = bus {
                    let _ = bus.send(frame);
                }
            }
            _ => {
                let _ = tx.send(reply(&f[0], &f[1], &topic)).await;
            }
        }
    }
    for f in forwarders {
        f.abort();
    }
    drop(tx);
    let _ = writer.await;
}
