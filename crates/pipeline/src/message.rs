//! The unit of work: the data plus everything the stages need to route, batch and acknowledge it.
//!
//! A message is moved from stage to stage, never cloned on the way; the only copy ever made is
//! for fan-out, when one message is routed to several batchers.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use super::ack::{AckRef, Acknowledger};
// Also here because the stages take it from where `Message` and `Status` are.
pub(super) use super::failure::Failure;

/// The name of a batcher, shared cheaply between the messages routed to it.
pub type BatcherName = Arc<str>;

/// Where a message stands: still good, or failed with a reason.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Status {
    #[default]
    Ok,
    Failed(Failure),
}

/// What a batcher groups messages by: messages with different keys never share a batch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum BatchKey {
    #[default]
    Default,
    Int(u64),
    /// A UUID's 16 bytes (bytes, not `u128`, to keep messages 8-byte aligned).
    Uuid([u8; 16]),
    Name(Arc<str>),
}

impl From<u64> for BatchKey {
    fn from(v: u64) -> Self {
        Self::Int(v)
    }
}

impl From<u128> for BatchKey {
    fn from(v: u128) -> Self {
        Self::Uuid(v.to_be_bytes())
    }
}

impl From<&str> for BatchKey {
    fn from(v: &str) -> Self {
        Self::Name(v.into())
    }
}

/// `Flush` sends the message's batch out as soon as the message joins it; `Bulk` waits for the
/// batch to fill or time out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BatchMode {
    #[default]
    Bulk,
    Flush,
}

/// Which batcher(s) a message goes to after its processor.
#[derive(Clone, Debug, Default)]
pub(crate) enum Route {
    /// The first batcher the pipeline declares (or straight to acknowledgement when there is none).
    #[default]
    Default,
    One(BatcherName),
    /// Fan-out: a copy per batcher, acknowledged once after every copy has finished.
    Many(Arc<[BatcherName]>),
    /// No batcher: acknowledged as soon as its processor is done.
    Done,
}

/// Free-form string metadata (a broker's delivery tag, a trace id). Costs one pointer when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
// Boxed so that a message without metadata carries 8 bytes for it, not a 48-byte empty map.
#[allow(clippy::box_collection)]
pub struct Metadata(Option<Box<HashMap<String, String>>>);

impl Metadata {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.as_ref()?.get(key).map(String::as_str)
    }

    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) -> Option<String> {
        self.0
            .get_or_insert_with(Default::default)
            .insert(key.into(), value.into())
    }

    pub fn remove(&mut self, key: &str) -> Option<String> {
        let map = self.0.as_mut()?;
        let value = map.remove(key);
        // Back to no map at all, so that it equals `Metadata::default()` again.
        if map.is_empty() {
            self.0 = None;
        }
        value
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0
            .iter()
            .flat_map(|m| m.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    pub fn is_empty(&self) -> bool {
        self.0.as_ref().is_none_or(|m| m.is_empty())
    }
}

/// One event travelling through a pipeline.
pub struct Message<T> {
    /// The payload. Handlers may change it in place.
    pub data: T,
    metadata: Metadata,
    status: Status,
    pub(crate) route: Route,
    batch_key: BatchKey,
    batch_mode: BatchMode,
    /// Went to the dead-letter sink (counted once per message, fan-out copies included).
    pub(crate) dead_lettered: bool,
    pub(crate) attempts: u32,
    pub(crate) ack: AckRef<T>,
    /// What the acknowledger needs to find the message's delivery again (a broker's tag, an
    /// index into its own table): a number, so that a source pays no allocation for it.
    ack_data: u64,
}

impl<T> Message<T> {
    /// A message nobody needs to hear about when it is done.
    pub fn new(data: T) -> Self {
        Self {
            data,
            metadata: Metadata::default(),
            status: Status::Ok,
            route: Route::Default,
            batch_key: BatchKey::Default,
            batch_mode: BatchMode::Bulk,
            dead_lettered: false,
            attempts: 0,
            ack: AckRef::None,
            ack_data: 0,
        }
    }

    /// A message whose acknowledger is told, exactly once, how it ended.
    pub fn with_acker(data: T, acker: Arc<dyn Acknowledger<T>>) -> Self {
        let mut msg = Self::new(data);
        msg.ack = AckRef::Direct(acker);
        msg
    }

    /// A message whose acknowledger is told how it ended, with `ack_data` (see
    /// [`Message::ack_data`]) to tell it which delivery it was.
    pub fn with_ack_data(data: T, acker: Arc<dyn Acknowledger<T>>, ack_data: u64) -> Self {
        let mut msg = Self::with_acker(data, acker);
        msg.ack_data = ack_data;
        msg
    }

    /// What the message's source gave it to find the delivery again at acknowledgement (0 when
    /// it gave nothing). Fan-out copies carry the original's.
    pub fn ack_data(&self) -> u64 {
        self.ack_data
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn is_failed(&self) -> bool {
        matches!(self.status, Status::Failed(_))
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.status {
            Status::Failed(f) => Some(f),
            Status::Ok => None,
        }
    }

    /// Marks the message failed. A handler can also just return the failure.
    pub fn fail(&mut self, failure: Failure) {
        self.status = Status::Failed(failure);
    }

    pub(crate) fn reset_status(&mut self) {
        self.status = Status::Ok;
    }

    /// How many times the current stage has tried this message (1 during the first attempt).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Sends the message to the named batcher.
    pub fn put_batcher(&mut self, name: impl Into<BatcherName>) -> &mut Self {
        self.route = Route::One(name.into());
        self
    }

    /// Sends a copy of the message to each named batcher; it is acknowledged once, after every
    /// copy has finished, failed if any copy failed. An empty list sends it to no batcher: it is
    /// acknowledged as soon as its processor is done.
    pub fn put_batchers(&mut self, names: Arc<[BatcherName]>) -> &mut Self {
        self.route = match names.len() {
            0 => Route::Done,
            1 => Route::One(names[0].clone()),
            _ => Route::Many(names),
        };
        self
    }

    pub fn batch_key(&self) -> &BatchKey {
        &self.batch_key
    }

    pub fn put_batch_key(&mut self, key: impl Into<BatchKey>) -> &mut Self {
        self.batch_key = key.into();
        self
    }

    pub fn batch_mode(&self) -> BatchMode {
        self.batch_mode
    }

    pub fn put_batch_mode(&mut self, mode: BatchMode) -> &mut Self {
        self.batch_mode = mode;
        self
    }

    /// A copy for one branch of a fan-out; the copy acknowledges through `ack`.
    pub(crate) fn branch(&self, ack: AckRef<T>, batcher: BatcherName) -> Self
    where
        T: Clone,
    {
        Self {
            data: self.data.clone(),
            metadata: self.metadata.clone(),
            status: self.status.clone(),
            route: Route::One(batcher),
            batch_key: self.batch_key.clone(),
            batch_mode: self.batch_mode,
            dead_lettered: false,
            attempts: 0,
            ack,
            ack_data: self.ack_data,
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Message<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("data", &self.data)
            .field("status", &self.status)
            .field("batch_key", &self.batch_key)
            .field("batch_mode", &self.batch_mode)
            .field("attempts", &self.attempts)
            .field("metadata", &self.metadata)
            .finish_non_exhaustive()
    }
}
