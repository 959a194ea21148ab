"""Code that two or more of llmq's processes need: settings, the wire schema,
Redis keys and the request store, Kafka clients and the group's lag, tracing,
logging and metrics. It imports none of the parts above it."""
