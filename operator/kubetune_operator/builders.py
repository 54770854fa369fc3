"""Pure builders: a FineTuneJob (as the API server returns it) -> the Kubernetes objects it needs.

No I/O and no clients here: every function takes plain dicts and returns plain dicts, so the
whole desired state is unit-testable without a cluster. The API server has already applied the
CRD's defaults to the FineTuneJob; the builders still fall back to the same defaults so that a
partial body (e.g. in a unit test) renders the same objects.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from kubetune_trainer.config import (
    EXIT_INVALID_CONFIG,
    EXIT_INVALID_DATA,
    EXIT_WORLD_SIZE_MISMATCH,
    TrainerConfig,
)

from . import names

Obj = dict[str, Any]
Body = Mapping[str, Any]

#: Exit codes after which a retry cannot help: the Job fails at once (podFailurePolicy FailJob).
NON_RETRYABLE_EXIT_CODES = (EXIT_INVALID_DATA, EXIT_INVALID_CONFIG, EXIT_WORLD_SIZE_MISMATCH)
#: UID/GID the trainer runs as: the trainer image's non-root user (USER 65532:65532 in its Dockerfile).
TRAINER_UID = 65532
#: Scratch space (the trainer's workDir lives under it); the root filesystem is read-only.
SCRATCH_DIR = "/tmp"
DEFAULT_BACKOFF_LIMIT = 3
DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"

#: Spec keys that map 1:1 onto TrainerConfig sections.
_PASS_THROUGH = ("dataset", "method", "quantization", "lora", "training", "output")


def _meta(ftj: Body) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = ftj["metadata"]
    return meta


def _spec(ftj: Body) -> Mapping[str, Any]:
    spec: Mapping[str, Any] = ftj["spec"]
    return spec


def owner_reference(ftj: Body) -> Obj:
    """A controller owner reference to the FineTuneJob: children are garbage-collected with it."""
    meta = _meta(ftj)
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _child_metadata(ftj: Body, name: str, extra_labels: Mapping[str, str] | None = None) -> Obj:
    meta = _meta(ftj)
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": {**names.labels(meta["name"]), **(extra_labels or {})},
        "ownerReferences": [owner_reference(ftj)],
    }


def gpus(ftj: Body) -> int:
    """GPUs requested by the FineTuneJob (the CRD defaults to 1)."""
    return int(_spec(ftj).get("resources", {}).get("gpus", 1))


def trainer_config(ftj: Body) -> TrainerConfig:
    """The trainer's config, rendered from the spec (same camelCase field names).

    CRD-only fields (Secret references, scheduling, resources, lifecycle) are dropped or turned
    into what the trainer sees: a token Secret becomes ``model.tokenEnv`` (``HF_TOKEN``), the GPU
    count becomes ``gpus``, and ``reporting`` names this FineTuneJob.
    """
    spec = _spec(ftj)
    meta = _meta(ftj)
    model_spec = spec["model"]
    model: Obj = {
        key: model_spec[key] for key in ("source", "revision", "trustRemoteCode") if key in model_spec
    }
    if "tokenSecretRef" in model_spec:
        model["tokenEnv"] = "HF_TOKEN"
    storage = {key: value for key, value in spec.get("storage", {}).items() if key != "credentialsSecretRef"}
    data: Obj = {key: copy.deepcopy(spec[key]) for key in _PASS_THROUGH if key in spec}
    data.update(
        model=model,
        storage=storage,
        reporting={"namespace": meta["namespace"], "name": meta["name"]},
        gpus=gpus(ftj),
    )
    return TrainerConfig.model_validate(data)


def config_map(ftj: Body) -> Obj:
    """The ConfigMap holding ``config.json``; immutable, like the training definition."""
    name = _meta(ftj)["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _child_metadata(ftj, names.config_map_name(name)),
        "immutable": True,
        "data": {names.CONFIG_KEY: trainer_config(ftj).to_json()},
    }


def service_account(ftj: Body) -> Obj:
    """The trainer's identity; its token is mounted only into the trainer pod."""
    name = _meta(ftj)["name"]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _child_metadata(ftj, names.service_account_name(name)),
        "automountServiceAccountToken": False,
    }


