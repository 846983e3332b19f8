//! Why a message failed, whether trying again could help, and how the errors handlers meet
//! become failures so that a handler can use `?`.
//!
//! A blanket `impl<E: Error> From<E> for Failure` cannot exist next to `impl Error for Failure`
//! (it would overlap `From<T> for T`): hence a conversion per common error and for boxed errors,
//! and [`FailureExt`] for any error at all.

use std::borrow::Cow;
use std::char::ParseCharError;
use std::convert::Infallible;
use std::error::Error;
use std::fmt;
use std::io;
use std::net::AddrParseError;
use std::num::{ParseFloatError, ParseIntError, TryFromIntError};
use std::str::{ParseBoolError, Utf8Error};
use std::string::FromUtf8Error;

/// Why a message failed, and whether trying again could help.
///
/// A handler returns one, or sets it with [`Message::fail`](super::Message::fail). It converts
/// with `?` from the errors handlers meet most, from boxed errors, and from a `String` or `&str`,
/// classified as below. Any other error takes [`FailureExt`], `.retryable()?` or
/// `.permanent()?`, which also overrides the classification when the handler knows better.
///
/// | Converted with `?` | Classified as |
/// |---|---|
/// | `std::io::Error` of kind `InvalidData`, `InvalidInput` or `Unsupported` | permanent |
/// | any other `std::io::Error` | retryable |
/// | `tokio::time::error::Elapsed` | retryable |
/// | `tokio::task::JoinError`: the task was cancelled | retryable |
/// | `tokio::task::JoinError`: the task panicked | permanent |
/// | `ParseIntError`, `ParseFloatError`, `ParseBoolError`, `ParseCharError` | permanent |
/// | `TryFromIntError`, `AddrParseError`, `uuid::Error`, `fmt::Error` | permanent |
/// | `Utf8Error`, `FromUtf8Error` | permanent |
/// | `serde_json::Error` from a reader that failed | as that `io::Error` |
/// | any other `serde_json::Error` | permanent |
/// | `rmp_serde::decode::Error`, `rmp_serde::encode::Error` | permanent |
/// | `Box<dyn Error>` or `Box<dyn Error + Send + Sync>` holding a `Failure` | that failure |
/// | any other `Box<dyn Error>` or `Box<dyn Error + Send + Sync>`, `String`, `&str` | retryable |
///
/// The rule behind it: an error that describes the input (it does not parse, does not decode, is
/// out of range) fails the same way on every attempt, so it is permanent; one that describes the
/// world (a connection, a deadline, a runtime shutting down) may not, so it is retryable. A
/// panic is permanent, as a panicking handler is. An error the table cannot see into is
/// retryable: under the default retry policy that sends it to the dead-letter sink, where it can
/// be looked at and replayed, rather than failing it for good. Decoding errors are permanent even
/// when they wrap an I/O error, because a handler decodes bytes it already has: a read that came
/// up short there is a truncated payload, not a dropped connection.
///
/// The reason keeps the error's message and its chain of [`source`](Error::source)s, joined
/// with `": "` (see [`from_error`](Self::from_error)). The failure keeps only that text, so its
/// own `source()` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure(Box<FailureInner>);

/// Boxed so that a message's status costs one pointer: failures are rare, messages are not.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FailureInner {
    reason: Cow<'static, str>,
    retryable: bool,
}

const _: () = assert!(size_of::<Failure>() == size_of::<usize>());
const _: () = assert!(size_of::<super::message::Status>() == size_of::<usize>());

/// What a panic said, from its payload (a `&str` or a `String`, as `panic!` makes them).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned())
}

/// Why an abandoned message failed. Tests and operators look for the word.
const ABANDONED: &str = "abandoned by the pipeline before it finished (a stage was aborted at \
                         the drain deadline, or failed)";

impl Failure {
    /// A message the pipeline dropped before it finished (a stage aborted at the drain
    /// deadline): permanent, since the pipeline is going away, though nothing was wrong with the
    /// message. A source that can give a message back (a broker) may, rather than treat it as
    /// refused: see [`is_abandoned`](Self::is_abandoned).
    pub fn abandoned() -> Self {
        Self::permanent(ABANDONED)
    }

