"""Code that two or more of llmq's processes need: settings, the wire schema,
Redis keys and store, Kafka and Redis clients, logging, and the local dev stack."""