def role(ftj: Body) -> Obj:
    """Read this one FineTuneJob and patch its status: all the trainer may do with its token."""
    name = _meta(ftj)["name"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _child_metadata(ftj, names.service_account_name(name)),
        "rules": [
            {
                "apiGroups": [names.GROUP],
                "resources": [names.PLURAL],
                "resourceNames": [name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [names.GROUP],
                "resources": [f"{names.PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(ftj: Body) -> Obj:
    """Binds the per-job Role to the per-job ServiceAccount."""
    meta = _meta(ftj)
    sa_name = names.service_account_name(meta["name"])
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _child_metadata(ftj, sa_name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa_name},
        "subjects": [{"kind": "ServiceAccount", "name": sa_name, "namespace": meta["namespace"]}],
    }


def trainer_command(gpu_count: int) -> list[str]:
    """One process for CPU or one GPU; ``accelerate launch`` with a process per GPU beyond that."""
    tail = ["-m", "kubetune_trainer", "--config", names.CONFIG_PATH]
    if gpu_count > 1:
        return ["accelerate", "launch", "--num_processes", str(gpu_count), *tail]
    return ["python", *tail]


def _secret_env(name: str, secret: str, key: str, *, optional: bool = False) -> Obj:
    ref: Obj = {"name": secret, "key": key}
    if optional:
        ref["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": ref}}


def trainer_env(ftj: Body) -> list[Obj]:
    """Environment of the trainer: its identity, and credentials by Secret reference only."""
    spec = _spec(ftj)
    env: list[Obj] = [
        {"name": "KUBETUNE_JOB_NAME", "value": _meta(ftj)["name"]},
        {"name": "KUBETUNE_JOB_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": SCRATCH_DIR},
        {"name": "TMPDIR", "value": SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    creds = spec.get("storage", {}).get("credentialsSecretRef")
    if creds:
        secret = creds["name"]
        env.append(_secret_env("AWS_ACCESS_KEY_ID", secret, creds.get("accessKeyIdKey", "AWS_ACCESS_KEY_ID")))
        env.append(
            _secret_env(
                "AWS_SECRET_ACCESS_KEY", secret, creds.get("secretAccessKeyKey", "AWS_SECRET_ACCESS_KEY")
            )
        )
        if "sessionTokenKey" in creds:
            env.append(_secret_env("AWS_SESSION_TOKEN", secret, creds["sessionTokenKey"]))
    token = spec["model"].get("tokenSecretRef")
    if token:
        env.append(_secret_env("HF_TOKEN", token["name"], token.get("key", "token")))
    return env


def trainer_resources(ftj: Body) -> Obj:
    """GPU limits plus CPU and memory requests = limits (Guaranteed QoS when all are set)."""
    res = _spec(ftj).get("resources", {})
    limits: Obj = {}
    requests: Obj = {}
    count = gpus(ftj)
    if count > 0:
        limits[res.get("gpuResourceName", DEFAULT_GPU_RESOURCE)] = str(count)
    for key in ("cpu", "memory"):
        if key in res:
            requests[key] = limits[key] = str(res[key])
    out: Obj = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


def _volumes(ftj: Body) -> list[Obj]:
    name = _meta(ftj)["name"]
    shm: Obj = {"medium": "Memory"}
    shm_size = _spec(ftj).get("resources", {}).get("sharedMemory")
    if shm_size is not None:
        shm["sizeLimit"] = str(shm_size)
    return [
        {
            "name": "config",
            "configMap": {
                "name": names.config_map_name(name),
                "items": [{"key": names.CONFIG_KEY, "path": names.CONFIG_KEY}],
            },
        },
        {"name": "scratch", "emptyDir": {}},
        {"name": "dshm", "emptyDir": shm},
    ]


def trainer_container(ftj: Body, image: str) -> Obj:
    """The trainer container: restricted security context, read-only root, config mounted."""
    spec = _spec(ftj)
    container: Obj = {
        "name": names.TRAINER_CONTAINER,
        "image": image,
        "command": trainer_command(gpus(ftj)),
        "env": trainer_env(ftj),
        "resources": trainer_resources(ftj),
        "volumeMounts": [
            {"name": "config", "mountPath": names.CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
        ],
        "terminationMessagePath": names.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if "imagePullPolicy" in spec:
        container["imagePullPolicy"] = spec["imagePullPolicy"]
    return container


def pod_template(ftj: Body, image: str) -> Obj:
    """The trainer pod: one container, the per-job ServiceAccount, and the spec's scheduling."""
    spec = _spec(ftj)
    name = _meta(ftj)["name"]
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "serviceAccountName": names.service_account_name(name),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [trainer_container(ftj, image)],
        "volumes": _volumes(ftj),
    }
    scheduling = spec.get("scheduling", {})
    for key in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if scheduling.get(key):
            pod_spec[key] = copy.deepcopy(scheduling[key])
    if spec.get("imagePullSecrets"):
        pod_spec["imagePullSecrets"] = copy.deepcopy(spec["imagePullSecrets"])
    return {"metadata": {"labels": names.labels(name)}, "spec": pod_spec}


def queue_name(ftj: Body) -> str | None:
    """The Kueue LocalQueue, if the FineTuneJob asks for one."""
    value = _spec(ftj).get("scheduling", {}).get("queueName")
    return str(value) if value else None


def desired_suspend(ftj: Body) -> bool | None:
    """What the Job's ``spec.suspend`` should be; ``None`` when Kueue decides (queued, not suspended)."""
    if _spec(ftj).get("suspend", False):
        return True
    if queue_name(ftj):
        return None
    return False


def lifecycle_fields(ftj: Body) -> Obj:
    """The Job fields that follow ``spec.lifecycle`` (None = unset)."""
    lifecycle = _spec(ftj).get("lifecycle", {})
    return {
        "backoffLimit": int(lifecycle.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)),
        "activeDeadlineSeconds": lifecycle.get("activeDeadlineSeconds"),
        "ttlSecondsAfterFinished": lifecycle.get("ttlSecondsAfterFinished"),
    }


def job(ftj: Body, default_image: str) -> Obj:
    """The batch/v1 Job running the trainer once (retried per backoffLimit and podFailurePolicy)."""
    spec = _spec(ftj)
    name = _meta(ftj)["name"]
    queue = queue_name(ftj)
    extra_labels = {names.LABEL_KUEUE_QUEUE: queue} if queue else None
    suspend = desired_suspend(ftj)
    job_spec: Obj = {
        "completions": 1,
        "parallelism": 1,
        # With a queue, Kueue admits the Job by unsuspending it.
        "suspend": True if suspend is None else suspend,
        "podReplacementPolicy": "Failed",
        "podFailurePolicy": {
            "rules": [
                {
                    "action": "FailJob",
                    "onExitCodes": {
                        "containerName": names.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": list(NON_RETRYABLE_EXIT_CODES),
                    },
                },
                # Node drains, preemption and evictions do not count against backoffLimit.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": pod_template(ftj, spec.get("image") or default_image),
    }
    job_spec.update({key: value for key, value in lifecycle_fields(ftj).items() if value is not None})
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _child_metadata(ftj, names.job_name(name), extra_labels),
        "spec": job_spec,
    }


def job_patch(ftj: Body, current_job: Mapping[str, Any]) -> Obj | None:
    """A merge patch aligning an existing Job with the editable spec fields, or None if aligned.

    Only ``suspend`` and the lifecycle limits may change after creation (the CRD enforces it).
    """
    current = current_job.get("spec", {})
    wanted: Obj = dict(lifecycle_fields(ftj))
    suspend = desired_suspend(ftj)
    if suspend is not None:
        wanted["suspend"] = suspend
    changes = {key: value for key, value in wanted.items() if current.get(key) != value}
    return {"spec": changes} if changes else None


def children(ftj: Body, default_image: str) -> list[Obj]:
    """Every child object, in creation order (the Job last, once its pod can start)."""
    return [
        config_map(ftj),
        service_account(ftj),
        role(ftj),
        role_binding(ftj),
        job(ftj, default_image),
    ]
