//! RabbitMQ: a durable queue consumed with a prefetch the pipeline's demand sets.
// TEMPORARY stub until the real source lands (being written on branch rabbitmq).
use super::{Decoder, SourceMetrics};
use crate::pipeline::{Acknowledger, Demand, Produced, Producer};
use std::sync::Arc;
#[derive(Clone)]
pub struct RabbitMqConfig {
    pub url: String,
    pub queue: String,
    pub dead_exchange: String,
    pub dead_queue: String,
    pub prefetch: u16,
    pub metrics: SourceMetrics,
}
impl Default for RabbitMqConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            queue: String::new(),
            dead_exchange: String::new(),
            dead_queue: String::new(),
            prefetch: 1,
            metrics: SourceMetrics::unregistered("rabbitmq"),
        }
    }
}
#[derive(Debug, thiserror::Error)]
pub enum RabbitMqError {
    #[error("stub")]
    Stub,
}
pub struct RabbitMqSource<T>(std::marker::PhantomData<T>);
impl<T: Send + 'static> RabbitMqSource<T> {
    pub async fn connect(_c: RabbitMqConfig, _d: impl Decoder<T>) -> Result<Self, RabbitMqError> {
        Err(RabbitMqError::Stub)
    }
    pub fn then_acknowledge(self, _a: Arc<dyn Acknowledger<T>>) -> Self {
        self
    }
}
impl<T: Send + 'static> Producer<T> for RabbitMqSource<T> {
    async fn produce(&mut self, _d: &mut Demand<T>) -> Produced {
        Produced::Exhausted
    }
}