    /// Whether this is the failure of a message the pipeline abandoned ([`Failure::abandoned`]).
    pub fn is_abandoned(&self) -> bool {
        self.reason() == ABANDONED
    }

    /// `what` panicked (a handler, a sink, a decoder: the payload is what `catch_unwind` gave):
    /// permanent, since the same input would panic again, with the panic's message as the
    /// reason.
    pub fn panicked(what: &str, panic: &(dyn std::any::Any + Send)) -> Self {
        Self::permanent(format!("{what} panicked: {}", panic_message(panic)))
    }

    /// A failure that may go away on its own (a dropped connection, a timeout): the stage retries
    /// it under its retry policy and dead-letters it once the attempts run out.
    pub fn retryable(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(reason.into(), true)
    }

    /// A failure that trying again cannot fix (bad input, a refused operation): the message is
    /// acknowledged as failed at once, without retries and without the dead-letter sink.
    pub fn permanent(reason: impl Into<Cow<'static, str>>) -> Self {
        Self::new(reason.into(), false)
    }

    /// A failure whose reason is `error`'s message followed by those of its sources, joined
    /// with `": "`. A source whose message the text already ends with is left out: many errors
    /// print their source themselves (`"cannot load zone: {source}"`).
    pub fn from_error(error: &dyn Error, retryable: bool) -> Self {
        let mut reason = error.to_string();
        let mut source = error.source();
        while let Some(e) = source {
            let text = e.to_string();
            if !reason.ends_with(&text) {
                reason.push_str(": ");
                reason.push_str(&text);
            }
            source = e.source();
        }
        Self::new(reason.into(), retryable)
    }

    fn new(reason: Cow<'static, str>, retryable: bool) -> Self {
        Self(Box::new(FailureInner { reason, retryable }))
    }

    pub fn reason(&self) -> &str {
        &self.0.reason
    }

    pub fn is_retryable(&self) -> bool {
        self.0.retryable
    }

    /// The same reason, classified as `retryable`; a boxed failure keeps its reason as it is.
    fn reclassified(error: Box<dyn Error + Send + Sync>, retryable: bool) -> Self {
        match error.downcast::<Self>() {
            Ok(failure) => Self::new(failure.0.reason, retryable),
            Err(other) => Self::from_error(&*other, retryable),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.reason)
    }
}

impl Error for Failure {}

/// Whether an I/O error may go away: the kinds that say the input or the request is wrong do not.
fn io_transient(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::{InvalidData, InvalidInput, Unsupported};
    !matches!(kind, InvalidData | InvalidInput | Unsupported)
}

macro_rules! classified {
    ($retryable:literal: $($error:ty),+ $(,)?) => {$(
        impl From<$error> for Failure {
            fn from(e: $error) -> Self {
                Self::from_error(&e, $retryable)
            }
        }
    )+};
}

classified!(false:
    ParseIntError,
    ParseFloatError,
    ParseBoolError,
    ParseCharError,
    TryFromIntError,
    AddrParseError,
    Utf8Error,
    FromUtf8Error,
    fmt::Error,
    uuid::Error,
    rmp_serde::decode::Error,
    rmp_serde::encode::Error,
);

classified!(true: tokio::time::error::Elapsed);

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        let retryable = io_transient(e.kind());
        Self::from_error(&e, retryable)
    }
}

impl From<serde_json::Error> for Failure {
    fn from(e: serde_json::Error) -> Self {
        let retryable = e.io_error_kind().is_some_and(io_transient);
        Self::from_error(&e, retryable)
    }
}

impl From<tokio::task::JoinError> for Failure {
    fn from(e: tokio::task::JoinError) -> Self {
        let retryable = e.is_cancelled();
        Self::from_error(&e, retryable)
    }
}

impl From<Box<dyn Error + Send + Sync>> for Failure {
    fn from(e: Box<dyn Error + Send + Sync>) -> Self {
        Self::from(e as Box<dyn Error>)
    }
}

