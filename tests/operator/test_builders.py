"""Unit tests of the pure builders: FineTuneJob -> ConfigMap, ServiceAccount, Role, RoleBinding, Job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_api import coordinates, wellknown
from kubetune_api.exitcodes import ExitCode
from kubetune_api.spec import quantization_bits
from kubetune_api.trainer import TrainerConfig
from kubetune_operator import builders

Obj = dict[str, Any]
EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "examples" / "finetunejob.yaml"
TRAINER_IMAGE = "registry.example/kubetune/trainer:test"


def _container(job: Obj) -> Obj:
    containers: list[Obj] = job["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(job: Obj) -> dict[str, Obj]:
    return {item["name"]: item for item in _container(job)["env"]}


def test_children_have_deterministic_names_labels_and_owner(make_ftj: Any) -> None:
    ftj = make_ftj(name="llama-chat", namespace="ml")
    kinds = {obj["kind"]: obj for obj in builders.children(ftj, TRAINER_IMAGE)}

    assert list(kinds) == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    assert kinds["Job"]["metadata"]["name"] == "llama-chat-trainer"
    assert kinds["ConfigMap"]["metadata"]["name"] == "llama-chat-config"
    for kind in ("ServiceAccount", "Role", "RoleBinding"):
        assert kinds[kind]["metadata"]["name"] == "llama-chat-trainer"
    for obj in kinds.values():
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["labels"] == {
            "app.kubernetes.io/name": "kubetune-trainer",
            "app.kubernetes.io/instance": "llama-chat",
            "app.kubernetes.io/managed-by": "kubetune",
            "kubetune.dev/finetunejob": "llama-chat",
        }
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "kubetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": "llama-chat",
                "uid": ftj["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    assert kinds["Job"]["spec"]["template"]["metadata"]["labels"] == kinds["Job"]["metadata"]["labels"]


def test_longest_allowed_name_fits_every_derived_name(make_ftj: Any) -> None:
    ftj = make_ftj(name="x" * coordinates.MAX_NAME_LENGTH)
    for obj in builders.children(ftj, TRAINER_IMAGE):
        assert len(obj["metadata"]["name"]) <= 63


def test_config_map_renders_the_trainer_config(make_ftj: Any) -> None:
    ftj = make_ftj(
        name="run-7",
        namespace="ml",
        model={"source": "meta-llama/Llama-3.2-1B", "revision": "main", "tokenSecretRef": {"name": "hf"}},
        dataset={"train": "s3://data/train.jsonl", "validationSplit": 0.1, "format": "chat"},
        training={"learningRate": 0.0001, "maxSteps": 500, "evalStrategy": "steps", "evalSteps": 50},
        storage={
            "endpoint": "http://minio:9000",
            "addressingStyle": "path",
            "credentialsSecretRef": {"name": "s3"},
        },
        resources={"gpus": 2},
    )
    cm = builders.config_map(ftj)
    assert cm["immutable"] is True
    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])

    assert config.model.source == "meta-llama/Llama-3.2-1B"
    assert config.model.revision == "main"
    assert config.model.token_secret_ref is None  # the trainer reads $HF_TOKEN, filled from the Secret
    assert config.dataset.format == "chat"
    assert config.dataset.validation_split == 0.1
    assert config.training.learning_rate == 0.0001
    assert config.training.max_steps == 500
    assert config.training.eval_steps == 50
    assert config.storage.endpoint == "http://minio:9000"
    assert config.storage.addressing_style == "path"
    assert config.output.uri == "s3://results/run-1"
    assert (config.reporting.namespace, config.reporting.name) == ("ml", "run-7")
    assert config.gpus == 2
    # No credential material or Secret names reach the config.
    assert "credentialsSecretRef" not in cm["data"]["config.json"]
    assert "tokenSecretRef" not in cm["data"]["config.json"]


def test_every_crd_default_is_accepted_by_the_trainer_config(make_ftj: Any) -> None:
    """A FineTuneJob with every optional section defaulted by the CRD renders a valid config."""
    config = builders.trainer_config(make_ftj())
    assert config.method == "qlora"
    assert config.quantization.bits is None  # the method's default: 4 for qlora
    assert quantization_bits(config.method, config.quantization) == 4
    assert config.lora.target_modules == ("all-linear",)
    assert config.training == TrainerConfig.model_fields["training"].default


def test_job_runs_the_trainer_with_restricted_security(make_ftj: Any) -> None:
    job = builders.job(make_ftj(resources={"gpus": 1, "memory": "64Gi", "cpu": 8}), TRAINER_IMAGE)
    pod = job["spec"]["template"]["spec"]
    container = _container(job)

    assert container["image"] == TRAINER_IMAGE
    assert container["command"] == [
        "python",
        "-m",
        "kubetune_trainer",
        "--config",
        "/etc/kubetune/config.json",
    ]
    assert container["resources"] == {
        "limits": {"nvidia.com/gpu": "1", "cpu": "8", "memory": "64Gi"},
        "requests": {"cpu": "8", "memory": "64Gi"},
    }
    assert pod["restartPolicy"] == "Never"
    assert pod["serviceAccountName"] == "demo-trainer"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }
    assert container["terminationMessagePath"] == "/dev/termination-log"
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts == {"/etc/kubetune": "config", "/tmp": "scratch", "/dev/shm": "dshm"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == "demo-config"


def test_job_failure_policy_and_lifecycle(make_ftj: Any) -> None:
    ftj = make_ftj(
        lifecycle={"backoffLimit": 5, "activeDeadlineSeconds": 7200, "ttlSecondsAfterFinished": 600}
    )
    spec = builders.job(ftj, TRAINER_IMAGE)["spec"]

    assert spec["backoffLimit"] == 5
    assert spec["activeDeadlineSeconds"] == 7200
    assert spec["ttlSecondsAfterFinished"] == 600
    assert spec["suspend"] is False
    assert spec["podReplacementPolicy"] == "Failed"
    fail_job, stopped, disrupted = spec["podFailurePolicy"]["rules"]
    assert fail_job["action"] == "FailJob"
    assert fail_job["onExitCodes"]["containerName"] == "trainer"
    assert ExitCode.INVALID_DATA in fail_job["onExitCodes"]["values"]
    assert ExitCode.STORAGE_UNREACHABLE not in fail_job["onExitCodes"]["values"]  # retried
    # A deleted pod gets no DisruptionTarget; the trainer saved and exited 143: not a failure.
    assert stopped == {
        "action": "Ignore",
        "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [143]},
    }
    assert disrupted == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}


def test_pod_gets_time_to_save_a_checkpoint_on_sigterm(make_ftj: Any) -> None:
    pod = builders.job(make_ftj(), TRAINER_IMAGE)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 300
    longer = make_ftj(lifecycle={"terminationGracePeriodSeconds": 1800})
    assert (
        builders.job(longer, TRAINER_IMAGE)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        == 1800
    )
    # Part of the pod template, which a Job cannot change: never in the Job patch.
    assert builders.job_patch(longer, builders.job(make_ftj(), TRAINER_IMAGE)) is None


def test_defaults_leave_optional_limits_unset(make_ftj: Any) -> None:
    spec = builders.job(make_ftj(), TRAINER_IMAGE)["spec"]
    assert spec["backoffLimit"] == 3
    assert "activeDeadlineSeconds" not in spec
    assert "ttlSecondsAfterFinished" not in spec


def test_secrets_reach_the_trainer_only_as_files_in_secret_volumes(make_ftj: Any) -> None:
    ftj = make_ftj(
        model={"source": "org/gated-model", "tokenSecretRef": {"name": "hf-token", "key": "hf"}},
        storage={"credentialsSecretRef": {"name": "s3-creds", "sessionTokenKey": "token"}},
    )
    job = builders.job(ftj, TRAINER_IMAGE)
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container(job)["volumeMounts"]}

    assert volumes["storage-credentials"]["secret"] == {
        "secretName": "s3-creds",
        "items": [
            {"key": "AWS_ACCESS_KEY_ID", "path": "access-key-id"},
            {"key": "AWS_SECRET_ACCESS_KEY", "path": "secret-access-key"},
            {"key": "token", "path": "session-token"},
        ],
        "defaultMode": 0o440,  # the trainer's group (fsGroup) only
        "optional": True,  # a missing Secret is the trainer's SecretMissing, not a stuck pod
    }
    assert mounts["storage-credentials"] == {
        "name": "storage-credentials",
        "mountPath": "/var/run/secrets/kubetune/storage",
        "readOnly": True,
    }
    assert volumes["hub-token"]["secret"]["items"] == [{"key": "hf", "path": "token"}]
    assert mounts["hub-token"]["mountPath"] == "/var/run/secrets/kubetune/hub"
    env = _env(job)
    # huggingface_hub reads the token file; nothing secret is in the environment.
    assert env["HF_TOKEN_PATH"] == {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/kubetune/hub/token"}
    assert not any("secretKeyRef" in json.dumps(e) for e in env.values())
    assert "envFrom" not in _container(job)
    assert env["KUBETUNE_JOB_NAME"] == {"name": "KUBETUNE_JOB_NAME", "value": "demo"}
    assert env["KUBETUNE_JOB_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_no_secret_volumes_or_env_without_secret_refs(make_ftj: Any) -> None:
    job = builders.job(make_ftj(), TRAINER_IMAGE)
    env = _env(job)
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "HF_TOKEN", "HF_TOKEN_PATH"} & set(env)
    assert [v["name"] for v in job["spec"]["template"]["spec"]["volumes"]] == ["config", "scratch", "dshm"]


def test_model_cache_mounts_its_claim_and_tells_the_trainer_and_the_hub_where(make_ftj: Any) -> None:
    model = {**make_ftj()["spec"]["model"], "cache": {"claimName": "shared-models", "maxSize": "500Gi"}}
    ftj = make_ftj(model=model)
    job = builders.job(ftj, TRAINER_IMAGE)
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "shared-models"},
    }
    mounts = {m["name"]: m["mountPath"] for m in _container(job)["volumeMounts"]}
    assert mounts["model-cache"] == wellknown.MODEL_CACHE_DIR
    assert _env(job)["HF_HUB_CACHE"]["value"] == f"{wellknown.MODEL_CACHE_DIR}/hub"
    config = TrainerConfig.model_validate_json(builders.config_map(ftj)["data"]["config.json"])
    assert config.model_cache_dir == wellknown.MODEL_CACHE_DIR
    assert config.model.cache is not None
    assert config.model.cache.max_size == "500Gi"
    # Not part of what the run is: the same job with or without a cache resumes the same checkpoints.
    plain = TrainerConfig.model_validate_json(builders.config_map(make_ftj())["data"]["config.json"])
    assert config.fingerprint() == plain.fingerprint()
    assert plain.model_cache_dir is None


def test_scratch_size_limits_the_emptydir_and_requests_ephemeral_storage(make_ftj: Any) -> None:
    job = builders.job(make_ftj(resources={"gpus": 0, "scratch": "200Gi"}), TRAINER_IMAGE)
    pod = job["spec"]["template"]["spec"]
    scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
    assert scratch == {"name": "scratch", "emptyDir": {"sizeLimit": "200Gi"}}
    resources = _container(job)["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "200Gi"
    config = TrainerConfig.model_validate_json(
        builders.config_map(make_ftj(resources={"scratch": "1Gi"}))["data"]["config.json"]
    )
    assert config.scratch_bytes == 1024**3
    unlimited = builders.job(make_ftj(), TRAINER_IMAGE)["spec"]["template"]["spec"]
    assert next(v for v in unlimited["volumes"] if v["name"] == "scratch")["emptyDir"] == {}


def test_per_job_service_account_carries_the_cloud_identity_annotations(make_ftj: Any) -> None:
    role_arn = "arn:aws:iam::123456789012:role/finetune-data"
    ftj = make_ftj(identity={"serviceAccountAnnotations": {"eks.amazonaws.com/role-arn": role_arn}})
    account = builders.service_account(ftj)
    assert account is not None
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role_arn}
    assert (
        builders.job(ftj, TRAINER_IMAGE)["spec"]["template"]["spec"]["serviceAccountName"] == "demo-trainer"
    )


def test_own_service_account_is_used_and_bound_instead_of_a_per_job_one(make_ftj: Any) -> None:
    ftj = make_ftj(
        identity={
            "serviceAccountName": "ml-data-reader",
            "podLabels": {"azure.workload.identity/use": "true"},
        }
    )
    kinds = [obj["kind"] for obj in builders.children(ftj, TRAINER_IMAGE)]
    assert kinds == ["ConfigMap", "Role", "RoleBinding", "Job"]
    assert builders.service_account(ftj) is None
    binding = builders.role_binding(ftj)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "ml-data-reader", "namespace": "team-a"}
    ]
    assert binding["roleRef"]["name"] == "demo-trainer"
    template = builders.job(ftj, TRAINER_IMAGE)["spec"]["template"]
    assert template["spec"]["serviceAccountName"] == "ml-data-reader"
    assert template["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert template["metadata"]["labels"]["kubetune.dev/finetunejob"] == "demo"


def test_image_by_digest_reaches_the_container(make_ftj: Any) -> None:
    image = "registry.example.com/ml/trainer@sha256:" + "a" * 64
    assert _container(builders.job(make_ftj(image=image), TRAINER_IMAGE))["image"] == image


#: accelerate's launcher, through the trainer's wrapper that keeps a failed rank's exit code.
LAUNCHER = ["python", "-m", "kubetune_trainer.launch"]
#: What every multi-process launch starts with (before the strategy's own flags).
LAUNCH = ["--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no"]
LAUNCH += ["--dynamo_backend", "no"]


@pytest.mark.parametrize(
    ("resources", "command_head", "gpu_limit"),
    [
        ({"gpus": 0}, ["python", "-m", "kubetune_trainer"], None),
        ({"gpus": 1}, ["python", "-m", "kubetune_trainer"], "1"),
        ({"gpus": 0, "processes": 1}, ["python", "-m", "kubetune_trainer"], None),
        ({"gpus": 4}, [*LAUNCHER, "--num_processes", "4", *LAUNCH, "--multi_gpu", "-m"], "4"),
        (
            {"gpus": 4, "processes": 4},
            [*LAUNCHER, "--num_processes", "4", *LAUNCH, "--multi_gpu", "-m"],
            "4",
        ),
        (
            {"gpus": 0, "processes": 2},
            [*LAUNCHER, "--num_processes", "2", *LAUNCH, "--multi_gpu"],
            None,
        ),
    ],
)
def test_gpus_and_processes_pick_launcher_and_limits(
    make_ftj: Any, resources: Obj, command_head: list[str], gpu_limit: str | None
) -> None:
    ftj = make_ftj(resources={**resources, "gpuResourceName": "amd.com/gpu"})
    container = _container(builders.job(ftj, TRAINER_IMAGE))
    assert container["command"][: len(command_head)] == command_head
    assert container["command"][-4:] == ["-m", "kubetune_trainer", "--config", "/etc/kubetune/config.json"]
    assert container["resources"].get("limits", {}).get("amd.com/gpu") == gpu_limit
    config = json.loads(builders.config_map(ftj)["data"]["config.json"])
    assert config.get("processes") == resources.get("processes")


def _accelerate_env(command: list[str]) -> dict[str, str]:
    """What accelerate 1.15's own parser and launcher environment make of a built command."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    assert command[:3] == LAUNCHER
    args = launch_command_parser().parse_args(command[3:])
    args, _, _ = _validate_launch_command(args)
    env: dict[str, str] = prepare_multi_gpu_env(args)
    return env


