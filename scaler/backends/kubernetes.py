"""Workers as the replicas of a Kubernetes Deployment, set through its scale
subresource (GET/PATCH .../deployments/{name}/scale) with the official client.

Credentials: in-cluster (service account) when running in a pod, else a
kubeconfig (LLMQ_SCALER_KUBECONFIG or ~/.kube/config). The service account
needs get/patch on deployments/scale in the namespace. Kubernetes itself
drains a removed pod: SIGTERM, then SIGKILL after the pod's
terminationGracePeriodSeconds, which should cover a worker's longest batch.

Don't run this and a KEDA ScaledObject (or an HPA) on the same Deployment:
they would fight over spec.replicas.
"""

from __future__ import annotations

import asyncio

import structlog
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from scaler.settings import ScalerSettings

log = structlog.get_logger(__name__)


def api_client_from_settings(settings: ScalerSettings) -> k8s.ApiClient:
    """In-cluster credentials if there are any, else the kubeconfig."""
    if settings.kubeconfig is None:
        try:
            configuration = k8s.Configuration()
            k8s_config.load_incluster_config(client_configuration=configuration)
            return k8s.ApiClient(configuration)
        except k8s_config.ConfigException:
            pass
    return k8s_config.new_client_from_config(config_file=settings.kubeconfig, context=settings.kube_context)


class KubernetesBackend:
    name = "kubernetes"

    def __init__(self, deployment: str, namespace: str, api_client: k8s.ApiClient) -> None:
        self.deployment = deployment
        self.namespace = namespace
        self.api_client = api_client
        self.apps = k8s.AppsV1Api(api_client)
        self.patches = 0
        self.ready_replicas: int | None = None  # status.replicas at the last read
        self._closed = False

    @classmethod
    def from_settings(cls, settings: ScalerSettings) -> KubernetesBackend:
        return cls(settings.deployment, settings.namespace, api_client_from_settings(settings))

    async def start(self) -> None:
        await self.current()  # fail early on a wrong name, namespace or credentials

    async def current(self) -> int:
        """spec.replicas: what was last asked for; Kubernetes converges the pods to it."""
        scale = await asyncio.to_thread(self.apps.read_namespaced_deployment_scale, self.deployment, self.namespace)
        self.ready_replicas = scale.status.replicas if scale.status is not None else None
        return scale.spec.replicas or 0

    async def scale(self, desired: int) -> None:
        await asyncio.to_thread(self.apps.patch_namespaced_deployment_scale, self.deployment, self.namespace,
                                {"spec": {"replicas": desired}})
        self.patches += 1
        log.info("deployment_scaled", deployment=self.deployment, namespace=self.namespace, replicas=desired)

    async def close(self) -> None:
        # The Deployment keeps its replicas: the scaler holds no state that matters.
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self.api_client.close)

    def describe(self) -> dict:
        return {"backend": self.name, "deployment": self.deployment, "namespace": self.namespace}

    def counters(self) -> dict:
        return {"patches": self.patches}

    def draining(self) -> int:
        return 0
