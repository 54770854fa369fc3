"""Checks that run before any download or training step, so a mistake costs seconds, not GPU hours.

- The output prefix takes a write (and a delete): a missing bucket or missing rights fail now
  with :class:`~.errors.OutputNotWritableError`, not after training when the result is uploaded.
- The model and data fit the scratch disk (``resources.scratch``, else the disk's free space):
  else :class:`~.errors.ScratchTooSmallError` says how much to ask for, instead of the kubelet
  evicting the pod mid-download.

An unreachable endpoint is :class:`~.errors.StorageUnreachableError` (exit 48), which the Job
retries: a server that is down may come back.
"""

from __future__ import annotations

import logging
import math
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from kubetune_api import wellknown
from kubetune_api.trainer import SecretFilesSpec, TrainerConfig

from .errors import (
    ObjectAccessError,
    OutputNotWritableError,
    ScratchTooSmallError,
    SecretMissingError,
    StorageUnreachableError,
)
from .storage import ObjectStore, join_uri

log = logging.getLogger(__name__)

#: Room beyond the inputs: tokenizer caches, checkpoints of the adapter and optimizer, the result.
HEADROOM = 0.10
_GI = 1024**3


@dataclass(frozen=True)
class ScratchNeed:
    """What the run downloads to scratch, in bytes."""

    model: int
    data: int
    merged: int  # a merged copy of the model, when output.mergeAdapter

    @property
    def total(self) -> int:
        return math.ceil((self.model + self.data + self.merged) * (1 + HEADROOM))


def check_secret_files(
    mounted: SecretFilesSpec,
    storage_dir: Path = Path(wellknown.STORAGE_CREDENTIALS_DIR),
    hub_dir: Path = Path(wellknown.HUB_TOKEN_DIR),
    mlflow_dir: Path = Path(wellknown.MLFLOW_CREDENTIALS_DIR),
) -> None:
    """The operator mounts the Secrets the spec names as optional volumes (a missing one would
    leave the pod in ContainerCreating, holding its GPU): mounted without its files means the
    Secret, or a key of it, does not exist."""
    missing = []
    if mounted.storage_credentials:
        wanted = (wellknown.ACCESS_KEY_ID_FILE, wellknown.SECRET_ACCESS_KEY_FILE)
        absent = [name.replace("-", " ") for name in wanted if not (storage_dir / name).is_file()]
        if absent:
            missing.append(
                f"storage.credentialsSecretRef: the Secret, or its key for {' and '.join(absent)} "
                "(accessKeyIdKey, secretAccessKeyKey), does not exist in the FineTuneJob's namespace"
            )
    if mounted.hub_token and not (hub_dir / wellknown.HUB_TOKEN_FILE).is_file():
        missing.append(
            "model.tokenSecretRef: the Secret, or its key, does not exist in the FineTuneJob's namespace"
        )
    if mounted.mlflow_credentials is not None:
        expected: tuple[str, ...] = (
            (wellknown.MLFLOW_TOKEN_FILE,)
            if mounted.mlflow_credentials == "token"
            else (wellknown.MLFLOW_USERNAME_FILE, wellknown.MLFLOW_PASSWORD_FILE)
        )
        absent = [name for name in expected if not (mlflow_dir / name).is_file()]
        if absent:
            keys = "tokenKey" if mounted.mlflow_credentials == "token" else "usernameKey, passwordKey"
            missing.append(
                f"tracking.mlflow.credentialsSecretRef: the Secret, or its key for {' and '.join(absent)} "
                f"({keys}), does not exist in the FineTuneJob's namespace"
            )
    if missing:
        raise SecretMissingError(
            "; ".join(missing) + ": create it (kubectl create secret generic ...); the Job retries "
            "(lifecycle.backoffLimit), and the next attempt reads it"
        )


def check_output_writable(store: ObjectStore, output_uri: str, endpoint: str | None = None) -> None:
    """Write and delete a probe object under the output prefix (the first request of a run)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError

    probe = join_uri(output_uri, f"{wellknown.WRITE_PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        store.put_bytes(probe, b"kubetune write probe\n", content_type="text/plain")
        store.delete(probe)
    except ObjectAccessError as err:
        raise OutputNotWritableError(output_uri, err.reason) from err
    except BotoConnectionError as err:  # refused, timed out, no such host: after botocore's retries
        raise StorageUnreachableError(endpoint, str(err)) from err


def scratch_need(cfg: TrainerConfig, store: ObjectStore, work_dir: Path) -> ScratchNeed:
    """The sizes of what :mod:`.dataset` and :mod:`.modeling` will download (none for a hub model,
    which the hub cache holds in the same scratch disk but whose size is not known in advance)."""
    data = store.size(cfg.dataset.train)
    if cfg.dataset.validation is not None:
        data += store.size(cfg.dataset.validation)
    listed = sum(size for _, size in store.list_keys(cfg.model.source)) if cfg.model.is_s3 else 0
    # The model goes to the model cache's volume, or is already in scratch (a restarted container).
    in_scratch = cfg.model_cache_dir is None and not (work_dir / "base-model" / "config.json").exists()
    model = listed if in_scratch else 0
    return ScratchNeed(model=model, data=data, merged=listed if cfg.output.merge_adapter else 0)


def scratch_free(cfg: TrainerConfig, work_dir: Path) -> int:
    """Bytes the run may still write to scratch: the disk's free space, capped by the volume's limit."""
    free = shutil.disk_usage(work_dir).free
    if cfg.scratch_bytes is None:
        return free
    used = sum(p.stat().st_size for p in work_dir.rglob("*") if p.is_file())
    return min(free, max(cfg.scratch_bytes - used, 0))


def _gib(n: int) -> str:
    return f"{n / _GI:.1f} GiB"


def check_scratch(cfg: TrainerConfig, store: ObjectStore, work_dir: Path) -> ScratchNeed:
    need = scratch_need(cfg, store, work_dir)
    free = scratch_free(cfg, work_dir)
    log.info("scratch: needs about %s, %s free", _gib(need.total), _gib(free))
    if need.total <= free:
        return need
    parts = [f"model {_gib(need.model)}", f"data {_gib(need.data)}"]
    if need.merged:
        parts.append(f"merged model {_gib(need.merged)}")
    limit = "" if cfg.scratch_bytes is None else f", resources.scratch {_gib(cfg.scratch_bytes)}"
    wanted = max(math.ceil(need.total / _GI), 1)
    raise ScratchTooSmallError(
        f"the run needs about {_gib(need.total)} of scratch disk ({', '.join(parts)}, "
        f"{HEADROOM:.0%} headroom) but has {_gib(free)} free{limit}: set spec.resources.scratch "
        f"to at least {wanted}Gi (on nodes with that much disk)"
    )
