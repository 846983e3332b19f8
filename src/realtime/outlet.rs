//! A connection's way out: its bounded queue of frames, the close the server asked for, and the
//! writer that puts both on the wire.
//!
//! The writer keeps no buffer of its own. It writes each frame's header and the frame itself
//! (the bytes every subscriber of a broadcast shares) with one vectored write, so an idle
//! connection holds the queue's bookkeeping and nothing else: no copy of the largest frame it
//! ever sent (tungstenite's write buffer grows to that and keeps it), no queue blocks (the queue
//! is handed to the writer whole and starts again empty). tungstenite still reads: it decodes
//! what the client sends and answers its pings and closes, and those answers, framed by it,
//! join this queue in order with every other frame ([`Answering`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::{CloseFrame, Frame, FrameHeader};
use tokio_tungstenite::tungstenite::{Bytes, Utf8Bytes};

/// Why the server closes a connection: a WebSocket close code and reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// The outbound queue was full: the client reads too slowly. 1011 makes clients reconnect.
pub const SLOW_CONSUMER: CloseReason = CloseReason {
    code: 1011,
    reason: "slow consumer",
};

/// The client closed first and tungstenite has answered its close frame (the answer is queued):
/// the writer sends what is queued and no close frame of its own.
pub const ANSWERED: CloseReason = CloseReason {
    code: 0,
    reason: "",
};

/// One item of a connection's outbound queue: a frame, or a zone's broadcasts from one batch,
/// which its writer sends with one system call.
#[derive(Clone, Debug)]
pub enum Outbound {
    Frame(Utf8Bytes),
    Frames(Arc<[Utf8Bytes]>),
    /// What a rejoining client missed: counted as one frame against the queue's bound, since
    /// the client asked for all of it at once and its size is bounded by the history's depth;
    /// what comes after it is bounded as usual.
    Replay(Arc<[Utf8Bytes]>),
    /// Bytes tungstenite framed: its answers to the client's pings and closes.
    Framed(Bytes),
}

impl Outbound {
    pub(crate) fn frames(&self) -> usize {
        match self {
            Self::Frame(_) | Self::Replay(_) | Self::Framed(_) => 1,
            Self::Frames(f) => f.len(),
        }
    }

    pub(crate) fn bytes(&self) -> usize {
        match self {
            Self::Frame(f) => f.len(),
            Self::Frames(f) | Self::Replay(f) => f.iter().map(|f| f.len()).sum(),
            Self::Framed(b) => b.len(),
        }
    }
}

/// Held by every queue item of one delivery until a connection's writer takes it: once every
/// copy is gone, the delivery is on its way to the sockets (see [`written`]).
#[derive(Clone, Debug)]
pub(crate) struct Written {
    _ticket: mpsc::Sender<()>,
}

/// Waits until every queue item of one delivery has been taken by its connection's writer.
#[derive(Debug)]
pub struct WrittenWait(mpsc::Receiver<()>);

/// A ticket for the items of one delivery, and the wait for all of them to be taken.
pub(crate) fn written() -> (Written, WrittenWait) {
    let (tx, rx) = mpsc::channel(1);
    (Written { _ticket: tx }, WrittenWait(rx))
}

impl WrittenWait {
    /// Returns once every item is taken, or after `at_most` (a connection that does not read
    /// holds its items until it is cut off as a slow consumer).
    pub async fn within(mut self, at_most: std::time::Duration) {
        // Nothing is ever sent: the channel ends when the last ticket is dropped.
        let _ = tokio::time::timeout(at_most, self.0.recv()).await;
    }
}

/// A queue item with the weight it was counted at, so that it is taken off the backlog at the
/// same weight without measuring it again. Queued behind an `Arc`: a broadcast batch is one
/// allocation shared by all its subscribers' queues.
#[derive(Debug)]
pub(crate) struct Weighed {
    out: Outbound,
    frames: usize,
    bytes: usize,
    /// Dropped when the last of its subscribers' writers takes the item.
    _written: Option<Written>,
}

