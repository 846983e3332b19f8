//! Acknowledgement: telling a message's source, exactly once, how the message ended.
//!
//! The contract, as in Broadway: a message is acknowledged once, after its last stage (its
//! processor when it failed there or when the pipeline has no batchers, its batch sink
//! otherwise). Messages that share an acknowledger are acknowledged together, one call per
//! acknowledger per chunk or batch. A fan-out message is acknowledged once, when the last of its
//! copies finishes, failed if any copy failed.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::message::{Failure, Message, Status};

/// Receives finished messages. Called once per group of messages sharing this acknowledger.
///
/// It runs on the pipeline's stage tasks: it must not block. Hand slow work (a network ack to a
/// broker, say) to a task of your own. A panic in `ack` is logged and swallowed.
pub trait Acknowledger<T>: Send + Sync + 'static {
    fn ack(&self, successful: Vec<Message<T>>, failed: Vec<Message<T>>);
}

/// How a message reaches its acknowledger.
pub(crate) enum AckRef<T> {
    /// Nobody is listening; the message is simply dropped when done.
    None,
    Direct(Arc<dyn Acknowledger<T>>),
    /// One copy of a fan-out message.
    Branch(Arc<Join<T>>),
}

impl<T> Clone for AckRef<T> {
    fn clone(&self) -> Self {
        match self {
            Self::None => Self::None,
            Self::Direct(a) => Self::Direct(a.clone()),
            Self::Branch(j) => Self::Branch(j.clone()),
        }
    }
}

/// The rendezvous of a fan-out message's copies.
pub(crate) struct Join<T> {
    remaining: AtomicUsize,
    first_failure: Mutex<Option<Failure>>,
    /// Whether any copy went to the dead-letter sink: the message then counts as dead-lettered,
    /// once.
    dead_lettered: AtomicBool,
    origin: AckRef<T>,
}

impl<T> Join<T> {
    pub(crate) fn new(branches: usize, origin: AckRef<T>) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(branches),
            first_failure: Mutex::new(None),
            dead_lettered: AtomicBool::new(false),
            origin,
        })
    }

    /// Records one finished copy; returns the message to acknowledge when it was the last one.
    fn finish(self: Arc<Self>, mut msg: Message<T>) -> Option<Message<T>> {
        if let Status::Failed(failure) = msg.status() {
            let mut first = self.first_failure.lock().unwrap_or_else(|e| e.into_inner());
            first.get_or_insert_with(|| failure.clone());
        }
        if msg.dead_lettered {
            self.dead_lettered.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        msg.dead_lettered = self.dead_lettered.load(Ordering::Acquire);
        let worst = self
            .first_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match worst {
            Some(failure) => msg.fail(failure),
            None => msg.reset_status(),
        }
        msg.ack = self.origin.clone();
        Some(msg)
    }
}

/// What one acknowledgement round settled, counted in original messages (not fan-out copies).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Settled {
    pub successful: usize,
    pub failed: usize,
    pub dead_lettered: usize,
}

impl Settled {
    pub fn total(self) -> usize {
        self.successful + self.failed
    }
}

struct Group<T> {
    acker: Arc<dyn Acknowledger<T>>,
    successful: Vec<Message<T>>,
    failed: Vec<Message<T>>,
}

/// Acknowledges finished messages, grouped per acknowledger.
pub(crate) fn acknowledge<T: 'static>(messages: Vec<Message<T>>) -> Settled {
    // The common case, one acknowledger and no failures, hands the batch over as it is.
    if let Some(AckRef::Direct(first)) = messages.first().map(|m| &m.ack) {
        let key = Arc::as_ptr(first) as *const ();
        let shared = messages.iter().all(|m| {
            !m.is_failed()
                && matches!(&m.ack, AckRef::Direct(a) if Arc::as_ptr(a) as *const () == key)
        });
        if shared {
            let acker = first.clone();
            let settled = Settled {
                successful: messages.len(),
                ..Settled::default()
            };
            call(&*acker, messages, Vec::new());
            return settled;
        }
    }
    let mut settled = Settled::default();
    let mut groups: Vec<Group<T>> = Vec::new();
    'messages: for mut msg in messages {
        // A fan-out copy hands over to its origin when it is the last copy to finish.
        while let AckRef::Branch(join) = &msg.ack {
            let join = join.clone();
            match join.finish(msg) {
                Some(origin) => msg = origin,
                None => continue 'messages,
            }
        }
        count(&mut settled, &msg);
        let AckRef::Direct(acker) = &msg.ack else {
            continue;
        };
        let key = Arc::as_ptr(acker) as *const ();
        let idx = match groups
            .iter()
            .position(|g| Arc::as_ptr(&g.acker) as *const () == key)
        {
            Some(i) => i,
            None => {
                groups.push(Group {
                    acker: acker.clone(),
                    successful: Vec::new(),
                    failed: Vec::new(),
                });
                groups.len() - 1
            }
        };
        let group = &mut groups[idx];
        if msg.is_failed() {
            group.failed.push(msg);
        } else {
            group.successful.push(msg);
        }
    }
    for group in groups {
        let Group {
            acker,
            successful,
            failed,
        } = group;
        call(&*acker, successful, failed);
    }
    settled
}

fn call<T: 'static>(
    acker: &dyn Acknowledger<T>,
    successful: Vec<Message<T>>,
    failed: Vec<Message<T>>,
) {
    if catch_unwind(AssertUnwindSafe(|| acker.ack(successful, failed))).is_err() {
        tracing::error!("an acknowledger panicked; its messages count as acknowledged");
    }
}

fn count<T>(settled: &mut Settled, msg: &Message<T>) {
    settled.dead_lettered += usize::from(msg.dead_lettered);
    if msg.is_failed() {
        settled.failed += 1;
    } else {
        settled.successful += 1;
    }
}
