"""The trainer's config schema: the contract between the operator and the trainer.

The operator renders this model (as JSON, mounted from a ConfigMap) from a
FineTuneJob's spec; the trainer parses the same model. Keys are camelCase, the
same names the FineTuneJob CRD uses, so one spec field maps to one config field.

Import-light on purpose: only pydantic, no torch, so the operator can import it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

#: Exit code the trainer uses for invalid input data (bad records, missing or
#: unreadable objects). The operator's podFailurePolicy fails the Job at once on it.
EXIT_INVALID_DATA = 42
#: Exit code for an invalid config (should not happen: the API server validates first).
EXIT_INVALID_CONFIG = 43
#: Exit code when the launched world size differs from the GPUs requested.
EXIT_WORLD_SIZE_MISMATCH = 44

DatasetFormat = Literal["auto", "alpaca", "chat", "prompt_completion", "text"]
Method = Literal["qlora", "lora"]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
IntervalStrategy = Literal["no", "steps", "epoch"]
SchedulerType = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
AddressingStyle = Literal["auto", "path", "virtual"]

#: ``s3://bucket/prefix``: bucket per the S3 naming rules, prefix optional.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
_S3_URI = re.compile(S3_URI_PATTERN)


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ValueError if malformed."""
    if not _S3_URI.match(uri):
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    return bucket, key


class ModelSpec(_Model):
    """The base model: a hub id or an ``s3://`` prefix holding a saved model."""

    source: str = Field(min_length=1, description="Hub model id or s3://bucket/prefix of a saved model.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit).")
    #: Environment variable holding the hub token (the operator fills it from a Secret).
    token_env: str | None = None
    trust_remote_code: bool = False

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")


class FieldMapping(_Model):
    """Column names in the dataset for each role a format uses."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"
    text: str = "text"


class DatasetSpec(_Model):
    train: str = Field(pattern=S3_URI_PATTERN, description="s3:// URI of the training file.")
    validation: str | None = Field(default=None, pattern=S3_URI_PATTERN)
    validation_split: float = Field(default=0.0, ge=0.0, lt=0.5)
    format: DatasetFormat = "auto"
    field_mapping: FieldMapping = FieldMapping()
    #: How many failing records to list in the error before giving up.
    max_reported_errors: int = Field(default=20, ge=1, le=1000)

    @model_validator(mode="after")
    def _one_validation_source(self) -> DatasetSpec:
        if self.validation and self.validation_split > 0:
            raise ValueError("set either validation or validationSplit, not both")
        return self


class QuantizationSpec(_Model):
    bits: Literal[4, 8, 16] = 4
    quant_type: QuantType = "nf4"
    double_quant: bool = True
    compute_dtype: ComputeDtype = "auto"


class LoraSpec(_Model):
    r: int = Field(default=16, ge=1, le=1024)
    alpha: int = Field(default=32, ge=1, le=4096)
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    #: Module names, or ``["all-linear"]`` for every linear layer except the head.
    target_modules: list[str] = Field(default_factory=lambda: ["all-linear"], min_length=1)


class TrainingSpec(_Model):
    per_device_train_batch_size: int = Field(default=4, ge=1)
    per_device_eval_batch_size: int = Field(default=4, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    num_train_epochs: float = Field(default=1.0, gt=0)
    #: -1 means "train for num_train_epochs".
    max_steps: int = Field(default=-1, ge=-1)
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    precision: Precision = "auto"
    logging_steps: int = Field(default=10, ge=1)
    eval_strategy: IntervalStrategy = "no"
    eval_steps: int | None = Field(default=None, ge=1)
    save_strategy: IntervalStrategy = "steps"
    save_steps: int = Field(default=100, ge=1)
    save_total_limit: int | None = Field(default=2, ge=1)
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    warmup_steps: int = Field(default=0, ge=0)
    max_seq_length: int = Field(default=1024, ge=16)
    packing: bool = False
    lr_scheduler_type: SchedulerType = "linear"
    weight_decay: float = Field(default=0.0, ge=0.0)
    seed: int = Field(default=42, ge=0)
    gradient_checkpointing: bool | None = None  # None: on for GPUs, off on CPU

    @model_validator(mode="after")
    def _eval_needs_steps(self) -> TrainingSpec:
        if self.eval_strategy == "steps" and self.eval_steps is None:
            raise ValueError("evalStrategy 'steps' needs evalSteps")
        return self

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingSpec:
        if self.warmup_ratio > 0 and self.warmup_steps > 0:
            raise ValueError("set either warmupRatio or warmupSteps, not both")
        return self


class StorageSpec(_Model):
    """S3-compatible object storage; credentials come from the environment only."""

    endpoint: str | None = Field(default=None, description="Custom S3 endpoint URL.")
    region: str = "us-east-1"
    addressing_style: AddressingStyle = "auto"
    max_attempts: int = Field(default=8, ge=1, le=50)


class OutputSpec(_Model):
    uri: str = Field(pattern=S3_URI_PATTERN)
    merge_adapter: bool = False


class ReportingSpec(_Model):
    """Where the trainer reports progress: its own FineTuneJob's status."""

    namespace: str | None = None
    name: str | None = None
    interval_seconds: float = Field(default=5.0, ge=0.5)
    termination_message_path: str = "/dev/termination-log"


class TrainerConfig(_Model):
    """Everything the trainer needs, rendered by the operator from a FineTuneJob."""

    model: ModelSpec
    dataset: DatasetSpec
    method: Method = "qlora"
    quantization: QuantizationSpec = QuantizationSpec()
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    storage: StorageSpec = StorageSpec()
    output: OutputSpec
    reporting: ReportingSpec = ReportingSpec()
    #: GPUs requested; the trainer fails if the launched world size differs. 0 = CPU.
    gpus: Annotated[int, Field(ge=0, le=64)] = 0
    #: Local scratch folder (an emptyDir in the pod): downloads, checkpoints before upload.
    work_dir: str = Field(default="/tmp/kubetune", min_length=1)

    @model_validator(mode="after")
    def _qlora_needs_4bit(self) -> TrainerConfig:
        if self.method == "qlora" and self.quantization.bits != 4:
            raise ValueError("method 'qlora' needs quantization.bits 4")
        return self

    @model_validator(mode="after")
    def _eval_needs_data(self) -> TrainerConfig:
        has_eval_data = self.dataset.validation is not None or self.dataset.validation_split > 0
        if self.training.eval_strategy != "no" and not has_eval_data:
            raise ValueError("training.evalStrategy needs dataset.validation or dataset.validationSplit")
        return self

    def fingerprint(self) -> str:
        """sha256 of what determines the result (model, data, method, hyperparameters, output).

        Recorded in every checkpoint marker and in ``manifest.json``: a run resumes or reuses
        only what a run with the same fingerprint wrote (connection and reporting settings
        are left out, so a restarted pod with new credentials still resumes).
        """
        import hashlib
        import json

        keys = {"model", "dataset", "method", "quantization", "lora", "training", "output", "gpus"}
        identity = self.model_dump(mode="json", by_alias=True, include=keys)
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
