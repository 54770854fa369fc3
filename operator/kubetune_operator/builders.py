"""Pure builders: a FineTuneJob (as the API server returns it) -> the Kubernetes objects it needs.

No I/O and no clients here: every function takes plain dicts and returns plain dicts, so the
whole desired state is unit-testable without a cluster. The spec is read through the API
types (:func:`spec_of`), so a partial body (e.g. in a unit test) gets the same defaults the API
server fills in.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ValidationError

from kubetune_api import coordinates, wellknown
from kubetune_api.base import field_errors
from kubetune_api.exitcodes import NON_RETRYABLE, TERMINATED_EXIT_CODE
from kubetune_api.spec import DistributedSpec, FineTuneJobSpec, FsdpSpec
from kubetune_api.trainer import ReportingSpec, TrainerConfig

from . import names

Obj = dict[str, Any]
Body = Mapping[str, Any]
#: Egress rules (core NetworkPolicyEgressRule objects) by group: see :data:`names.EGRESS_ALWAYS`.
Egress = Mapping[str, Sequence[Obj]]


class InvalidSpecError(ValueError):
    """The stored spec does not parse with the API types (e.g. stored under an older schema)."""


def spec_of(ftj: Body) -> FineTuneJobSpec:
    """The FineTuneJob's spec, typed (defaults filled in, rules checked)."""
    try:
        return FineTuneJobSpec.model_validate(ftj["spec"])
    except ValidationError as err:
        raise InvalidSpecError("; ".join(field_errors(err))) from err


def _meta(ftj: Body) -> Mapping[str, Any]:
    meta: Mapping[str, Any] = ftj["metadata"]
    return meta


