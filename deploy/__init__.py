"""Running llmq: the `llmq` command and the local stack it starts (`llmq up`:
broker, Redis, gateway, scaler and workers on one machine). It sits above
gateway/, workers/ and scaler/, which it starts; the folders beside it hold
the container images, compose file and Kubernetes manifests."""
