//! RabbitMQ: a durable queue consumed with a prefetch the pipeline's demand sets.
