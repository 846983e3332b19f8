//! The engine's errors: a pipeline that cannot start, a push that cannot be accepted, a drain
//! that ran out of time.

use std::fmt;
use std::time::Duration;

use super::message::Message;

/// Why a pipeline refused to start (nothing was spawned), or refused a change while running
/// (nothing changed).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
    #[error("the pipeline has no producer: add one with `producer(..)`")]
    NoProducer,
    #[error("the pipeline has no processor: set one with `processor(..)` or `cpu_processor(..)`")]
    NoProcessor,
    #[error("two batchers are named {0:?}: batcher names must be unique")]
    DuplicateBatcher(String),
    #[error("there is no batcher named {0:?}")]
    UnknownBatcher(String),
    #[error("the pipeline is draining: it can no longer be changed")]
    Draining,
    #[error("start() must be called from inside a tokio runtime")]
    NoRuntime,
    #[error("cannot register the pipeline's metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A push the pipeline could not accept. The message is handed back: nothing is dropped.
pub enum PushError<T> {
    /// The producer's queue is full (only from `try_push`; `push` waits instead).
    Full(Message<T>),
    /// The pipeline is shutting down and takes no more messages.
    Closed(Message<T>),
}

impl<T> PushError<T> {
    pub fn into_message(self) -> Message<T> {
        match self {
            Self::Full(m) | Self::Closed(m) => m,
        }
    }
}

impl<T> fmt::Debug for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl<T> fmt::Display for PushError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Full(_) => "the pipeline is full: retry later or use push(..).await to wait",
            Self::Closed(_) => "the pipeline is shutting down and accepts no more messages",
        })
    }
}

impl<T> std::error::Error for PushError<T> {}

/// A drain that did not finish: what was still in flight when it was cut short.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ShutdownError {
    #[error(
        "drain did not finish within {deadline:?}: {left} message(s) were still in flight; they were \
         acknowledged as failed (abandoned)"
    )]
    Deadline { deadline: Duration, left: usize },
    #[error("pipeline stage {stage} stopped abnormally: {reason}")]
    StageFailed { stage: String, reason: String },
}
