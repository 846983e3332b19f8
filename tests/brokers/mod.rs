//! The brokers as the tests see them: a publisher, the dead letters, and a pipeline file whose
//! source reads streams or queues of the test's own.

use std::collections::HashMap;
use std::num::NonZeroU64;

use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use thunderline::daemon::config::{NatsSection, PipelineFile, SourceSections};
use uuid::Uuid;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Nats,
}

pub const NATS_URL: &str = "nats://127.0.0.1:4222";

/// One test's broker objects, named with a tag of its own.
#[derive(Clone)]
pub struct Broker {
    pub kind: Kind,
    pub tag: String,
    js: jetstream::Context,
}

impl Broker {
    pub async fn new(kind: Kind) -> Self {
        let tag = Uuid::new_v4().simple().to_string()[..12].to_owned();
        let client = async_nats::connect(NATS_URL)
            .await
            .expect("NATS with JetStream runs at 127.0.0.1:4222 (see the README)");
        Self {
            kind,
            tag,
            js: jetstream::new(client),
        }
    }

    fn nats(&self) -> NatsSection {
        NatsSection {
            stream: format!("T_{}", self.tag),
            subjects: vec![format!("t{}.commands.>", self.tag)],
            dead_stream: format!("T_{}_DEAD", self.tag),
            dead_subject: format!("t{}.dead", self.tag),
            // Short, so that what the killed daemon held comes back soon after the restart.
            ack_wait_ms: NonZeroU64::new(3_000).unwrap(),
            ..NatsSection::default()
        }
    }

    /// The default zone pipeline with this broker's source.
    pub fn pipeline_file(&self) -> String {
        let file = PipelineFile {
            sources: SourceSections {
                nats: Some(self.nats()),
                ..SourceSections::default()
            },
            ..PipelineFile::default()
        };
        toml::to_string(&file).unwrap()
    }

    /// Publishes a command for `zone` with `id` as its message id, once the broker has it.
    pub async fn publish(&self, zone: &str, id: Uuid, body: &[u8]) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id.to_string().as_str());
        let subject = format!("t{}.commands.{zone}", self.tag);
        self.js
            .publish_with_headers(subject, headers, body.to_vec().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    /// The dead letters so far: message id → reason.
    pub async fn dead_letters(&self) -> HashMap<Uuid, String> {
        let nats = self.nats();
        let Ok(stream) = self.js.get_stream(&nats.dead_stream).await else {
            return HashMap::new();
        };
        let consumer: jetstream::consumer::Consumer<pull::Config> = stream
            .create_consumer(pull::Config {
                inactive_threshold: std::time::Duration::from_secs(10),
                ..pull::Config::default()
            })
            .await
            .unwrap();
        let mut out = HashMap::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .messages()
                .await
                .unwrap();
            let mut got = 0;
            while let Some(Ok(m)) = batch.next().await {
                got += 1;
                let h = m.headers.clone().unwrap_or_default();
                let id = h
                    .get("Nats-Msg-Id")
                    .and_then(|v| Uuid::parse_str(v.as_str()).ok());
                let reason = h
                    .get(thunderline::sources::REASON_HEADER)
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                if let Some(id) = id {
                    out.insert(id, reason);
                }
            }
            if got == 0 {
                return out;
            }
        }
    }

    /// Nothing is left unsettled or undelivered.
    pub async fn assert_settled(&self) {
        let nats = self.nats();
        let stream = self.js.get_stream(&nats.stream).await.unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let info = stream.consumer_info(&nats.consumer).await.unwrap();
            if info.num_ack_pending == 0 && info.num_pending == 0 {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the consumer still has {} unacknowledged and {} undelivered messages",
                info.num_ack_pending,
                info.num_pending
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    pub async fn cleanup(&self) {
        let nats = self.nats();
        let _ = self.js.delete_stream(&nats.stream).await;
        let _ = self.js.delete_stream(&nats.dead_stream).await;
    }
}