def test_fsdp_settings_reach_accelerate_as_its_fsdp_environment(make_ftj: Any) -> None:
    """Each spec.distributed.fsdp setting becomes the FSDP_* variable accelerate's plugin reads
    (parsed by accelerate's own launcher code: a misspelt flag fails here, not in a GPU pod)."""
    ftj = make_ftj(
        resources={"gpus": 8},
        distributed={
            "strategy": "fsdp",
            "fsdp": {"sharding": "shard-grad-op", "cpuOffload": True, "activationCheckpointing": True},
        },
        training={"gradientCheckpointing": False},
    )
    command = _container(builders.job(ftj, TRAINER_IMAGE))["command"]
    assert "--multi_gpu" not in command  # --use_fsdp picks the same torch.distributed launcher
    env = _accelerate_env(command)
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_VERSION"] == "2"
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "false"
    assert env["FSDP_OFFLOAD_PARAMS"] == "true"
    assert env["FSDP_ACTIVATION_CHECKPOINTING"] == "true"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == env["FSDP_SYNC_MODULE_STATES"] == "true"

    defaults = make_ftj(resources={"gpus": 2}, distributed={"strategy": "fsdp"})
    env = _accelerate_env(_container(builders.job(defaults, TRAINER_IMAGE))["command"])
    assert env["FSDP_RESHARD_AFTER_FORWARD"] == "true"  # sharding full
    assert env["FSDP_OFFLOAD_PARAMS"] == env["FSDP_ACTIVATION_CHECKPOINTING"] == "false"
    config = json.loads(builders.config_map(defaults)["data"]["config.json"])
    assert config["distributed"] == {"strategy": "fsdp"}


