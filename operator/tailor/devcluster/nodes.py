"""The fake nodes of the dev cluster: one CPU node and two GPU nodes.

kwok manages every node annotated ``kwok.x-k8s.io/node: fake``: its stages make
the node Ready, keep its heartbeat fresh, and run the pods bound to it without
containers. The GPU nodes advertise the ``nvidia.com/gpu`` extended resource and
the labels NVIDIA's GPU feature discovery would set, so the scheduler places GPU
workloads exactly as it would on a real cluster.
"""

from __future__ import annotations

from typing import Any

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
GPU_RESOURCE = "nvidia.com/gpu"


def fake_node(
    name: str,
    cpu: str,
    memory: str,
    gpus: int = 0,
    gpu_product: str | None = None,
    gpu_memory_mib: int | None = None,
) -> dict[str, Any]:
    """A Node manifest (with status) that kwok will take over."""
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "type": "kwok",
    }
    resources = {"cpu": cpu, "memory": memory, "pods": "110", "ephemeral-storage": "500Gi"}
    if gpus:
        resources[GPU_RESOURCE] = str(gpus)
        labels["nvidia.com/gpu.present"] = "true"
        labels["nvidia.com/gpu.count"] = str(gpus)
        if gpu_product:
            labels["nvidia.com/gpu.product"] = gpu_product
        if gpu_memory_mib:
            labels["nvidia.com/gpu.memory"] = str(gpu_memory_mib)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {},
        "status": {
            "allocatable": dict(resources),
            "capacity": dict(resources),
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
        },
    }


FAKE_NODES: tuple[dict[str, Any], ...] = (
    fake_node("cpu-0", cpu="8", memory="32Gi"),
    fake_node(
        "gpu-a", cpu="8", memory="64Gi", gpus=1, gpu_product="NVIDIA-L4", gpu_memory_mib=23034
    ),
    fake_node(
        "gpu-b",
        cpu="32",
        memory="256Gi",
        gpus=4,
        gpu_product="NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib=81559,
    ),
    fake_node(  # a second 4-GPU node: a 2-node x 4-GPU training Job schedules whole
        "gpu-c",
        cpu="32",
        memory="256Gi",
        gpus=4,
        gpu_product="NVIDIA-H100-80GB-HBM3",
        gpu_memory_mib=81559,
    ),
)
