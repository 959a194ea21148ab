"""llmq gateway: the HTTP API. Validates requests, records them in Redis,
enqueues them on Kafka, and answers polls from Redis."""
