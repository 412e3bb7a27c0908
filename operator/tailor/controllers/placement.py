"""What a spec may ask of the scheduler: the cluster admin's allow-lists (Helm:
workloads.pods).

``resources.priorityClassName`` and ``resources.tolerations`` reach the pod as written: a
tenant naming ``system-node-critical`` preempts everyone's pods, and a toleration without a
key (``operator: Exists``) lands its pods on tainted nodes kept for others (the control
plane, another team's GPUs). So a priority class must be one the admin lists, and each
toleration's key one the admin allows; anything else is refused before any pod, naming the
field and the Helm value.
"""

from __future__ import annotations

from tailor.api.base import TailorModel, walk
from tailor.api.common import Resources
from tailor.api.settings import PodPolicy


def refused_placement(spec: TailorModel, policy: PodPolicy) -> str | None:
    """Why a spec's placement is not allowed (the field, the Helm value), or None."""
    for path, part in walk(spec):
        if not isinstance(part, Resources):
            continue
        name = part.priority_class_name
        if name and name not in policy.allowed_priority_classes:
            allowed = ", ".join(policy.allowed_priority_classes) or "none"
            return (
                f"{path}.priorityClassName: {name} is not among the priority classes the "
                f"cluster admin allows (workloads.pods.allowedPriorityClasses: {allowed}); "
                "remove it or ask the admin"
            )
        for index, toleration in enumerate(part.tolerations or []):
            key = toleration.key
            if "*" in policy.allowed_toleration_keys:
                break
            if key not in policy.allowed_toleration_keys:
                allowed = ", ".join(policy.allowed_toleration_keys) or "none"
                return (
                    f"{path}.tolerations[{index}].key: "
                    + (f"taint {key}" if key else "a toleration without a key (every taint)")
                    + " is not among the taints the cluster admin lets workloads tolerate "
                    f"(workloads.pods.allowedTolerationKeys: {allowed}); remove it or ask "
                    "the admin"
                )
    return None