def test_ddp_launch_is_accelerates_multi_process_launcher(make_ftj: Any) -> None:
    """gpus 0 with processes 2 and gpus 4 both go through torch.distributed's launcher, no FSDP."""
    for resources in ({"gpus": 0, "processes": 2}, {"gpus": 4}):
        command = _container(builders.job(make_ftj(resources=resources), TRAINER_IMAGE))["command"]
        env = _accelerate_env(command)
        assert "ACCELERATE_USE_FSDP" not in env
        assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the Trainer's bf16/fp16 decides


def test_scheduling_image_and_queue(make_ftj: Any) -> None:
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["a100", "h100"]}]}
                ]
            }
        }
    }
    ftj = make_ftj(
        scheduling={
            "nodeSelector": {"nvidia.com/gpu.product": "A100"},
            "tolerations": tolerations,
            "affinity": affinity,
            "priorityClassName": "training",
            "queueName": "team-a",
        },
        image="registry.example/custom-trainer:1",
        imagePullPolicy="Always",
        imagePullSecrets=[{"name": "regcred"}],
    )
    job = builders.job(ftj, TRAINER_IMAGE)
    pod = job["spec"]["template"]["spec"]

    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "A100"}
    assert pod["tolerations"] == tolerations
    assert pod["affinity"] == affinity
    assert pod["priorityClassName"] == "training"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert _container(job)["image"] == "registry.example/custom-trainer:1"
    assert _container(job)["imagePullPolicy"] == "Always"
    # Kueue: queue label on the Job, created suspended for Kueue to admit.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert job["spec"]["suspend"] is True


