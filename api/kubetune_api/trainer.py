"""The trainer's config: the spec sections the trainer needs, plus what the operator fills in.

The operator renders it from a FineTuneJob (:meth:`TrainerConfig.from_spec`) as JSON into the
per-job ConfigMap; the trainer parses the same model. The sections are the spec's own models,
so a spec field reaches the trainer without being declared twice.

The operator and the trainer image can be of different versions (``spec.image`` pins an older
trainer; a chart upgrade replaces the operator first). The rule that keeps them working together:

* A field's default means what configs without the field meant, and a released default never
  changes (the Kubernetes API convention). :meth:`TrainerConfig.to_json` writes only the fields
  that differ from their defaults, plus the writing operator's :data:`KUBETUNE_VERSION`; so a
  newer operator's config reads in an older trainer unless the job uses a newer feature, and an
  older operator's config reads in a newer trainer (its defaults fill in what is missing).
* A trainer refuses a field it does not know (``extra="forbid"``): ignoring it could train
  something other than what was asked. The trainer names the field and both versions.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import Field

from . import wellknown
from .base import ApiModel
from .spec import (
    EVAL_NEEDS_DATA,
    METHOD_RULES,
    OBJECTIVE_RULES,
    ClassificationSpec,
    DatasetSpec,
    DistributedSpec,
    DpoSpec,
    EvaluationSpec,
    FineTuneJobSpec,
    FreezeSpec,
    KtoSpec,
    LoraSpec,
    Method,
    ModelSpec,
    Objective,
    OrpoSpec,
    OutputSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    QuantizationSpec,
    StorageSpec,
    Task,
    TrackingSpec,
    TrainingSpec,
    quantity_value,
)

#: The version of this contract, so of the operator that writes a config and of the trainer that
#: reads it; recorded in every config the operator writes (``kubetuneVersion``). A constant rather
#: than the distribution's metadata: the images copy the packages in without installing the
#: distribution. It must equal ``project.version`` in pyproject.toml (a test checks).
KUBETUNE_VERSION: Final = "0.1.0"


class SecretFilesSpec(ApiModel):
    """Which Secrets the operator mounted as files (:mod:`kubetune_api.wellknown`); the config
    names no Secret. A mounted one without its files is a missing Secret or key."""

    storage_credentials: bool = False
    """storage.credentialsSecretRef is mounted at STORAGE_CREDENTIALS_DIR."""
    hub_token: bool = False
    """model.tokenSecretRef is mounted at HUB_TOKEN_DIR."""
    mlflow_credentials: Literal["token", "basic"] | None = None
    """tracking.mlflow.credentialsSecretRef is mounted at MLFLOW_CREDENTIALS_DIR: a token, or a
    username and a password."""


class ReportingSpec(ApiModel):
    """Where the trainer reports progress: its own FineTuneJob's status."""

    namespace: str | None = None
    """Namespace of the FineTuneJob (else $KUBETUNE_JOB_NAMESPACE, else the pod's namespace)."""
    name: str | None = None
    """Name of the FineTuneJob (else $KUBETUNE_JOB_NAME); unknown turns reporting off."""
    interval_seconds: float = Field(default=5.0, ge=0.5)
    """Least time between two progress patches."""
    termination_message_path: str = wellknown.TERMINATION_MESSAGE_PATH
    """Where the final summary goes (the container's terminationMessagePath)."""
    uid: str | None = Field(default=None, min_length=1, max_length=64)
    """The FineTuneJob's uid; written only with tracking.mlflow (a tag of the run), so configs
    without tracking stay readable by older trainers."""


#: What determines a run's result; connection and reporting settings are left out, so a
#: restarted pod with new credentials (or Secret names) still resumes. Fields left at their
#: defaults are left out too, so a new, defaulted API field does not change the fingerprint.
_FINGERPRINT_FIELDS: dict[str, Any] = {
    "model": {"source": True, "revision": True, "trust_remote_code": True},
    "dataset": True,
    "task": True,
    "objective": True,
    "dpo": True,
    "orpo": True,
    "kto": True,
    "classification": True,
    "method": True,
    "freeze": True,
    "prompt_tuning": True,
    "prefix_tuning": True,
    "evaluation": True,
    "quantization": True,
    "lora": True,
    "training": True,
    "output": True,
    "gpus": True,
    "distributed": True,
}
# ``processes`` is left out: a checkpoint resumes with another number of processes (the Trainer
# restores the global step; docs/trainer.md, "Multi-process and FSDP"). ``distributed`` is in: an
# FSDP checkpoint's optimizer state is not one a DDP run can load, nor the reverse.


