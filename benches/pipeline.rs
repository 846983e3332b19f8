//! The path behind `thunderline bench pipeline`, under criterion: small messages through
//! producer → processors → one batcher → a no-op sink, next to a bare crossbeam channel between
//! two threads as the baseline.
//!
//! `cargo bench --bench pipeline` (add `-- --quick` for a rougher, faster run).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use thunderline::bench::pipeline::{PipelineArgs, baseline, run_pipeline};

const EVENTS: u64 = 100_000;

fn pipeline_vs_baseline(c: &mut Criterion) {
    // The CLI's defaults but for the event count, so the figures compare with `thunderline bench`.
    let args = PipelineArgs {
        events: EVENTS,
        processors: 2,
        max_demand: 1024,
        batch_size: 20,
        rounds: 1,
        partitioned: false,
        fanout: 1,
        json: false,
    };
    // One runtime for every iteration: building one per run would be measured as well.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");

    let mut group = c.benchmark_group("pipeline_vs_baseline");
    group.throughput(Throughput::Elements(EVENTS));
    // Each iteration moves 100k messages, so few samples are already stable and keep the
    // whole run under a minute.
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    group.bench_function("crossbeam_baseline", |b| {
        b.iter(|| black_box(baseline(EVENTS)))
    });
    group.bench_function("pipeline", |b| {
        b.to_async(&runtime).iter(|| async {
            let (_, acked, failed, _) = run_pipeline(&args).await.expect("the pipeline failed");
            // A pipeline that lost messages would look fast for the wrong reason.
            assert_eq!((acked, failed), (EVENTS, 0));
        })
    });
    group.finish();
}

criterion_group!(benches, pipeline_vs_baseline);
criterion_main!(benches);
