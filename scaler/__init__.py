"""The `scaler` daemon: reads the worker group's lag on the request topic and
sets the number of workers from it, down to zero (local processes or a
Kubernetes Deployment)."""