impl Weighed {
    pub(crate) fn new(out: Outbound, bytes: usize, written: Option<&Written>) -> Arc<Self> {
        Arc::new(Self {
            frames: out.frames(),
            out,
            bytes,
            _written: written.cloned(),
        })
    }
}

/// A connection's outbound queue, bounded in frames rather than items (an item may hold many
/// frames, and the bound is about how far behind a client may fall) and in bytes (a few large
/// replies weigh more than many broadcasts), and the close the server asked for.
///
/// The byte bound refuses an item once the bytes already waiting reach it, so one item larger
/// than the bound (a rejoin's replay) still goes to a client that is keeping up, and a client
/// that is not holds at most the bound plus one item.
pub struct Outlet {
    queue: Mutex<Queue>,
    /// The writer, waiting for something to write.
    writer: AtomicWaker,
    /// The connection's reader, waiting to hear that the server closes the connection.
    closing: Notify,
    frame_limit: usize,
    byte_limit: usize,
    slow: IntCounter,
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Arc<Weighed>>,
    frames: usize,
    bytes: usize,
    close: Option<CloseReason>,
    /// The writer is done (the close is written, or the socket failed): nothing more is taken.
    stopped: bool,
}

impl std::fmt::Debug for Outlet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queue = self.lock();
        f.debug_struct("Outlet")
            .field("frames", &queue.frames)
            .field("bytes", &queue.bytes)
            .field("close", &queue.close)
            .field("stopped", &queue.stopped)
            .finish()
    }
}

/// What the writer is given.
enum Next {
    Items(Vec<Outbound>),
    /// The close, and what was queued before it.
    Close(CloseReason, Vec<Outbound>),
}

