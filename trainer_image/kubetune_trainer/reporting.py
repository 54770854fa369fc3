"""Progress to the FineTuneJob's ``status.progress``, and the final summary to the termination log.

Reporting is best effort: training never fails because the API server is
unreachable or the ServiceAccount lacks a permission; the first failure is
logged, later ones silently retried at the next interval, and the first patch that
works again is logged with the number of failed ones (an API server restart shows as
one warning and one info line).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kubetune_api import coordinates, wellknown
from kubetune_api.status import Progress, rfc3339
from kubetune_api.trainer import ReportingSpec

log = logging.getLogger(__name__)
#: The keys of status.progress (the API type's wire names).
PROGRESS_FIELDS = frozenset(info.alias or name for name, info in Progress.model_fields.items())

#: TRL's logged reward metrics -> their status.progress names (and metrics.json's: the
#: REWARD_METRICS of dpo, orpo and kto). TRL's DPO, ORPO and KTO trainers log them under the same
#: names (KTO no accuracy: its records are not pairs; its chosen and rejected are the desirable
#: and undesirable completions).
REWARD_PROGRESS: Final = {
    "rewards/accuracies": "rewardAccuracy",
    "rewards/margins": "rewardMargin",
    "rewards/chosen": "rewardChosen",
    "rewards/rejected": "rewardRejected",
}

#: Connect/read timeout of one status patch, in seconds.
PATCH_TIMEOUT_SECONDS = (3.0, 5.0)


@dataclass(frozen=True)
class JobRef:
    namespace: str
    name: str


def job_ref(spec: ReportingSpec, environ: dict[str, str] | None = None) -> JobRef | None:
    """The FineTuneJob to report to: config first, then KUBETUNE_JOB_NAME/NAMESPACE; None if unknown."""
    env = os.environ if environ is None else environ
    name = spec.name or env.get(wellknown.ENV_JOB_NAME)
    if not name:
        return None
    namespace = spec.namespace or env.get(wellknown.ENV_JOB_NAMESPACE) or _pod_namespace() or "default"
    return JobRef(namespace=namespace, name=name)


def _pod_namespace() -> str | None:
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def status_patcher(ref: JobRef) -> Callable[[dict[str, Any]], None]:
    """A function that merge-patches ``status.progress`` of ``ref``.

    Uses the pod's ServiceAccount (in-cluster), or ``$KUBECONFIG`` when set.
    """
    from kubernetes import client
    from kubernetes import config as kube_config

    loader: Any = kube_config  # its loaders are untyped
    if os.environ.get("KUBECONFIG"):
        api_client = loader.new_client_from_config(os.environ["KUBECONFIG"])
    else:
        loader.load_incluster_config()
        api_client = client.ApiClient()
    api = client.CustomObjectsApi(api_client)

    def patch(progress: dict[str, Any]) -> None:
        # Bounded: the patch runs inside the training loop, and a half-open connection to the
        # API server must cost a few seconds, never stall training.
        api.patch_namespaced_custom_object_status(
            coordinates.GROUP,
            coordinates.VERSION,
            ref.namespace,
            coordinates.PLURAL,
            ref.name,
            {"status": {"progress": progress}},
            _request_timeout=PATCH_TIMEOUT_SECONDS,
        )

    return patch


def safe_patcher(ref: JobRef) -> Callable[[dict[str, Any]], None]:
    """The status patcher, or a sender that always fails (logged once) if no client can be set up."""
    try:
        return status_patcher(ref)
    except Exception as exc:
        reason = str(exc)

        def unavailable(_progress: dict[str, Any]) -> None:
            raise RuntimeError(f"no Kubernetes client: {reason}")

        return unavailable


@dataclass
class ProgressReporter:
    """Throttled, failure-tolerant progress reporting."""

    send: Callable[[dict[str, Any]], None]
    interval: float
    clock: Callable[[], float] = time.monotonic
    last_sent: float | None = None
    failed_once: bool = False
    #: Failed patches since the last one that worked.
    failures: int = 0
    latest: dict[str, Any] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def update(self, progress: dict[str, Any], *, force: bool = False) -> bool:
        """Merge ``progress`` into the latest state; send it if due. Returns True if sent."""
        unknown = set(progress) - PROGRESS_FIELDS - self.dropped
        if unknown:  # a field status.progress does not have: dropped (once logged), the rest is sent
            log.warning("progress: status.progress has no field %s; not reported", ", ".join(sorted(unknown)))
            self.dropped |= unknown
        self.latest.update({k: v for k, v in progress.items() if v is not None and k in PROGRESS_FIELDS})
        now = self.clock()
        if not force and self.last_sent is not None and now - self.last_sent < self.interval:
            return False
        self.last_sent = now
        try:
            body = Progress.model_validate({**self.latest, "updateTime": rfc3339()})
            self.send(body.model_dump(mode="json", by_alias=True, exclude_none=True))
        except Exception as exc:  # reporting must never fail training
            self.failures += 1
            if not self.failed_once:
                log.warning("progress: could not patch the FineTuneJob status (%s); training continues", exc)
                self.failed_once = True
            return False
        if self.failures:
            log.info(
                "progress: the FineTuneJob status is patched again, after %d failed attempt(s)", self.failures
            )
            self.failures, self.failed_once = 0, False
        return True


@dataclass
class TrainingRates:
    """Tokens/s and ETA over the time spent in optimizer steps only.

    Evaluation and checkpoint uploads happen between steps; counting them would make an early
    evaluation or a large upload look like slow training, and skew the ETA.
    """

    clock: Callable[[], float] = time.monotonic
    start_step: int = 0
    start_tokens: int = 0
    training_seconds: float = 0.0
    _step_started: float | None = None

    def begin(self, step: int, tokens: int) -> None:
        self.start_step, self.start_tokens, self.training_seconds = step, tokens, 0.0

    def step_begin(self) -> None:
        self._step_started = self.clock()

    def step_end(self) -> None:
        if self._step_started is not None:
            self.training_seconds += self.clock() - self._step_started
            self._step_started = None

    def rates(self, step: int, max_steps: int, tokens: int) -> dict[str, Any]:
        steps, seconds = step - self.start_step, self.training_seconds
        if steps <= 0 or seconds <= 0:
            return {"tokensPerSecond": None, "etaSeconds": None}
        new_tokens = tokens - self.start_tokens
        return {
            "tokensPerSecond": round(new_tokens / seconds, 2) if new_tokens else None,
            "etaSeconds": round((max_steps - step) * seconds / steps),
        }


#: A classifier's logged evaluation metrics (classification.EVAL_METRICS) -> their status.progress names.
CLASSIFICATION_PROGRESS: Final = {"eval_accuracy": "evalAccuracy", "eval_f1": "evalF1"}


def evaluation_progress(step: int, metrics: dict[str, Any]) -> dict[str, Any]:
    """The progress fields of one evaluation: the eval loss, the eval reward accuracy (objectives
    dpo, orpo and reward; KTO logs none), a classifier's accuracy and macro F1."""
    accuracy = _rounded(metrics.get("eval_rewards/accuracies"), 4)  # dpo, orpo, reward (not kto)
    scores = {name: _rounded(metrics.get(key), 4) for key, name in CLASSIFICATION_PROGRESS.items()}
    return {
        "step": step,
        "evalLoss": _rounded(metrics["eval_loss"], 4),
        **({"evalRewardAccuracy": accuracy} if accuracy is not None else {}),
        **{name: value for name, value in scores.items() if value is not None},
    }


