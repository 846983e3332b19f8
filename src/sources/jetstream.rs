//! NATS JetStream: a durable pull consumer whose pulls follow the pipeline's demand.