def _wire(value: Any) -> Any:
    """A model (or tuple of models) as the JSON the API expects."""
    if isinstance(value, tuple):
        return [_wire(item) for item in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


def owner_reference(ftj: Body) -> Obj:
    """A controller owner reference to the FineTuneJob: children are garbage-collected with it."""
    meta = _meta(ftj)
    return {
        "apiVersion": coordinates.API_VERSION,
        "kind": coordinates.KIND,
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


def trainer_config(ftj: Body) -> TrainerConfig:
    """The trainer's config: the spec's training sections, and ``reporting`` naming this FineTuneJob."""
    meta = _meta(ftj)
    # The uid tags the MLflow run (from_spec keeps it only with tracking.mlflow).
    reporting = ReportingSpec(namespace=meta["namespace"], name=meta["name"], uid=meta.get("uid"))
    return TrainerConfig.from_spec(spec_of(ftj), reporting)


def config_map(ftj: Body) -> Obj:
    """The ConfigMap holding ``config.json``; immutable, like the training definition."""
    name = _meta(ftj)["name"]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _child_metadata(ftj, names.config_map_name(name)),
        "immutable": True,
        "data": {wellknown.CONFIG_KEY: trainer_config(ftj).to_json()},
    }


def trainer_service_account_name(ftj: Body) -> str:
    """The ServiceAccount the trainer runs as: the user's own, or the per-job one."""
    own = spec_of(ftj).identity.service_account_name
    return own if own is not None else names.service_account_name(_meta(ftj)["name"])


def service_account(ftj: Body) -> Obj | None:
    """The per-job trainer identity (None when the spec names its own ServiceAccount).

    Its annotations carry the cloud identity (IRSA, workload identity); its token is mounted only
    into the trainer pod.
    """
    identity = spec_of(ftj).identity
    if identity.service_account_name is not None:
        return None
    metadata = _child_metadata(ftj, names.service_account_name(_meta(ftj)["name"]))
    if identity.service_account_annotations:
        metadata["annotations"] = dict(identity.service_account_annotations)
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata,
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
                "apiGroups": [coordinates.GROUP],
                "resources": [coordinates.PLURAL],
                "resourceNames": [name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [coordinates.GROUP],
                "resources": [f"{coordinates.PLURAL}/status"],
                "resourceNames": [name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(ftj: Body) -> Obj:
    """Binds the per-job Role to the ServiceAccount the trainer runs as."""
    meta = _meta(ftj)
    role_name = names.service_account_name(meta["name"])
    subject = {
        "kind": "ServiceAccount",
        "name": trainer_service_account_name(ftj),
        "namespace": meta["namespace"],
    }
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _child_metadata(ftj, role_name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
        "subjects": [subject],
    }


def trainer_command(
    gpu_count: int, processes: int | None = None, distributed: DistributedSpec | None = None
) -> list[str]:
    """``python`` for one process; ``accelerate launch`` with the world size and FSDP flags beyond.

    ``--multi_gpu`` selects accelerate's torch.distributed launcher (one local process per rank)
    also on CPU: there the trainer's ``use_cpu`` makes them train over gloo, while accelerate's
    ``--cpu`` would start a single process (several only through mpirun with a hostfile).
    ``--main_process_port 0``: a free port for the ranks' rendezvous inside the pod.
    """
    tail = ["-m", "kubetune_trainer", "--config", wellknown.CONFIG_PATH]
    strategy = distributed if distributed is not None else DistributedSpec()
    world = processes if processes is not None else max(gpu_count, 1)
    if world == 1 and strategy.strategy == "ddp":
        return ["python", *tail]
    # accelerate's launcher, run so that a failed rank's exit code is the container's (launch.py).
    launch = ["python", "-m", "kubetune_trainer.launch", "--num_processes", str(world), "--num_machines", "1"]
    launch += ["--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if strategy.strategy == "fsdp":
        return [*launch, *fsdp_flags(strategy.fsdp or FsdpSpec()), *tail]
    return [*launch, "--multi_gpu", *tail]


def _flag(value: bool) -> str:
    return "true" if value else "false"


def fsdp_flags(fsdp: FsdpSpec) -> list[str]:
    """accelerate 1.15's FSDP flags for ``fsdp``: FSDP2, each decoder layer wrapped on its own.

    ``--mixed_precision no`` above leaves the precision to the Trainer (bf16/fp16 from
    training.precision), which hands it to FSDP's mixed-precision policy. Checkpoints are
    sharded (each rank writes its part; torch.distributed.checkpoint can load them with another
    world size); the wrap policy takes the layer class from the model (``_no_split_modules``).
    """
    return [
        "--use_fsdp",
        "--fsdp_version",
        "2",
        "--fsdp_reshard_after_forward",
        _flag(fsdp.sharding == "full"),
        "--fsdp_offload_params",
        _flag(fsdp.cpu_offload),
        "--fsdp_activation_checkpointing",
        _flag(fsdp.activation_checkpointing),
        "--fsdp_auto_wrap_policy",
        "TRANSFORMER_BASED_WRAP",
        "--fsdp_state_dict_type",
        "SHARDED_STATE_DICT",
        "--fsdp_cpu_ram_efficient_loading",
        "true",
        "--fsdp_sync_module_states",
        "true",
    ]


def trainer_env(ftj: Body) -> list[Obj]:
    """Environment of the trainer: its identity and where things are; no secret (see :func:`_volumes`)."""
    spec = spec_of(ftj)
    env: list[Obj] = [
        {"name": wellknown.ENV_JOB_NAME, "value": _meta(ftj)["name"]},
        {"name": wellknown.ENV_JOB_NAMESPACE, "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "HOME", "value": wellknown.SCRATCH_DIR},
        {"name": "TMPDIR", "value": wellknown.SCRATCH_DIR},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]
    if spec.model.token_secret_ref is not None:
        hub_token = f"{wellknown.HUB_TOKEN_DIR}/{wellknown.HUB_TOKEN_FILE}"
        env.append({"name": wellknown.ENV_HUB_TOKEN_PATH, "value": hub_token})
    if spec.model.cache is not None:
        # Hub models go to huggingface_hub's own cache (by revision, with its file locks) there.
        env.append({"name": "HF_HUB_CACHE", "value": f"{wellknown.MODEL_CACHE_DIR}/hub"})
    return env


def trainer_resources(spec: FineTuneJobSpec) -> Obj:
    """GPU limits plus CPU, memory and scratch-disk requests = limits (Guaranteed QoS when all are set)."""
    res = spec.resources
    limits: Obj = {}
    requests: Obj = {}
    if res.gpus > 0:
        limits[res.gpu_resource_name] = str(res.gpus)
    for key, value in (("cpu", res.cpu), ("memory", res.memory), ("ephemeral-storage", res.scratch)):
        if value is not None:
            requests[key] = limits[key] = str(value)
    out: Obj = {}
    if limits:
        out["limits"] = limits
    if requests:
        out["requests"] = requests
    return out


#: Secret files are readable by the trainer's group (fsGroup) and no one else.
SECRET_FILE_MODE = 0o440


def _secret_volumes(spec: FineTuneJobSpec) -> list[tuple[Obj, Obj]]:
    """(volume, mount) pairs putting the spec's Secret references at their well-known paths."""

    def secret(name: str, secret_name: str, items: dict[str, str], where: str) -> tuple[Obj, Obj]:
        volume = {
            "name": name,
            "secret": {
                "secretName": secret_name,
                "items": [{"key": key, "path": path} for key, path in items.items()],
                "defaultMode": SECRET_FILE_MODE,
                # Optional: a missing Secret or key would leave the pod in ContainerCreating,
                # holding its GPU, with the reason only in an Event. Mounted empty instead, the
                # trainer fails at once naming it (exit 47, SecretMissing).
                "optional": True,
            },
        }
        return volume, {"name": name, "mountPath": where, "readOnly": True}

    found = []
    creds = spec.storage.credentials_secret_ref
    if creds is not None:
        items = {
            creds.access_key_id_key: wellknown.ACCESS_KEY_ID_FILE,
            creds.secret_access_key_key: wellknown.SECRET_ACCESS_KEY_FILE,
        }
        if creds.session_token_key is not None:
            items[creds.session_token_key] = wellknown.SESSION_TOKEN_FILE
        found.append(secret("storage-credentials", creds.name, items, wellknown.STORAGE_CREDENTIALS_DIR))
    token = spec.model.token_secret_ref
    if token is not None:
        found.append(
            secret("hub-token", token.name, {token.key: wellknown.HUB_TOKEN_FILE}, wellknown.HUB_TOKEN_DIR)
        )
    mlflow = spec.tracking.mlflow
    tracking = None if mlflow is None else mlflow.credentials_secret_ref
    if tracking is not None:
        keys = (
            {tracking.token_key: wellknown.MLFLOW_TOKEN_FILE}
            if tracking.token_key is not None
            else {
                str(tracking.username_key): wellknown.MLFLOW_USERNAME_FILE,
                str(tracking.password_key): wellknown.MLFLOW_PASSWORD_FILE,
            }
        )
        found.append(secret("mlflow-credentials", tracking.name, keys, wellknown.MLFLOW_CREDENTIALS_DIR))
    return found


def _cache_volumes(spec: FineTuneJobSpec) -> list[tuple[Obj, Obj]]:
    """spec.model.cache's PersistentVolumeClaim, mounted where the config's modelCacheDir says."""
    cache = spec.model.cache
    if cache is None:
        return []
    volume = {"name": "model-cache", "persistentVolumeClaim": {"claimName": cache.claim_name}}
    return [(volume, {"name": "model-cache", "mountPath": wellknown.MODEL_CACHE_DIR})]


def _volumes(ftj: Body, spec: FineTuneJobSpec) -> list[Obj]:
    name = _meta(ftj)["name"]
    shm: Obj = {"medium": "Memory"}
    if spec.resources.shared_memory is not None:
        shm["sizeLimit"] = str(spec.resources.shared_memory)
    scratch: Obj = {}
    if spec.resources.scratch is not None:
        scratch["sizeLimit"] = str(spec.resources.scratch)
    return [
        {
            "name": "config",
            "configMap": {
                "name": names.config_map_name(name),
                "items": [{"key": wellknown.CONFIG_KEY, "path": wellknown.CONFIG_KEY}],
            },
        },
        {"name": "scratch", "emptyDir": scratch},
        {"name": "dshm", "emptyDir": shm},
        *(volume for volume, _ in _secret_volumes(spec)),
        *(volume for volume, _ in _cache_volumes(spec)),
    ]


def trainer_container(ftj: Body, image: str) -> Obj:
    """The trainer container: restricted security context, read-only root, config mounted."""
    spec = spec_of(ftj)
    container: Obj = {
        "name": names.TRAINER_CONTAINER,
        "image": image,
        "command": trainer_command(spec.resources.gpus, spec.resources.processes, spec.distributed),
        "env": trainer_env(ftj),
        "resources": trainer_resources(spec),
        "volumeMounts": [
            {"name": "config", "mountPath": wellknown.CONFIG_DIR, "readOnly": True},
            {"name": "scratch", "mountPath": wellknown.SCRATCH_DIR},
            {"name": "dshm", "mountPath": "/dev/shm"},
            *(mount for _, mount in _secret_volumes(spec)),
            *(mount for _, mount in _cache_volumes(spec)),
        ],
        "terminationMessagePath": wellknown.TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
        },
    }
    if spec.image_pull_policy is not None:
        container["imagePullPolicy"] = spec.image_pull_policy
    return container


def pod_template(ftj: Body, image: str) -> Obj:
    """The trainer pod: one container, the per-job ServiceAccount, and the spec's scheduling."""
    spec = spec_of(ftj)
    name = _meta(ftj)["name"]
    pod_spec: Obj = {
        "restartPolicy": "Never",
        # The trainer saves and uploads a checkpoint on SIGTERM: Kubernetes' 30 s is too short.
        "terminationGracePeriodSeconds": spec.lifecycle.termination_grace_period_seconds,
        "serviceAccountName": trainer_service_account_name(ftj),
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": wellknown.TRAINER_UID,
            "runAsGroup": wellknown.TRAINER_UID,
            "fsGroup": wellknown.TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [trainer_container(ftj, image)],
        "volumes": _volumes(ftj, spec),
    }
    scheduling = spec.scheduling
    passed = {
        "nodeSelector": scheduling.node_selector,
        "tolerations": scheduling.tolerations,
        "affinity": scheduling.affinity,
        "priorityClassName": scheduling.priority_class_name,
        "imagePullSecrets": spec.image_pull_secrets,
    }
    pod_spec.update({key: _wire(value) for key, value in passed.items() if value})
    # The user's labels (for identity webhooks) first: kubetune's own cannot be overridden.
    labels = {**(spec.identity.pod_labels or {}), **names.labels(name)}
    return {"metadata": {"labels": labels}, "spec": pod_spec}


def desired_suspend(spec: FineTuneJobSpec) -> bool | None:
    """What the Job's ``spec.suspend`` should be; ``None`` when Kueue decides.

    With a queue, Kueue owns ``spec.suspend`` (it unsuspends what it admits, and would undo a
    suspend by anyone else): kubetune suspends through the Workload instead (:func:`workload_patch`).
    """
    if spec.scheduling.queue_name:
        return None
    return spec.suspend


def workload_patch(spec: FineTuneJobSpec, workload: Mapping[str, Any]) -> Obj | None:
    """A merge patch of Kueue's Workload for the Job: ``spec.active`` follows ``spec.suspend``
    (Kueue's own switch: inactive evicts a running workload and keeps it from being admitted)."""
    active = not spec.suspend
    if workload.get("spec", {}).get("active", True) == active:
        return None
    return {"spec": {"active": active}}


def lifecycle_fields(spec: FineTuneJobSpec) -> Obj:
    """The Job fields that follow ``spec.lifecycle`` (None = unset)."""
    lifecycle = spec.lifecycle
    return {
        "backoffLimit": lifecycle.backoff_limit,
        "activeDeadlineSeconds": lifecycle.active_deadline_seconds,
        "ttlSecondsAfterFinished": lifecycle.ttl_seconds_after_finished,
    }


def job(ftj: Body, default_image: str) -> Obj:
    """The batch/v1 Job running the trainer once (retried per backoffLimit and podFailurePolicy)."""
    spec = spec_of(ftj)
    name = _meta(ftj)["name"]
    queue = spec.scheduling.queue_name
    extra_labels = {names.LABEL_KUEUE_QUEUE: queue} if queue else None
    suspend = desired_suspend(spec)
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
                        "values": list(NON_RETRYABLE),
                    },
                },
                # The trainer exits 143 only after SIGTERM, having saved a checkpoint when it was
                # training: a deleted pod (which gets no DisruptionTarget) resumes, uncounted.
                {
                    "action": "Ignore",
                    "onExitCodes": {
                        "containerName": names.TRAINER_CONTAINER,
                        "operator": "In",
                        "values": [TERMINATED_EXIT_CODE],
                    },
                },
                # Node drains, preemption and evictions do not count against backoffLimit.
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
            ]
        },
        "template": pod_template(ftj, spec.image or default_image),
    }
    job_spec.update({key: value for key, value in lifecycle_fields(spec).items() if value is not None})
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
    spec = spec_of(ftj)
    current = current_job.get("spec", {})
    wanted: Obj = dict(lifecycle_fields(spec))
    suspend = desired_suspend(spec)
    if suspend is not None:
        wanted["suspend"] = suspend
    changes = {key: value for key, value in wanted.items() if current.get(key) != value}
    return {"spec": changes} if changes else None