class TrainerConfig(ApiModel):
    """Everything the trainer needs, rendered by the operator from a FineTuneJob."""

    cel_rules = (*METHOD_RULES, EVAL_NEEDS_DATA, *OBJECTIVE_RULES)

    kubetune_version: str | None = Field(default=None, min_length=1, max_length=64)
    """The version of the operator that wrote the config (its :data:`KUBETUNE_VERSION`); unset in
    a config written by hand. Not part of the fingerprint."""
    model: ModelSpec
    dataset: DatasetSpec
    task: Task = "causal-lm"
    """spec.task: causal-lm, or sequence-classification."""
    objective: Objective = "sft"
    """spec.objective: sft, dpo, orpo, kto or reward."""
    dpo: DpoSpec | None = None
    """spec.dpo (objective dpo; unset: the defaults)."""
    orpo: OrpoSpec | None = None
    """spec.orpo (objective orpo; unset: the defaults)."""
    kto: KtoSpec | None = None
    """spec.kto (objective kto; unset: the defaults)."""
    classification: ClassificationSpec | None = None
    """spec.classification (task sequence-classification; unset: labels from the data)."""
    method: Method = "qlora"
    freeze: FreezeSpec | None = None
    """spec.freeze (method freeze)."""
    prompt_tuning: PromptTuningSpec | None = None
    """spec.promptTuning (method prompt-tuning; unset: the defaults)."""
    prefix_tuning: PrefixTuningSpec | None = None
    """spec.prefixTuning (method prefix-tuning; unset: the defaults)."""
    evaluation: EvaluationSpec = EvaluationSpec()
    """spec.evaluation: the sample generations after training."""
    quantization: QuantizationSpec = QuantizationSpec()
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    storage: StorageSpec = StorageSpec()
    output: OutputSpec
    tracking: TrackingSpec = TrackingSpec()
    """TensorBoard and MLflow (spec.tracking, without the Secret reference: the pod has the
    credentials as files). Not part of the fingerprint: a run resumes whatever it reports to."""
    reporting: ReportingSpec = ReportingSpec()
    gpus: int = Field(default=0, ge=0, le=64)
    """GPUs requested; the trainer fails if the launched world size differs. 0 = CPU."""
    processes: int | None = Field(default=None, ge=1, le=64)
    """Processes the operator launches (spec.resources.processes); unset: one per GPU, one on CPU.
    The trainer fails if the launched world size differs."""
    distributed: DistributedSpec = DistributedSpec()
    """ddp or fsdp (spec.distributed); the operator's launch command carries the FSDP settings, the
    trainer checks that they took effect."""
    work_dir: str = Field(default=wellknown.WORK_DIR, min_length=1)
    """Local scratch folder (an emptyDir in the pod): downloads, checkpoints before upload."""
    secret_files: SecretFilesSpec = SecretFilesSpec()
    """Which Secrets the pod has as files."""
    model_cache_dir: str | None = Field(default=None, min_length=1)
    """Where spec.model.cache's volume is mounted (wellknown.MODEL_CACHE_DIR); unset: no cache.
    Not part of the fingerprint: a run resumes with or without a cache."""
    scratch_bytes: int | None = Field(default=None, ge=0)
    """The scratch volume's size limit (spec.resources.scratch); unset: the disk's free space."""

    @classmethod
    def from_spec(cls, spec: FineTuneJobSpec, reporting: ReportingSpec) -> TrainerConfig:
        """The config for a FineTuneJob's spec: its training sections, as they are.

        Secret references are dropped: the pod gets the values as files in Secret volumes
        (:mod:`kubetune_api.wellknown`), so the config (a ConfigMap anyone with read access sees)
        names no Secret.
        """
        scratch = spec.resources.scratch
        mlflow = spec.tracking.mlflow
        creds = None if mlflow is None else mlflow.credentials_secret_ref
        tracking = spec.tracking
        if mlflow is not None:
            tracking = tracking.model_copy(
                update={"mlflow": mlflow.model_copy(update={"credentials_secret_ref": None})}
            )
        else:
            reporting = reporting.model_copy(update={"uid": None})
        return cls(
            kubetune_version=KUBETUNE_VERSION,
            model=spec.model.model_copy(update={"token_secret_ref": None}),
            dataset=spec.dataset,
            task=spec.task,
            objective=spec.objective,
            dpo=spec.dpo,
            orpo=spec.orpo,
            kto=spec.kto,
            classification=spec.classification,
            method=spec.method,
            freeze=spec.freeze,
            prompt_tuning=spec.prompt_tuning,
            prefix_tuning=spec.prefix_tuning,
            evaluation=spec.evaluation,
            quantization=spec.quantization,
            lora=spec.lora,
            training=spec.training,
            storage=spec.storage.model_copy(update={"credentials_secret_ref": None}),
            output=spec.output,
            tracking=tracking,
            reporting=reporting,
            gpus=spec.resources.gpus,
            processes=spec.resources.processes,
            distributed=spec.distributed,
            scratch_bytes=None if scratch is None else int(quantity_value(scratch)),
            model_cache_dir=None if spec.model.cache is None else wellknown.MODEL_CACHE_DIR,
            secret_files=SecretFilesSpec(
                storage_credentials=spec.storage.credentials_secret_ref is not None,
                hub_token=spec.model.token_secret_ref is not None,
                mlflow_credentials=None if creds is None else creds.kind,
            ),
        )

    def fingerprint(self) -> str:
        """sha256 of what determines the result (model, data, method, hyperparameters, output).

        Recorded in every checkpoint marker and in ``manifest.json``: a run resumes or reuses
        only what a run with the same fingerprint wrote.
        """
        identity = self.model_dump(
            mode="json", by_alias=True, include=_FINGERPRINT_FIELDS, exclude_defaults=True
        )
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        """The config as the operator writes it: only what differs from the defaults.

        So a trainer older than the operator reads it unless the job uses a field that trainer
        does not know (see the module docstring). ``exclude_defaults`` also leaves out a None
        that is the default; a None where the default is a value is written, as null: dropping
        it would make the reader apply the default instead.
        """
        return self.model_dump_json(by_alias=True, indent=2, exclude_defaults=True)

    def to_resolved_json(self) -> str:
        """Every field, defaults included: for people reading what a run used, not for a trainer
        of another version to parse (that is :meth:`to_json`)."""
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