impl From<Box<dyn Error>> for Failure {
    fn from(e: Box<dyn Error>) -> Self {
        match e.downcast::<Self>() {
            Ok(failure) => *failure,
            Err(other) => Self::from_error(&*other, true),
        }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self::retryable(reason)
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Self {
        Self::retryable(reason.to_owned())
    }
}

/// Lets `?` pass through a `Result<T, Infallible>`.
impl From<Infallible> for Failure {
    fn from(never: Infallible) -> Self {
        match never {}
    }
}

mod sealed {
    pub trait Sealed {}
    impl<T, E> Sealed for Result<T, E> {}
}

/// Classifies any error as the handler sees fit, for `?`:
///
/// ```
/// # use thunderline_pipeline::{Failure, FailureExt, Message};
/// fn unit(m: &Message<Vec<u8>>) -> Result<Unit, Failure> {
///     // Not UTF-8 now, never UTF-8: permanent, as `?` alone makes it.
///     let text = std::str::from_utf8(&m.data)?;
///     // A unit this build does not know may be deployed tomorrow: retry, then dead-letter.
///     text.parse().retryable()
/// }
///
/// let unknown = unit(&Message::new(b"furlong".to_vec())).unwrap_err();
/// assert_eq!(unknown, Failure::retryable("unknown unit \"furlong\""));
/// assert!(!unit(&Message::new(vec![0xff])).unwrap_err().is_retryable());
/// # #[derive(Debug)]
/// # struct Unit;
/// # impl std::str::FromStr for Unit {
/// #     type Err = String;
/// #     fn from_str(s: &str) -> Result<Self, String> { Err(format!("unknown unit {s:?}")) }
/// # }
/// ```
///
/// It works on any `Result` whose error converts into a `Box<dyn Error + Send + Sync>`: every
/// `Send + Sync` error, a boxed one, a `String`, a `&str`. The reason is built as by
/// [`Failure::from_error`]; an error that is a [`Failure`] keeps its reason and takes the new
/// classification.
pub trait FailureExt<T>: sealed::Sealed {
    /// On error, a failure the stage retries under its retry policy.
    fn retryable(self) -> Result<T, Failure>;

    /// On error, a failure acknowledged at once, without retries or the dead-letter sink.
    fn permanent(self) -> Result<T, Failure>;
}

impl<T, E: Into<Box<dyn Error + Send + Sync>>> FailureExt<T> for Result<T, E> {
    fn retryable(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::reclassified(e.into(), true))
    }

    fn permanent(self) -> Result<T, Failure> {
        self.map_err(|e| Failure::reclassified(e.into(), false))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Message, Processor};

    /// A handler that fails each message with the error its data names, through `?`.
    struct Question;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot load zone 7")]
    struct Load(#[source] io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("cannot load zone 7: {0}")]
    struct LoadShowingSource(#[source] io::Error);

    fn err<E>(e: E) -> Result<(), E> {
        Err(e)
    }

    async fn panics() {
        panic!("boom")
    }

    async fn fail_with(kind: &str) -> Result<(), Failure> {
        match kind {
            "io" => err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "reset by peer",
            ))?,
            "io invalid data" => err(io::Error::new(io::ErrorKind::InvalidData, "bad frame"))?,
            "int" => {
                "x1".parse::<u32>()?;
            }
            "float" => {
                "one".parse::<f64>()?;
            }
            "bool" => {
                "yes".parse::<bool>()?;
            }
            "char" => {
                "ab".parse::<char>()?;
            }
            "try from int" => {
                u8::try_from(300u32)?;
            }
            "addr" => {
                "localhost".parse::<std::net::IpAddr>()?;
            }
            "utf8" => {
                let bytes = vec![0xff];
                std::str::from_utf8(&bytes)?;
            }
            "from utf8" => {
                String::from_utf8(vec![0xff])?;
            }
            "fmt" => err(fmt::Error)?,
            "uuid" => {
                uuid::Uuid::parse_str("zone")?;
            }
            "json" => {
                serde_json::from_str::<u32>("{")?;
            }
            "json io" => {
                serde_json::from_reader::<_, u32>(Broken)?;
            }
            "msgpack decode" => {
                rmp_serde::from_slice::<u32>(&[0xc1])?;
            }
            "msgpack encode" => {
                rmp_serde::to_vec(&Unencodable)?;
            }
            "elapsed" => {
                tokio::time::timeout(Duration::ZERO, std::future::pending::<()>()).await?;
            }
            "join cancelled" => {
                let task = tokio::spawn(std::future::pending::<()>());
                task.abort();
                task.await?;
            }
            "join panicked" => tokio::spawn(panics()).await?,
            "boxed" => err(Box::<dyn Error + Send + Sync>::from(Load(
                io::Error::other("gone"),
            )))?,
            "boxed local" => err(Box::<dyn Error>::from("local"))?,
            "boxed failure" => err(Box::<dyn Error + Send + Sync>::from(Failure::permanent(
                "refused",
            )))?,
            "string" => err(format!("sensor {} unplugged", 3))?,
            "str" => err("sensor unplugged")?,
            "infallible" => Ok::<(), Infallible>(())?,
            "ext permanent" => err(io::Error::other("full")).permanent()?,
            "ext retryable" => {
                "x".parse::<u32>().retryable()?;
            }
            "ext string" => err(String::from("odd")).permanent()?,
            "ext failure" => err(Failure::permanent("refused")).retryable()?,
            "chain" => err(Load(io::Error::other("disk gone"))).retryable()?,
            "chain shown" => err(LoadShowingSource(io::Error::other("disk gone"))).retryable()?,
            other => unreachable!("{other}"),
        }
        Ok(())
    }

