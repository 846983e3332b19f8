//! The pipeline-file parser, `daemon::config::PipelineFile::parse`, on any text. It never
//! panics; a refusal names the file; a file it accepts yields the library configurations `serve`
//! builds from it (processors, batchers, retry policies and their first delays, zone history,
//! broker sources) that pass the library's own checks, and written back as TOML it parses to the
//! same file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use thunderline::daemon::config::PipelineFile;
use thunderline::daemon::error::DaemonError;
use thunderline::pipeline::RetryPolicy;

/// What a stage computes from a retry policy (f32 and f64 arithmetic on the file's numbers).
fn retry(policy: &RetryPolicy) {
    assert!(policy.validate().is_ok(), "a parsed policy is valid: {policy:?}");
    for n in [0, 1, 2, 30, u32::MAX] {
        let _ = (policy.cap(n), policy.delay(n));
    }
    for _ in policy.delays().take(8) {}
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("fuzz.toml");
    let file = match PipelineFile::parse(text, path) {
        Ok(file) => file,
        Err(DaemonError::InvalidPipelineFile { path: named, .. }) => {
            assert_eq!(named, path);
            return;
        }
        Err(e) => panic!("parsing read a file: {e}"),
    };
    let processors = &file.processors.config;
    let _ = (processors.get_concurrency(), processors.get_max_demand());
    retry(processors.get_retry());
    for batcher in [&file.batchers.broadcast, &file.batchers.audit] {
        let _ = (batcher.get_name(), batcher.get_batch_size());
        retry(batcher.get_retry());
    }
    let _ = file.zones.history();
    let _ = file.zones.broadcast_limit();
    if let Some(nats) = &file.sources.nats {
        assert!(nats.validate().is_ok());
        retry(nats.get_reconnect());
    }
    if let Some(rabbit) = &file.sources.rabbitmq {
        assert!(rabbit.validate().is_ok());
        retry(rabbit.get_reconnect());
    }
    let written = toml::to_string(&file).expect("a pipeline file serialises");
    let again = PipelineFile::parse(&written, path)
        .unwrap_or_else(|e| panic!("written back, it is refused: {e}\n{written}"));
    assert_eq!(again, file, "{written}");
});