def test_suspend_creates_the_job_suspended(make_ftj: Any) -> None:
    assert builders.job(make_ftj(suspend=True), TRAINER_IMAGE)["spec"]["suspend"] is True


def test_role_allows_only_this_finetunejob(make_ftj: Any) -> None:
    role = builders.role(make_ftj(name="run-3"))
    assert role["rules"] == [
        {
            "apiGroups": ["kubetune.dev"],
            "resources": ["finetunejobs"],
            "resourceNames": ["run-3"],
            "verbs": ["get"],
        },
        {
            "apiGroups": ["kubetune.dev"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["run-3"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = builders.role_binding(make_ftj(name="run-3", namespace="ml"))
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "run-3-trainer",
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "run-3-trainer", "namespace": "ml"}]
    account = builders.service_account(make_ftj())
    assert account is not None
    assert account["automountServiceAccountToken"] is False
    assert "annotations" not in account["metadata"]


def test_job_patch_aligns_only_editable_fields(make_ftj: Any) -> None:
    ftj = make_ftj()
    job = builders.job(ftj, TRAINER_IMAGE)
    assert builders.job_patch(ftj, job) is None

    suspended = make_ftj(suspend=True, lifecycle={"backoffLimit": 1, "activeDeadlineSeconds": 60})
    assert builders.job_patch(suspended, job) == {
        "spec": {"suspend": True, "backoffLimit": 1, "activeDeadlineSeconds": 60}
    }
    # Removing a limit clears it on the Job (null in a merge patch).
    limited_job = builders.job(make_ftj(lifecycle={"ttlSecondsAfterFinished": 30}), TRAINER_IMAGE)
    assert builders.job_patch(ftj, limited_job) == {"spec": {"ttlSecondsAfterFinished": None}}


def test_job_patch_leaves_a_queued_job_to_kueue(make_ftj: Any) -> None:
    ftj = make_ftj(scheduling={"queueName": "team-a"})
    admitted = builders.job(ftj, TRAINER_IMAGE)
    admitted["spec"]["suspend"] = False  # Kueue admitted it
    assert builders.job_patch(ftj, admitted) is None
    # Kueue owns spec.suspend (it would undo it): suspending goes through the Workload.
    suspended = make_ftj(scheduling={"queueName": "team-a"}, suspend=True)
    assert builders.job_patch(suspended, admitted) is None
    workload = {"spec": {"active": True, "queueName": "team-a"}}
    assert builders.workload_patch(builders.spec_of(suspended), workload) == {"spec": {"active": False}}
    assert builders.workload_patch(builders.spec_of(ftj), workload) is None
    assert builders.workload_patch(builders.spec_of(ftj), {"spec": {"active": False}}) == {
        "spec": {"active": True}
    }


def test_example_manifest_renders(crd: Any, make_ftj: Any) -> None:
    example = yaml.safe_load(EXAMPLE_PATH.read_text())
    assert example["kind"] == "FineTuneJob"
    ftj = make_ftj(name=example["metadata"]["name"], **example["spec"])
    objects = builders.children(ftj, TRAINER_IMAGE)
    config = json.loads(objects[0]["data"]["config.json"])
    assert config["output"]["uri"] == example["spec"]["output"]["uri"]


def test_pod_runs_as_the_trainer_images_user(make_ftj: Any) -> None:
    """runAsUser must match the trainer image's USER, or its files may not be readable."""
    dockerfile = Path(__file__).resolve().parents[2] / "trainer_image" / "Dockerfile"
    users = [line.split()[1] for line in dockerfile.read_text().splitlines() if line.startswith("USER ")]
    assert users, "the trainer Dockerfile sets no USER"
    uid, _, gid = users[-1].partition(":")
    security = builders.job(make_ftj(), TRAINER_IMAGE)["spec"]["template"]["spec"]["securityContext"]
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid or uid))