impl Outlet {
    /// An outlet that takes up to `frames` frames and `bytes` bytes waiting; a client past
    /// either is closed as a slow consumer and counted in `slow`.
    pub fn new(frames: usize, bytes: usize, slow: IntCounter) -> Arc<Self> {
        Arc::new(Self {
            queue: Mutex::new(Queue::default()),
            writer: AtomicWaker::new(),
            closing: Notify::new(),
            frame_limit: frames.max(1),
            byte_limit: bytes,
            slow,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues an item; a full queue closes the client as a slow consumer instead of waiting for
    /// it. False if the item was not queued (full, or the writer is done).
    pub(crate) fn queue(&self, item: Arc<Weighed>) -> bool {
        let mut queue = self.lock();
        // A connection whose writer is gone is not a slow consumer, whatever it left queued.
        if queue.stopped {
            return false;
        }
        if queue.frames + item.frames > self.frame_limit || queue.bytes >= self.byte_limit {
            drop(queue);
            if self.close(SLOW_CONSUMER) {
                self.slow.inc();
            }
            return false;
        }
        queue.frames += item.frames;
        queue.bytes += item.bytes;
        queue.items.push_back(item);
        drop(queue);
        self.writer.wake();
        true
    }

    /// How many more frames the queue takes now before the client counts as a slow consumer.
    pub(crate) fn room(&self) -> usize {
        self.frame_limit.saturating_sub(self.lock().frames)
    }

    /// Asks the writer to close the connection with `reason` once what is queued is written
    /// (all of it is dropped for a slow consumer). The first reason wins; true if this was it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut queue = self.lock();
        if queue.close.is_some() {
            return false;
        }
        queue.close = Some(reason);
        drop(queue);
        self.writer.wake();
        // A permit if the reader is not waiting now: it hears of the close when it next waits.
        self.closing.notify_one();
        true
    }

    /// The close asked for, if any.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.lock().close
    }

    /// Returns once the server has asked for the connection to be closed (see [`close`]).
    ///
    /// [`close`]: Self::close
    pub async fn closed(&self) {
        if self.lock().close.is_some() {
            return;
        }
        self.closing.notified().await;
    }

    /// Takes what is waiting off the backlog, and the queue's memory with it: an idle connection
    /// holds none.
    fn take(queue: &mut Queue) -> VecDeque<Arc<Weighed>> {
        queue.frames = 0;
        queue.bytes = 0;
        std::mem::take(&mut queue.items)
    }

    /// The taken items' frames, for the writer, outside the lock the fan-out queues under. The
    /// items' tickets go with them (see [`Written`]): a delivery counts as written once its
    /// frames are in the writer's hands.
    fn frames_of(items: VecDeque<Arc<Weighed>>) -> Vec<Outbound> {
        items.into_iter().map(|item| item.out.clone()).collect()
    }

    fn poll_next(&self, cx: &mut Context<'_>) -> Poll<Next> {
        self.writer.register(cx.waker());
        let mut queue = self.lock();
        let close = queue.close;
        if close.is_some() {
            queue.stopped = true;
        } else if queue.items.is_empty() {
            return Poll::Pending;
        }
        let items = Self::take(&mut queue);
        drop(queue);
        let items = Self::frames_of(items);
        Poll::Ready(match close {
            Some(reason) => Next::Close(reason, items),
            None => Next::Items(items),
        })
    }

    /// What was queued since the writer last looked, without waiting (and without the close:
    /// the next wait sees it).
    fn take_more(&self) -> Vec<Outbound> {
        let items = {
            let mut queue = self.lock();
            if queue.close.is_some() {
                return Vec::new();
            }
            Self::take(&mut queue)
        };
        Self::frames_of(items)
    }

    /// The writer is done: what is still queued, and whatever comes, is dropped (with their
    /// tickets, so no delivery waits for this connection).
    fn stop(&self) {
        let items = {
            let mut queue = self.lock();
            queue.stopped = true;
            Self::take(&mut queue)
        };
        drop(items);
    }
}

/// Writes what `outlet` is given to `io` until the close, then the close frame; returns once
/// the close is written or the socket fails.
pub async fn write_out<W: AsyncWrite + Unpin>(mut io: W, outlet: Arc<Outlet>) {
    struct Stopped<'a>(&'a Outlet);
    impl Drop for Stopped<'_> {
        fn drop(&mut self) {
            self.0.stop();
        }
    }
    let _stopped = Stopped(&outlet);
    loop {
        match std::future::poll_fn(|cx| outlet.poll_next(cx)).await {
            Next::Items(mut items) => {
                // A broadcast batch is usually still being fanned out: let it land, then write
                // everything that is waiting with one system call.
                tokio::task::yield_now().await;
                items.extend(outlet.take_more());
                if write_frames(&mut io, &items).await.is_err() {
                    return;
                }
            }
            Next::Close(reason, items) => {
                // What is already queued (error replies, say) goes out first, unless the queue
                // is the problem.
                if reason != SLOW_CONSUMER && write_frames(&mut io, &items).await.is_err() {
                    return;
                }
                if reason != ANSWERED
                    && let Ok(frame) = close_frame(reason)
                {
                    let _ = io.write_all(&frame).await;
                }
                let _ = io.flush().await;
                return;
            }
        }
    }
}

/// `reason` as a close frame, as tungstenite frames it.
fn close_frame(reason: CloseReason) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(4 + reason.reason.len());
    Frame::close(Some(CloseFrame {
        code: CloseCode::from(reason.code),
        reason: Utf8Bytes::from_static(reason.reason),
    }))
    .format(&mut out)
    .map_err(io::Error::other)?;
    Ok(out)
}

/// Writes `items` with as few system calls as the kernel allows: each text frame's header
/// (framed by tungstenite) and its payload are slices of one vectored write.
async fn write_frames<W: AsyncWrite + Unpin>(io: &mut W, items: &[Outbound]) -> io::Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    const TEXT: FrameHeader = FrameHeader {
        is_final: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Data(Data::Text),
        mask: None,
    };
    // Every header first (the slices borrow the buffer once it stops growing), then the slices.
    let mut headers = Vec::new();
    let mut pieces: Vec<(std::ops::Range<usize>, &[u8])> = Vec::new();
    for item in items {
        let frames = match item {
            Outbound::Frame(frame) => std::slice::from_ref(frame),
            Outbound::Frames(frames) | Outbound::Replay(frames) => &frames[..],
            Outbound::Framed(bytes) => {
                pieces.push((0..0, bytes));
                continue;
            }
        };
        for frame in frames {
            let start = headers.len();
            TEXT.format(frame.len() as u64, &mut headers)
                .map_err(io::Error::other)?;
            pieces.push((start..headers.len(), frame.as_bytes()));
        }
    }
    let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(pieces.len() * 2);
    for (header, payload) in &pieces {
        if !header.is_empty() {
            slices.push(IoSlice::new(&headers[header.clone()]));
        }
        slices.push(IoSlice::new(payload));
    }
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = io.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    io.flush().await
}