def make_progress_callback(reporter: ProgressReporter, last_checkpoint: Callable[[], str | None]) -> Any:
    """A TrainerCallback feeding ``reporter`` from the Trainer's logs (rank 0 reports)."""
    from transformers import TrainerCallback

    class ProgressCallback(TrainerCallback):
        def __init__(self) -> None:
            self.timing = TrainingRates()

        def _rates(self, state: Any) -> dict[str, Any]:
            return self.timing.rates(state.global_step, state.max_steps, state.num_input_tokens_seen or 0)

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.timing.begin(state.global_step, state.num_input_tokens_seen or 0)
            if state.is_world_process_zero:
                reporter.update({"step": state.global_step, "totalSteps": state.max_steps}, force=True)
            return control

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.timing.step_begin()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.timing.step_end()
            return control

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                reporter.update(
                    {
                        **progress_of(state, logs or {}),
                        "lastCheckpoint": last_checkpoint(),
                        **self._rates(state),
                    }
                )
            return control

        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any) -> Any:
            # Forced: the final evaluation comes right after the last log and would be rate-limited away.
            if state.is_world_process_zero and metrics and "eval_loss" in metrics:
                reporter.update(evaluation_progress(state.global_step, metrics), force=True)
            return control

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                reporter.update({"step": state.global_step, "lastCheckpoint": last_checkpoint()}, force=True)
            return control

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if state.is_world_process_zero:
                reporter.update({"step": state.global_step, **self._rates(state)}, force=True)
            return control

    return ProgressCallback()


def progress_of(state: Any, logs: dict[str, Any]) -> dict[str, Any]:
    """status.progress fields from the Trainer's state and one log entry."""
    return {
        "step": state.global_step,
        "totalSteps": state.max_steps,
        "epoch": round(float(state.epoch or 0.0), 4),
        # Rounded: status is read by people (the Loss printer column), not to resume.
        "loss": _rounded(logs.get("loss"), 4),
        "evalLoss": _rounded(logs.get("eval_loss"), 4),
        "learningRate": _significant(logs.get("learning_rate"), 4),
        # objectives dpo, orpo and kto (TRL logs them; absent for sft, so not reported)
        **{name: _rounded(logs.get(trl_name), 4) for trl_name, name in REWARD_PROGRESS.items()},
    }


def _rounded(value: Any, digits: int) -> float | None:
    return None if value is None else round(float(value), digits)


def _significant(value: Any, digits: int) -> float | None:
    return None if value is None else float(f"{float(value):.{digits}g}")


def write_termination_message(path: str, summary: dict[str, Any]) -> None:
    """Write ``summary`` as compact JSON, dropping detail until it fits Kubernetes' 4 KiB limit."""
    data = dict(summary)
    text = json.dumps(data, separators=(",", ":"), default=str)
    for key in ("lossHistory", "dataStats", "error"):
        if len(text.encode()) < wellknown.TERMINATION_MESSAGE_LIMIT:
            break
        if key in data:
            if key == "error":
                data[key] = str(data[key])[:1000]
            else:
                data.pop(key)
            text = json.dumps(data, separators=(",", ":"), default=str)
    encoded = text.encode()[: wellknown.TERMINATION_MESSAGE_LIMIT - 1]
    try:
        Path(path).write_bytes(encoded)
    except OSError as exc:
        log.warning("could not write the termination message to %s: %s", path, exc)
