"""Experiment tracking (``tracking``): TensorBoard event files under the output prefix, an MLflow run.

transformers' own integrations do the per-step work: :class:`TensorBoardCallback` (with a
tensorboardX writer: the image has no ``tensorboard``) writes every value the Trainer logs by
step, and :class:`MLflowCallback` (configured by ``MLFLOW_*`` variables set in this process only)
logs the resolved ``SFTConfig`` and model config as params and every logged value as a metric.
kubetune passes them as callbacks rather than through ``report_to``, which would build them
itself, with TensorBoard's writer from ``torch.utils.tensorboard`` and no way to survive a
tracking server that is down. What kubetune adds itself, and why:

- The MLflow run's life: it is started here before the data is read (so a bad dataset shows as a
  FAILED run), named and tagged from the FineTuneJob, and its id is kept at
  ``<output>/mlflow-run.json``, so a pod that resumes from a checkpoint reopens the same run
  instead of starting another. It ends FINISHED only after the result is published (with the
  output URI as a tag and the final metrics), FAILED on an error, KILLED on SIGTERM (the next pod
  reopens it). MLflowCallback would end the run when training ends, before the result exists,
  and never as FAILED.
- Best effort: the tracking server is never a reason to fail training. Every MLflow call here
  and in the callback is guarded: the first failure is logged and turns MLflow off for the run.
  mlflow's HTTP retries are bounded (a few seconds, not its default of minutes).
- The event files are uploaded to ``<output>/tensorboard/`` after each checkpoint and before
  the result's manifest.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from kubetune_api import wellknown
from kubetune_api.spec import MlflowSpec
from kubetune_api.trainer import TrainerConfig

from .storage import ObjectStore, failure_types, join_uri

log = logging.getLogger(__name__)

#: mlflow's HTTP client, bounded: its defaults (7 retries, backoff factor 2, 120 s timeout) would
#: stall the run for minutes on a server that is down. A value already in the environment wins.
MLFLOW_HTTP_ENV: Final = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "15",
}
#: The config sections logged as ``kubetune.*`` params (the Trainer's own arguments come from
#: MLflowCallback under their transformers names).
PARAM_SECTIONS: Final = (
    "model",
    "dataset",
    "method",
    "quantization",
    "lora",
    "training",
    "output",
    "distributed",
)
#: metrics.json values logged as ``final.*`` metrics when the run is published.
FINAL_METRICS: Final = (
    "trainLoss",
    "evalLoss",
    "tokensPerSecond",
    "trainRuntimeSeconds",
    "totalRuntimeSeconds",
    "globalStep",
    "paddingWaste",
)
#: MLflow's run statuses kubetune ends a run with.
EndStatus = Literal["FINISHED", "FAILED", "KILLED"]

T = TypeVar("T")


def credentials_env(kind: str | None, directory: Path) -> dict[str, str]:
    """The ``MLFLOW_TRACKING_*`` variables from the mounted Secret's files (preflight checked them)."""
    if kind is None:
        return {}
    files = (
        {"MLFLOW_TRACKING_TOKEN": wellknown.MLFLOW_TOKEN_FILE}
        if kind == "token"
        else {
            "MLFLOW_TRACKING_USERNAME": wellknown.MLFLOW_USERNAME_FILE,
            "MLFLOW_TRACKING_PASSWORD": wellknown.MLFLOW_PASSWORD_FILE,
        }
    )
    return {var: (directory / name).read_text(encoding="utf-8").strip() for var, name in files.items()}


def flat_params(cfg: TrainerConfig, identity: Mapping[str, str]) -> dict[str, str]:
    """What the run trains, as ``kubetune.<section>.<field>`` params, plus the FineTuneJob."""
    dumped = cfg.model_dump(mode="json", by_alias=True, include=set(PARAM_SECTIONS), exclude_none=True)
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            out[prefix] = json.dumps(value) if isinstance(value, list) else str(value)

    walk("kubetune", dumped)
    out.update({f"kubetune.job.{key}": value for key, value in identity.items()})
    out["kubetune.fingerprint"] = cfg.fingerprint()
    return out