/// The socket as tungstenite sees it: it reads what the client sends, and what it writes (its
/// answers to pings and closes) joins the connection's outbound queue, in order with every other
/// frame, for the one writer to send.
pub struct Answering<R> {
    read: R,
    outlet: Arc<Outlet>,
}

impl<R> Answering<R> {
    pub fn new(read: R, outlet: Arc<Outlet>) -> Self {
        Self { read, outlet }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Answering<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.read).poll_read(cx, buf)
    }
}

impl<R: Unpin> AsyncWrite for Answering<R> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // Queued or not (a connection already closing drops it), it is taken: tungstenite must
        // never wait on the writer.
        let framed = Bytes::copy_from_slice(buf);
        let size = framed.len();
        self.outlet
            .queue(Weighed::new(Outbound::Framed(framed), size, None));
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Registry;

    fn outlet(frames: usize, bytes: usize) -> Arc<Outlet> {
        let slow = IntCounter::new("slow", "slow").unwrap();
        Registry::new().register(Box::new(slow.clone())).unwrap();
        Outlet::new(frames, bytes, slow)
    }

    fn item(out: Outbound) -> Arc<Weighed> {
        let bytes = out.bytes();
        Weighed::new(out, bytes, None)
    }

    fn frames(n: usize) -> Outbound {
        Outbound::Frames(Arc::from(vec![Utf8Bytes::from_static("f"); n]))
    }

    #[test]
    fn the_bound_counts_frames_not_queue_items() {
        let out = outlet(4, usize::MAX);
        assert!(out.queue(item(frames(3))));
        // Once the writer has taken them, they no longer count against the bound.
        let taken = Outlet::take(&mut out.lock());
        assert_eq!(taken.iter().map(|item| item.frames).sum::<usize>(), 3);
        assert!(out.queue(item(frames(3))));
        assert!(out.queue(item(Outbound::Frame(Utf8Bytes::from_static("fourth")))));
        assert_eq!(out.close_reason(), None);
        // Two items are queued, well under four, but five frames would be.
        assert!(!out.queue(item(frames(1))));
        assert_eq!(out.close_reason(), Some(SLOW_CONSUMER));
        assert_eq!(out.slow.get(), 1);
        // Counted once, however much more comes.
        assert!(!out.queue(item(frames(4))));
        assert_eq!(out.slow.get(), 1);
    }

    #[test]
    fn the_bound_counts_bytes_too_and_lets_one_large_item_into_a_short_queue() {
        let out = outlet(1000, 100);
        let big = || Utf8Bytes::from(vec!["x"; 150].concat());
        // A replay larger than the bound goes to a client with nothing waiting...
        assert!(out.queue(item(Outbound::Replay(Arc::from(vec![big()])))));
        let taken = Outlet::take(&mut out.lock());
        assert_eq!(taken.iter().map(|item| item.bytes).sum::<usize>(), 150);
        assert!(out.queue(item(Outbound::Frame(Utf8Bytes::from(
            vec!["y"; 60].concat()
        )))));
        assert!(out.queue(item(Outbound::Frame(Utf8Bytes::from(
            vec!["y"; 30].concat()
        )))));
        assert_eq!(out.close_reason(), None);
        // ...but not past 100 bytes already waiting, whatever the frame count.
        assert!(out.queue(item(Outbound::Frame(Utf8Bytes::from_static("0123456789")))));
        assert!(!out.queue(item(Outbound::Frame(Utf8Bytes::from_static("z")))));
        assert_eq!(out.close_reason(), Some(SLOW_CONSUMER));
    }

    #[test]
    fn an_idle_queue_holds_no_memory() {
        let out = outlet(1000, usize::MAX);
        for _ in 0..100 {
            assert!(out.queue(item(frames(1))));
        }
        Outlet::take(&mut out.lock());
        assert_eq!(out.lock().items.capacity(), 0);
    }

    #[tokio::test]
    async fn frames_reach_the_wire_framed_in_order_then_the_close() {
        let out = outlet(100, usize::MAX);
        let (client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(write_out(server, out.clone()));
        let big = Utf8Bytes::from("b".repeat(300));
        assert!(out.queue(item(Outbound::Frame(Utf8Bytes::from_static("one")))));
        assert!(out.queue(item(Outbound::Frames(Arc::from(vec![
            Utf8Bytes::from_static("two"),
            big.clone(),
        ])))));
        assert!(out.queue(item(Outbound::Framed(Bytes::from_static(&[
            0x8a, 0x01, b'p'
        ])))));
        out.close(CloseReason {
            code: 1001,
            reason: "bye",
        });
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut { client }, &mut wire)
            .await
            .unwrap();
        writer.await.unwrap();
        let mut expected = vec![0x81, 3];
        expected.extend(b"one");
        expected.extend([0x81, 3]);
        expected.extend(b"two");
        expected.extend([0x81, 126, 1, 44]);
        expected.extend(big.as_bytes());
        expected.extend([0x8a, 0x01, b'p']);
        expected.extend([0x88, 5, 0x03, 0xe9]);
        expected.extend(b"bye");
        assert_eq!(wire, expected);
        // The writer is done: nothing more is taken, and it is not a slow consumer.
        assert!(!out.queue(item(frames(1))));
        assert_eq!(out.slow.get(), 0);
    }

    #[tokio::test]
    async fn a_slow_consumer_is_closed_without_what_it_left_queued() {
        let out = outlet(2, usize::MAX);
        let (client, server) = tokio::io::duplex(64);
        assert!(out.queue(item(frames(2))));
        assert!(!out.queue(item(frames(1))));
        let writer = tokio::spawn(write_out(server, out.clone()));
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut { client }, &mut wire)
            .await
            .unwrap();
        writer.await.unwrap();
        let mut expected = vec![0x88, 15, 0x03, 0xf3];
        expected.extend(b"slow consumer");
        assert_eq!(wire, expected);
    }

    #[tokio::test]
    async fn a_closed_client_gets_only_its_answer() {
        let out = outlet(10, usize::MAX);
        let (client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(write_out(server, out.clone()));
        // tungstenite's answer to the client's close, then the reader's close.
        let mut answering = Answering::new(tokio::io::empty(), out.clone());
        answering
            .write_all(&[0x88, 0x02, 0x03, 0xe8])
            .await
            .unwrap();
        assert!(out.close(ANSWERED));
        assert!(!out.close(SLOW_CONSUMER), "the first reason wins");
        out.closed().await;
        let mut wire = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut { client }, &mut wire)
            .await
            .unwrap();
        writer.await.unwrap();
        assert_eq!(wire, [0x88, 0x02, 0x03, 0xe8]);
    }

    #[tokio::test]
    async fn a_delivery_counts_as_written_once_taken_even_by_a_client_that_does_not_read() {
        let out = outlet(10, usize::MAX);
        let (written, wait) = written();
        let big = Outbound::Frame(Utf8Bytes::from("x".repeat(10_000)));
        assert!(out.queue(Weighed::new(big, 10_000, Some(&written))));
        drop(written);
        // The client reads nothing: the write waits on it, the ticket does not.
        let (_client, server) = tokio::io::duplex(64);
        let writer = tokio::spawn(write_out(server, out.clone()));
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            wait.within(std::time::Duration::from_secs(60)),
        )
        .await
        .expect("the ticket is released when the writer takes the item");
        writer.abort();
    }
}
