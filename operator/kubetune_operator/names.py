"""Names and labels of the operator's children, shared by the builders, the reconciler and the handlers.

Every child object's name is derived from the FineTuneJob's name alone, so that any operator
replica, before or after a restart, looks for (and creates) exactly the same objects. The CRD's
CEL rules cap FineTuneJob names at ``kubetune_api.coordinates.MAX_NAME_LENGTH`` characters so
that these fit in 63. (API coordinates and the pod's well-known paths are in ``kubetune_api``.)
"""

from __future__ import annotations

from typing import Final

from kubetune_api import coordinates, wellknown

#: The trainer container's name (podFailurePolicy rules and status refer to it).
TRAINER_CONTAINER: Final = wellknown.TRAINER_CONTAINER

LABEL_NAME: Final = "app.kubernetes.io/name"
LABEL_INSTANCE: Final = "app.kubernetes.io/instance"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
LABEL_FINETUNEJOB: Final = coordinates.LABEL_FINETUNEJOB
LABEL_KUEUE_QUEUE: Final = "kueue.x-k8s.io/queue-name"
#: Kueue labels each Workload with the uid of the Job it stands for.
LABEL_KUEUE_JOB_UID: Final = "kueue.x-k8s.io/job-uid"
MANAGED_BY: Final = "kubetune"
APP_NAME: Final = "kubetune-trainer"
#: The User-Agent of the operator's own API client (kopf's watches and patches say ``kopf/<version>``):
#: the field manager of the children it creates, and how an audit log tells its requests apart.
OPERATOR_USER_AGENT: Final = "kubetune-operator"


def job_name(ftj_name: str) -> str:
    """The batch/v1 Job running the trainer."""
    return f"{ftj_name}-trainer"


def config_map_name(ftj_name: str) -> str:
    """The ConfigMap holding the rendered trainer config."""
    return f"{ftj_name}-config"


def service_account_name(ftj_name: str) -> str:
    """The trainer pod's ServiceAccount; its Role and RoleBinding share the name."""
    return f"{ftj_name}-trainer"


def network_policy_name(ftj_name: str) -> str:
    """The NetworkPolicy limiting the trainer pod's traffic (when the operator is configured for it)."""
    return f"{ftj_name}-trainer"


#: The groups of egress rules a trainer NetworkPolicy is made of (KUBETUNE_TRAINER_EGRESS's keys):
#: cluster DNS, the API server (progress reports), the object store, and the model hub (added only
#: for FineTuneJobs whose model comes from the hub).
EGRESS_ALWAYS: Final = ("dns", "apiServer", "objectStore")
EGRESS_HUB: Final = "hub"


def labels(ftj_name: str) -> dict[str, str]:
    """Labels on every child object (and on the trainer pods)."""
    return {
        LABEL_NAME: APP_NAME,
        LABEL_INSTANCE: ftj_name,
        LABEL_MANAGED_BY: MANAGED_BY,
        LABEL_FINETUNEJOB: ftj_name,
    }


#: Server-side label selector for the Jobs and Pods the operator watches.
CHILD_SELECTOR: Final = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_FINETUNEJOB}"
