//! How a run's broadcasts were batched: the broadcast batcher's batches by what sent them out
//! (a free sink, size, timeout, flush), read from the daemons' `/metrics` before and after.

use std::net::SocketAddr;

use serde::Serialize;

use super::admin_client::AdminClient;

/// Batches sent out for one reason, and the events they held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct BatchCount {
    pub batches: u64,
    pub events: u64,
    /// Events per batch (0 without batches).
    pub mean_size: f64,
}

impl BatchCount {
    fn new(batches: u64, events: u64) -> Self {
        Self {
            batches,
            events,
            mean_size: if batches == 0 {
                0.0
            } else {
                events as f64 / batches as f64
            },
        }
    }
}

/// The broadcast batcher's batches by trigger (`thunderline_pipeline_batch_size`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct BroadcastBatches {
    /// Sent as soon as the broadcast sink was free.
    pub idle: BatchCount,
    pub size: BatchCount,
    pub timeout: BatchCount,
    pub flush: BatchCount,
}

impl BroadcastBatches {
    /// Reads them from a daemon's `/metrics` text (summed over pipelines).
    pub fn from_metrics(text: &str) -> Self {
        let read = |trigger: &str| {
            let total = |suffix: &str| -> u64 {
                let name = format!("thunderline_pipeline_batch_size_{suffix}{{");
                let trigger = format!("trigger=\"{trigger}\"");
                text.lines()
                    .filter(|l| {
                        l.starts_with(&name)
                            && l.contains("batcher=\"broadcast\"")
                            && l.contains(&trigger)
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .map(|v| v as u64)
                    .sum()
            };
            BatchCount::new(total("count"), total("sum"))
        };
        Self {
            idle: read("idle"),
            size: read("size"),
            timeout: read("timeout"),
            flush: read("flush"),
        }
    }

    fn by_trigger(&self) -> [(&'static str, BatchCount); 4] {
        [
            ("idle", self.idle),
            ("size", self.size),
            ("timeout", self.timeout),
            ("flush", self.flush),
        ]
    }

    /// What was added since `before`.
    pub fn since(&self, before: &Self) -> Self {
        let d = |a: BatchCount, b: BatchCount| {
            BatchCount::new(
                a.batches.saturating_sub(b.batches),
                a.events.saturating_sub(b.events),
            )
        };
        Self {
            idle: d(self.idle, before.idle),
            size: d(self.size, before.size),
            timeout: d(self.timeout, before.timeout),
            flush: d(self.flush, before.flush),
        }
    }

    fn plus(&self, other: &Self) -> Self {
        let p = |a: BatchCount, b: BatchCount| {
            BatchCount::new(a.batches + b.batches, a.events + b.events)
        };
        Self {
            idle: p(self.idle, other.idle),
            size: p(self.size, other.size),
            timeout: p(self.timeout, other.timeout),
            flush: p(self.flush, other.flush),
        }
    }

    /// One line: each trigger's batches and mean size.
    pub fn summary(&self) -> String {
        self.by_trigger()
            .iter()
            .map(|(name, c)| format!("{name} {} (mean {:.1})", c.batches, c.mean_size))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The daemons' broadcast batches so far, summed; None if one of them cannot say (a server
/// of another kind, with `--url`).
pub(super) async fn scrape(daemons: &[SocketAddr], token: &str) -> Option<BroadcastBatches> {
    if daemons.is_empty() {
        return None;
    }
    let mut total = BroadcastBatches::default();
    for addr in daemons {
        let mut client = AdminClient::connect(*addr, token).await.ok()?;
        let text = client.text("/metrics").await.ok()?;
        total = total.plus(&BroadcastBatches::from_metrics(&text));
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_broadcast_batchers_histogram_only() {
        let text = "\
thunderline_pipeline_batch_size_sum{batcher=\"broadcast\",pipeline=\"zones\",trigger=\"idle\"} 12
thunderline_pipeline_batch_size_count{batcher=\"broadcast\",pipeline=\"zones\",trigger=\"idle\"} 4
thunderline_pipeline_batch_size_bucket{batcher=\"broadcast\",pipeline=\"zones\",trigger=\"idle\",le=\"1\"} 2
thunderline_pipeline_batch_size_sum{batcher=\"audit\",pipeline=\"zones\",trigger=\"idle\"} 100
thunderline_pipeline_batch_size_count{batcher=\"audit\",pipeline=\"zones\",trigger=\"idle\"} 5
thunderline_pipeline_batch_size_sum{batcher=\"broadcast\",pipeline=\"zones\",trigger=\"size\"} 512
thunderline_pipeline_batch_size_count{batcher=\"broadcast\",pipeline=\"zones\",trigger=\"size\"} 2
";
        let b = BroadcastBatches::from_metrics(text);
        assert_eq!(b.idle, BatchCount::new(4, 12));
        assert_eq!(b.idle.mean_size, 3.0);
        assert_eq!(b.size, BatchCount::new(2, 512));
        assert_eq!(b.timeout, BatchCount::default());
        let later =
            BroadcastBatches::from_metrics(&text.replace("} 4", "} 6").replace("} 12", "} 20"));
        assert_eq!(later.since(&b).idle, BatchCount::new(2, 8));
        assert_eq!(later.since(&b).size, BatchCount::default());
    }
}