# -- spec.tracking ---------------------------------------------------------------------------------
MLFLOW = {
    "trackingUri": "https://mlflow.example:5443/team",
    "experimentName": "llama",
    "tags": {"team": "nlp"},
}


@pytest.mark.parametrize(
    ("secret_ref", "items", "kind"),
    [
        ({"name": "mlflow-token", "tokenKey": "api-token"}, [{"key": "api-token", "path": "token"}], "token"),
        (
            {"name": "mlflow-basic", "usernameKey": "user", "passwordKey": "pass"},
            [{"key": "user", "path": "username"}, {"key": "pass", "path": "password"}],
            "basic",
        ),
    ],
)
def test_mlflow_credentials_reach_the_trainer_only_as_files(
    make_ftj: Any, secret_ref: Obj, items: list[Obj], kind: str
) -> None:
    """Like the storage Secret: an optional read-only volume at /var/run/secrets/kubetune/mlflow;
    the config names which kind of credentials to expect, never the Secret or a value."""
    ftj = make_ftj(tracking={"mlflow": {**MLFLOW, "credentialsSecretRef": secret_ref}})
    job = builders.job(ftj, TRAINER_IMAGE)
    pod = job["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m for m in _container(job)["volumeMounts"]}

    assert volumes["mlflow-credentials"]["secret"] == {
        "secretName": secret_ref["name"],
        "items": items,
        "defaultMode": 0o440,
        "optional": True,
    }
    assert mounts["mlflow-credentials"] == {
        "name": "mlflow-credentials",
        "mountPath": "/var/run/secrets/kubetune/mlflow",
        "readOnly": True,
    }
    env = _env(job)
    assert not [name for name in env if name.startswith("MLFLOW")]
    assert not any("secretKeyRef" in json.dumps(e) for e in env.values())

    text = builders.config_map(ftj)["data"]["config.json"]
    assert secret_ref["name"] not in text
    assert "credentialsSecretRef" not in text
    config = TrainerConfig.model_validate_json(text)
    assert config.secret_files.mlflow_credentials == kind
    assert config.tracking.mlflow is not None
    assert config.tracking.mlflow.tracking_uri == MLFLOW["trackingUri"]
    assert config.tracking.mlflow.tags == {"team": "nlp"}
    # The run is tagged with the FineTuneJob's identity.
    assert (config.reporting.name, config.reporting.uid) == ("demo", ftj["metadata"]["uid"])


def test_without_mlflow_the_config_stays_as_before(make_ftj: Any) -> None:
    """No uid and no tracking keys: a config without tracking reads in an older trainer."""
    text = builders.config_map(make_ftj())["data"]["config.json"]
    raw = json.loads(text)
    assert "tracking" not in raw
    assert "uid" not in raw["reporting"]
    assert "mlflowCredentials" not in json.dumps(raw)
    tb = json.loads(builders.config_map(make_ftj(tracking={"tensorboard": True}))["data"]["config.json"])
    assert tb["tracking"] == {"tensorboard": True}
    assert "uid" not in tb["reporting"]


@pytest.mark.parametrize(
    ("uri", "port"),
    [
        ("https://mlflow.example:5443/team", 5443),
        ("http://mlflow.ml.svc", 80),
        ("https://mlflow.example", 443),
    ],
)
def test_network_policy_lets_out_the_tracking_servers_port(make_ftj: Any, uri: str, port: int) -> None:
    egress = {"dns": [{"ports": [{"protocol": "UDP", "port": 53}]}]}
    plain = builders.network_policy(make_ftj(), egress)
    assert plain["spec"]["egress"] == [{"ports": [{"protocol": "UDP", "port": 53}]}]
    tracked = builders.network_policy(make_ftj(tracking={"mlflow": {"trackingUri": uri}}), egress)
    assert tracked["spec"]["egress"] == [
        {"ports": [{"protocol": "UDP", "port": 53}]},
        {"ports": [{"protocol": "TCP", "port": port}]},
    ]
