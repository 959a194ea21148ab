"""llmq workers: consume request messages from Kafka, run them on an engine,
write results to Redis."""
