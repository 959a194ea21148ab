"""OpenAI's Batch API: files, batches, and the loop that runs them."""
