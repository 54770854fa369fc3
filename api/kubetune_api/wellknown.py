"""Paths, environment variables and object-store names that the operator's pod spec and the
trainer agree on (and that readers of a result, such as the SDK, rely on)."""

from __future__ import annotations

from typing import Final

# -- the trainer pod ---------------------------------------------------------------------------
#: Where the rendered trainer config is mounted, and its key in the per-job ConfigMap.
CONFIG_DIR: Final = "/etc/kubetune"
CONFIG_KEY: Final = "config.json"
CONFIG_PATH: Final = f"{CONFIG_DIR}/{CONFIG_KEY}"
#: Where the trainer writes its final summary; Kubernetes keeps at most 4096 bytes of it.
TERMINATION_MESSAGE_PATH: Final = "/dev/termination-log"
TERMINATION_MESSAGE_LIMIT: Final = 4096
#: Writable scratch (an emptyDir): the root filesystem is read-only. The work dir lives under it.
SCRATCH_DIR: Final = "/tmp"
WORK_DIR: Final = f"{SCRATCH_DIR}/kubetune"
#: Where ``spec.model.cache``'s PersistentVolumeClaim is mounted (the trainer config's modelCacheDir).
MODEL_CACHE_DIR: Final = "/var/cache/kubetune/models"
#: UID/GID of the trainer image's non-root user (USER 65532:65532 in trainer_image/Dockerfile).
TRAINER_UID: Final = 65532
#: The trainer pod's container name (the operator's podFailurePolicy and status, the CLI's logs).
TRAINER_CONTAINER: Final = "trainer"

#: The FineTuneJob the trainer reports to (set by the operator on the trainer container).
ENV_JOB_NAME: Final = "KUBETUNE_JOB_NAME"
ENV_JOB_NAMESPACE: Final = "KUBETUNE_JOB_NAMESPACE"
#: Secrets reach the trainer as files in read-only Secret volumes, never as environment variables
#: (which every child process inherits and crash reports and /proc/PID/environ show); the kubelet
#: also refreshes the files when the Secret changes.
SECRETS_DIR: Final = "/var/run/secrets/kubetune"
#: ``spec.storage.credentialsSecretRef``'s keys, under fixed names.
STORAGE_CREDENTIALS_DIR: Final = f"{SECRETS_DIR}/storage"
ACCESS_KEY_ID_FILE: Final = "access-key-id"
SECRET_ACCESS_KEY_FILE: Final = "secret-access-key"  # noqa: S105 - file names, not secrets
SESSION_TOKEN_FILE: Final = "session-token"  # noqa: S105
#: ``spec.model.tokenSecretRef``'s key; huggingface_hub reads the file named by $HF_TOKEN_PATH.
HUB_TOKEN_DIR: Final = f"{SECRETS_DIR}/hub"
HUB_TOKEN_FILE: Final = "token"  # noqa: S105
ENV_HUB_TOKEN_PATH: Final = "HF_TOKEN_PATH"  # noqa: S105
#: ``spec.tracking.mlflow.credentialsSecretRef``'s keys: a token, or a username and a password.
MLFLOW_CREDENTIALS_DIR: Final = f"{SECRETS_DIR}/mlflow"
MLFLOW_TOKEN_FILE: Final = "token"  # noqa: S105
MLFLOW_USERNAME_FILE: Final = "username"
MLFLOW_PASSWORD_FILE: Final = "password"  # noqa: S105

# -- the output prefix (spec.output.uri) -------------------------------------------------------
#: ``checkpoints/step-N/`` folders; one counts only once its marker exists.
CHECKPOINTS_DIR: Final = "checkpoints"
CHECKPOINT_MARKER: Final = "_COMPLETE"
#: Written last: every other file with its size and sha256. A result exists once this does.
MANIFEST: Final = "manifest.json"
MANIFEST_VERSION: Final = 1
METRICS: Final = "metrics.json"
RESOLVED_CONFIG: Final = "trainer_config.json"
MODEL_CARD: Final = "README.md"
MERGED_DIR: Final = "merged"
#: ``spec.tracking.tensorboard``: the event files, uploaded with each checkpoint and the result.
TENSORBOARD_DIR: Final = "tensorboard"
#: ``spec.tracking.mlflow``: the MLflow run's id, so that a resumed pod logs to the same run.
MLFLOW_RUN_FILE: Final = "mlflow-run.json"
#: A probe object the trainer writes and deletes before training, to prove the prefix is writable.
WRITE_PROBE_PREFIX: Final = ".kubetune-write-probe-"