    impl Processor<&'static str> for Question {
        async fn handle_message(&self, m: &mut Message<&'static str>) -> Result<(), Failure> {
            fail_with(m.data).await
        }
    }

    struct Broken;

    impl io::Read for Broken {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::TimedOut.into())
        }
    }

    struct Unencodable;

    impl serde::Serialize for Unencodable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("cannot encode a sensor handle"))
        }
    }

    async fn handle(kind: &'static str) -> Result<(), Failure> {
        Question.handle_message(&mut Message::new(kind)).await
    }

    #[tokio::test]
    async fn question_mark_classifies_each_kind_of_error() {
        let retryable = [
            "io",
            "json io",
            "elapsed",
            "join cancelled",
            "boxed",
            "boxed local",
            "string",
            "str",
            "ext retryable",
            "ext failure",
            "chain",
            "chain shown",
        ];
        let permanent = [
            "io invalid data",
            "int",
            "float",
            "bool",
            "char",
            "try from int",
            "addr",
            "utf8",
            "from utf8",
            "fmt",
            "uuid",
            "json",
            "msgpack decode",
            "msgpack encode",
            "join panicked",
            "boxed failure",
            "ext permanent",
            "ext string",
        ];
        for (kinds, expected) in [(&retryable[..], true), (&permanent[..], false)] {
            for &kind in kinds {
                let failure = handle(kind).await.expect_err(kind);
                assert_eq!(failure.is_retryable(), expected, "{kind}: {failure}");
            }
        }
        assert_eq!(handle("infallible").await, Ok(()));
    }

    #[tokio::test]
    async fn the_reason_keeps_the_message_and_its_sources_once() {
        let cases = [
            ("io", "reset by peer"),
            ("int", "invalid digit found in string"),
            ("json", "invalid type: map, expected u32 at line 1 column 0"),
            ("json io", "timed out"),
            ("elapsed", "deadline has elapsed"),
            ("string", "sensor 3 unplugged"),
            ("str", "sensor unplugged"),
            ("boxed", "cannot load zone 7: gone"),
            ("boxed failure", "refused"),
            ("ext failure", "refused"),
            ("ext string", "odd"),
            ("chain", "cannot load zone 7: disk gone"),
            // Printed by the error itself: not repeated.
            ("chain shown", "cannot load zone 7: disk gone"),
            ("msgpack encode", "cannot encode a sensor handle"),
        ];
        for (kind, reason) in cases {
            assert_eq!(handle(kind).await.unwrap_err().reason(), reason, "{kind}");
        }
        let panicked = handle("join panicked").await.unwrap_err();
        assert!(
            panicked
                .reason()
                .ends_with("panicked with message \"boom\""),
            "{panicked}"
        );
    }

    #[test]
    fn a_failure_is_an_error_that_displays_its_reason() {
        let failure: Box<dyn Error + Send + Sync> = Box::new(Failure::retryable("bus timeout"));
        assert_eq!(failure.to_string(), "bus timeout");
        assert!(failure.source().is_none());
        let back = Failure::from(failure);
        assert_eq!(back, Failure::retryable("bus timeout"));
    }
}