def job_identity(cfg: TrainerConfig) -> dict[str, str]:
    """The FineTuneJob's name, namespace and uid, as far as the config (or the pod's env) says."""
    found = {
        "name": cfg.reporting.name or os.environ.get(wellknown.ENV_JOB_NAME),
        "namespace": cfg.reporting.namespace or os.environ.get(wellknown.ENV_JOB_NAMESPACE),
        "uid": cfg.reporting.uid,
    }
    return {key: value for key, value in found.items() if value}


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class Tracker:
    """One run's tracking, on the main process (elsewhere it does nothing)."""

    def __init__(self, cfg: TrainerConfig, store: ObjectStore, work_dir: Path, is_main: bool) -> None:
        self.cfg, self.store, self.is_main = cfg, store, is_main
        tracking = cfg.tracking
        self.tensorboard_dir = work_dir / wellknown.TENSORBOARD_DIR if tracking.tensorboard else None
        self.mlflow_spec: MlflowSpec | None = tracking.mlflow if is_main else None
        #: The MLflow run's id while MLflow works; None when off or after a failure.
        self.run_id: str | None = None
        self.resumed = False
        self.mlflow_callback: Any = None

    # -- MLflow ------------------------------------------------------------------------------------
    def guard(self, what: str, call: Callable[[], T]) -> T | None:
        """Run an MLflow call; a failure is logged once and turns MLflow off for this run."""
        if self.run_id is None and what != "start":
            return None
        try:
            return call()
        except Exception as exc:  # whatever the server or the client raises: training goes on
            spec = self.mlflow_spec
            where = spec.tracking_uri if spec is not None else "?"
            log.warning(
                "tracking: MLflow at %s failed to %s (%s); training goes on without MLflow",
                where,
                what,
                _brief(exc),
            )
            self.run_id = None
            if self.mlflow_callback is not None:
                self.mlflow_callback.kubetune_off = True
            return None

    def start(self) -> None:
        """Open the MLflow run (the one a previous pod of this job started, if any)."""
        if self.tensorboard_dir is not None and self.is_main:
            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            os.environ["TENSORBOARD_LOGGING_DIR"] = str(self.tensorboard_dir)
        if self.mlflow_spec is None:
            return
        run_id = self.guard("start", self._start_mlflow)
        if run_id is not None:
            self.run_id = run_id
            log.info(
                "tracking: MLflow run %s %s at %s",
                run_id,
                "resumed" if self.resumed else "started",
                self.mlflow_spec.tracking_uri,
            )

    def _run_file(self) -> str:
        return join_uri(self.cfg.output.uri, wellknown.MLFLOW_RUN_FILE)

    def _previous_run(self, tracking_uri: str) -> str | None:
        """The run id a previous pod of this job recorded for this tracking server."""
        try:
            if not self.store.exists(self._run_file()):
                return None
            recorded = json.loads(self.store.get_bytes(self._run_file()))
        except (*failure_types(), ValueError) as exc:  # type: ignore[misc]  # a tuple of exception types
            log.warning("tracking: cannot read %s (%s); starting a new MLflow run", self._run_file(), exc)
            return None
        if not isinstance(recorded, dict) or recorded.get("trackingUri") != tracking_uri:
            return None
        run_id = recorded.get("runId")
        return run_id if isinstance(run_id, str) and run_id else None

    def _start_mlflow(self) -> str:
        spec = self.mlflow_spec
        assert spec is not None
        for key, value in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        # In this process only: the pod spec carries no credential, and nothing here logs them.
        os.environ.update(
            credentials_env(self.cfg.secret_files.mlflow_credentials, Path(wellknown.MLFLOW_CREDENTIALS_DIR))
        )
        os.environ["MLFLOW_TRACKING_URI"] = spec.tracking_uri
        import mlflow

        mlflow.set_tracking_uri(spec.tracking_uri)
        previous = self._previous_run(spec.tracking_uri)
        if previous is not None:
            run = mlflow.start_run(run_id=previous)
            self.resumed = True
            # Params cannot change in MLflow: the callback logged the Trainer's when the run began.
            os.environ["MLFLOW_MAX_LOG_PARAMS"] = "0"
            return str(run.info.run_id)
        experiment_id = None
        if spec.experiment_name is not None:
            experiment_id = mlflow.set_experiment(spec.experiment_name).experiment_id
        identity = job_identity(self.cfg)
        default_name = "/".join(identity[k] for k in ("namespace", "name") if k in identity) or None
        tags = {**(spec.tags or {}), **{f"kubetune.{key}": value for key, value in identity.items()}}
        run = mlflow.start_run(experiment_id=experiment_id, run_name=spec.run_name or default_name, tags=tags)
        mlflow.log_params(flat_params(self.cfg, identity))
        run_id = str(run.info.run_id)
        body = {"runId": run_id, "trackingUri": spec.tracking_uri, "experimentId": run.info.experiment_id}
        try:
            self.store.put_bytes(self._run_file(), json.dumps(body).encode(), content_type="application/json")
        except failure_types() as exc:
            log.warning(
                "tracking: could not record the MLflow run id (%s); a resumed pod starts a new run", exc
            )
        return run_id

    def end(self, status: EndStatus, metrics: Mapping[str, Any] | None = None) -> None:
        """End the run: FINISHED with the final metrics and the output URI, or FAILED/KILLED."""
        if self.run_id is None:
            return
        import mlflow

        run_id = self.run_id
        self.guard("flush the metrics", mlflow.flush_async_logging)
        if status == "FINISHED" and metrics is not None:
            step = int(metrics.get("globalStep") or 0)
            final = {
                f"final.{key}": float(metrics[key])
                for key in FINAL_METRICS
                if isinstance(metrics.get(key), int | float) and not isinstance(metrics.get(key), bool)
            }
            self.guard("log the final metrics", lambda: mlflow.log_metrics(final, step=step))
            self.guard("tag the output", lambda: mlflow.set_tag("kubetune.outputUri", self.cfg.output.uri))
        self.guard("end the run", lambda: mlflow.end_run(status=status))
        log.info("tracking: MLflow run %s ended %s", run_id, status)
        self.run_id = None

    # -- TensorBoard -------------------------------------------------------------------------------
    def sync_tensorboard(self) -> None:
        """Upload the event files to ``<output>/tensorboard/`` (a failure is logged; training goes on)."""
        if self.tensorboard_dir is None or not self.is_main or not self.tensorboard_dir.is_dir():
            return
        target = join_uri(self.cfg.output.uri, wellknown.TENSORBOARD_DIR)
        try:
            names = self.store.upload_folder(self.tensorboard_dir, target)
        except failure_types() as exc:
            log.warning("tracking: could not upload the TensorBoard event files to %s (%s)", target, exc)
            return
        log.info("tracking: %d TensorBoard event file(s) at %s", len(names), target)

    # -- the Trainer's callbacks -------------------------------------------------------------------
    def callbacks(self) -> list[Any]:
        """transformers' TensorBoard and MLflow callbacks, and the event files' upload at each save."""
        found: list[Any] = []
        if self.tensorboard_dir is not None and self.is_main:
            found += make_tensorboard_callbacks(self)
        if self.run_id is not None:
            self.mlflow_callback = make_mlflow_callback()
            found.append(self.mlflow_callback)
        return found