def tracking_egress(spec: FineTuneJobSpec) -> list[Obj]:
    """With tracking.mlflow, an egress rule for the tracking server: TCP to the port of its URI
    (80 or 443 without one), to any address, since the operator's configuration has no peers for
    a server each FineTuneJob names itself (and a host name is no NetworkPolicy peer)."""
    mlflow = spec.tracking.mlflow
    if mlflow is None:
        return []
    url = urlsplit(mlflow.tracking_uri)
    port = url.port or (443 if url.scheme == "https" else 80)
    return [{"ports": [{"protocol": "TCP", "port": port}]}]


def network_policy(ftj: Body, egress: Egress) -> Obj:
    """No ingress to the trainer pod; egress only to DNS, the API server, the object store, for a
    hub model the hub, and for tracking.mlflow its server's port. The peers differ per cluster, so
    the operator's config gives them."""
    spec = spec_of(ftj)
    name = _meta(ftj)["name"]
    groups = [*names.EGRESS_ALWAYS, *(() if spec.model.is_s3 else (names.EGRESS_HUB,))]
    rules = [dict(rule) for group in groups for rule in egress.get(group, ())]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _child_metadata(ftj, names.network_policy_name(name)),
        "spec": {
            "podSelector": {"matchLabels": {names.LABEL_FINETUNEJOB: name}},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [*rules, *tracking_egress(spec)],
        },
    }


def children(ftj: Body, default_image: str, egress: Egress | None = None) -> list[Obj]:
    """Every child object, in creation order (the Job last, once its pod can start).

    With ``egress`` (the operator's KUBETUNE_TRAINER_EGRESS) a NetworkPolicy comes before the Job.
    """
    found = [
        config_map(ftj),
        service_account(ftj),
        role(ftj),
        role_binding(ftj),
        network_policy(ftj, egress) if egress is not None else None,
        job(ftj, default_image),
    ]
    return [obj for obj in found if obj is not None]