def _integrations() -> Any:
    """transformers' integration callbacks (untyped)."""
    from transformers.integrations import integration_utils

    return integration_utils


def make_tensorboard_callbacks(tracker: Tracker) -> list[Any]:
    """transformers' TensorBoardCallback writing with tensorboardX, and an upload after each save."""
    from tensorboardX import SummaryWriter
    from transformers import TrainerCallback

    class TensorBoardSync(TrainerCallback):
        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                tracker.sync_tensorboard()
            return control

    writer = SummaryWriter(logdir=str(tracker.tensorboard_dir))
    return [_integrations().TensorBoardCallback(tb_writer=writer), TensorBoardSync()]


def make_mlflow_callback() -> Any:
    """transformers' MLflowCallback, made unable to fail training: a failing hook is logged once
    and turns it off (``kubetune_off``). It logs into the run :class:`Tracker` opened, and leaves
    ending it to the Tracker (it only ends runs it started itself)."""
    from transformers import TrainerCallback

    inner = _integrations().MLflowCallback()

    class GuardedMLflowCallback(TrainerCallback):
        kubetune_off = False

        def _guarded(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.kubetune_off:
                return None
            try:
                return getattr(inner, event)(args, state, control, **kwargs)
            except Exception as exc:  # the tracking server is never a reason to fail training
                self.kubetune_off = True
                log.warning(
                    "tracking: MLflow logging failed (%s); training goes on without MLflow", _brief(exc)
                )
                return None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return self._guarded("on_train_begin", args, state, control, **kwargs)

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return self._guarded("on_log", args, state, control, **kwargs)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return self._guarded("on_save", args, state, control, **kwargs)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            return self._guarded("on_train_end", args, state, control, **kwargs)

    return GuardedMLflowCallback()
