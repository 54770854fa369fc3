"""``FineTuneJob.spec``: the typed API, from which the CRD's schema and the API reference are generated.

Each field is declared once: its type, default, bounds, enum and description (the attribute
docstring) here; cross-field rules as :class:`~kubetune_api.base.Rule` (CEL and Python).
The trainer's config (:mod:`kubetune_api.trainer`) reuses the sections it needs.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field
from pydantic_core import PydanticCustomError

from .base import (
    INT_OR_STRING_KEY,
    PRESERVE_UNKNOWN_KEY,
    RULE_ERROR,
    ApiModel,
    FieldRule,
    Rule,
    cel,
    cel_string,
    immutable,
    immutable_optional,
)

#: ``s3://bucket/prefix``: bucket per the S3 naming rules, prefix optional.
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
#: A hub model id: ``name`` or ``org/name``.
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]*(/[A-Za-z0-9][A-Za-z0-9._\-]*)?$"
#: A DNS-1123 subdomain (Secret, PriorityClass names): dot-separated labels, each starting and
#: ending with a letter or digit (``a..b`` and ``a.-b`` are refused by the objects that use them).
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A non-negative Kubernetes resource quantity (``8``, ``7500m``, ``64Gi``, ``1e9``), as apimachinery
#: parses it: its exponent is a whole number (``1e1.5`` is refused by the Job), here of at most two
#: digits (``1e1000000`` would ask the API server for a million-digit number).
QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?[0-9]{1,2}))?$"
)
#: The longest quantity string (the CRD's maxLength).
QUANTITY_MAX_LENGTH = 64
#: A label key or other qualified name: an optional DNS-subdomain prefix and ``/``, then a name.
QUALIFIED_NAME_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
#: A label value: empty, or up to 63 of ``[A-Za-z0-9._-]`` starting and ending alphanumeric.
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
#: An image reference as the container runtime parses it: ``[registry[:port]/]path[:tag][@digest]``.
_DOMAIN_PART = r"([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_PATH_PART = r"[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
IMAGE_PATTERN = (
    rf"^({_DOMAIN_PART}(\.{_DOMAIN_PART})*(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
#: An extended resource name such as ``nvidia.com/gpu``: core/v1 wants a domain prefix and a name
#: of at most 63 characters (and no ``requests.`` in front, see :data:`RESOURCE_NAME_RULE`).
RESOURCE_NAME_PATTERN = (
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$"
)
#: A key of a Secret (or ConfigMap), as core/v1 checks it: a Secret can hold no other key.
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105 - the syntax of a key's name, not a secret
#: The largest integer the API server reads as one (Go's int64); beyond it a number is a float.
INT64_MAX = 2**63 - 1
#: The largest int32 (a Job's ttlSecondsAfterFinished is one).
INT32_MAX = 2**31 - 1
#: The largest seed the trainer can use: transformers' set_seed seeds numpy, which takes 32 bits.
SEED_MAX = 2**32 - 1
#: An http(s) endpoint: a host of printable ASCII (no spaces, no '/'), then an optional path. Spelled
#: out rather than ``[^\s/]``: ``\s`` is ASCII-only in CEL's RE2 and Unicode in Python.
ENDPOINT_PATTERN = r"^https?://[!-.0-~]+(/.*)?$"


DatasetFormat = Literal[
    "auto",
    "alpaca",
    "chat",
    "prompt_completion",
    "text",
    "preference",
    "unpaired_preference",
    "classification",
]
#: The supervised (causal LM) formats: objective sft on task causal-lm.
SUPERVISED_FORMATS = ("alpaca", "chat", "prompt_completion", "text")
#: Which parameters train. qlora and lora: a LoRA adapter (on a 4-bit base for qlora); full: every
#: weight; freeze: only the named modules or the last layers; prompt-tuning and prefix-tuning:
#: virtual tokens (peft), the model's weights unchanged.
Method = Literal["qlora", "lora", "full", "freeze", "prompt-tuning", "prefix-tuning"]
#: The methods that train a LoRA adapter (the only ones quantization and mergeAdapter apply to).
LORA_METHODS = ("qlora", "lora")
#: The methods that train virtual tokens (peft prompt learning).
PROMPT_LEARNING_METHODS = ("prompt-tuning", "prefix-tuning")
#: The methods whose output is a peft adapter loaded on its base (full and freeze write a
#: complete model).
ADAPTER_METHODS = LORA_METHODS + PROMPT_LEARNING_METHODS
#: What training optimizes (docs/trainer.md, "Objectives").
Objective = Literal["sft", "dpo", "orpo", "kto", "reward"]
#: The objectives that train on preference pairs (dataset.format preference).
PAIRED_PREFERENCE_OBJECTIVES = ("dpo", "orpo", "reward")
#: What the model is for: causal-lm generates text; sequence-classification puts a classification
#: head on the base model and trains it on labelled text.
Task = Literal["causal-lm", "sequence-classification"]
#: TRL's DPO loss types that kubetune offers (DPOConfig.loss_type; each needs no setting of its own).
DpoLossType = Literal["sigmoid", "ipo", "hinge", "sigmoid_norm", "apo_zero", "apo_down"]
QuantType = Literal["nf4", "fp4"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Batching = Literal["auto", "padded", "length-grouped", "padding-free"]
AttnImplementation = Literal["auto", "sdpa", "eager", "flash_attention_2"]
#: transformers' optimizer names (TrainingArguments.optim) that kubetune offers, and auto.
Optimizer = Literal[
    "auto",
    "adamw_torch",
    "adamw_torch_fused",
    "adafactor",
    "sgd",
    "adamw_8bit",
    "paged_adamw_8bit",
    "paged_adamw_32bit",
]
#: The optimizers that bitsandbytes runs: CUDA only.
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


def _not_yaml_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError(
            RULE_ERROR,
            'must be "no", "steps" or "epoch": write "no" in quotes (YAML reads a bare no as false)',
            {"field_path": ""},
        )
    return value


IntervalStrategy = Annotated[Literal["no", "steps", "epoch"], BeforeValidator(_not_yaml_boolean)]
SchedulerType = Literal[
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
]
AddressingStyle = Literal["auto", "path", "virtual"]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]

#: The rules below are CEL rules rather than patterns (which the API server would print as a
#: regular expression), so that a wrong value is told what to write.
S3_URI_RULE = FieldRule.matching(
    S3_URI_PATTERN,
    (
        "must be an s3://bucket/key URI such as s3://ml-data/train.jsonl: s3:// in lower case, then a "
        "bucket name of 3 to 63 lower-case letters, digits, '.' or '-'"
    ),
)
#: A Kubernetes object name (a DNS-1123 subdomain): Secrets, PriorityClasses, ServiceAccounts, queues.
OBJECT_NAME_RULE = FieldRule.matching(
    DNS_SUBDOMAIN_PATTERN,
    (
        "must be a name of lower-case letters, digits, '-' and '.', such as my-secret or team.a: "
        "each part between dots starting and ending with a letter or digit"
    ),
)
S3Uri = Annotated[str, Field(max_length=1024), S3_URI_RULE]
SecretName = Annotated[str, Field(min_length=1, max_length=253), OBJECT_NAME_RULE]
#: An optional object name: ``ObjectName | None = Field(default=None, max_length=...)``.
ObjectName = Annotated[str, OBJECT_NAME_RULE]
Endpoint = Annotated[
    str,
    FieldRule.matching(
        ENDPOINT_PATTERN,
        (
            "must be an http:// or https:// URL such as https://minio.example:9000: a host without "
            "spaces, then an optional /path"
        ),
    ),
]
RESOURCE_NAME_RULE = FieldRule(
    cel=f"self.matches({cel_string(RESOURCE_NAME_PATTERN)}) && !self.startsWith('requests.')",
    message=(
        "must be an extended resource name such as nvidia.com/gpu or amd.com/gpu: a lower-case "
        "DNS-name prefix and '/', then up to 63 lower-case letters, digits, '-', '_' or '.'"
    ),
    check=lambda v: bool(re.fullmatch(RESOURCE_NAME_PATTERN, v)) and not v.startswith("requests."),
)
ResourceName = Annotated[str, RESOURCE_NAME_RULE]


def _fits_int64(value: int) -> int:
    if value > INT64_MAX:
        raise PydanticCustomError(
            RULE_ERROR,
            f"must be at most {INT64_MAX} (a larger number is not an integer to the API server)",
            {"field_path": ""},
        )
    return value


#: An integer without a bound of its own: the API server reads nothing above int64 as an integer.
#: Checked in Python only (a CRD cannot say ``maximum: 9223372036854775807``: it reads it as a float).
#: (After any bounds of its own in an Optional: ``Annotated[int, Field(ge=1), INT64] | None``.)
INT64 = AfterValidator(_fits_int64)
Int64 = Annotated[int, INT64]
SecretKey = Annotated[
    str,
    Field(min_length=1, max_length=253),
    FieldRule(
        cel=f"self.matches({cel_string(SECRET_KEY_PATTERN)}) && self != '.' && !self.startsWith('..')",
        message=(
            "must be a key of a Secret such as AWS_ACCESS_KEY_ID or token: letters, digits, '-', '_' "
            "and '.' (a Secret can hold no other key, so the pod would never start)"
        ),
        check=lambda v: bool(re.fullmatch(SECRET_KEY_PATTERN, v)) and v != "." and not v.startswith(".."),
    ),
]
ColumnName = Annotated[str, Field(min_length=1, max_length=128)]
QUANTITY_MESSAGE = (
    "must be a Kubernetes quantity such as 48Gi, 500M or 7500m, not negative: no space "
    "before the unit and no trailing B (48GB is 48G, or 48Gi in binary units)"
)


def _quantity_input(value: Any) -> Any:
    """A number or a string, as the API server takes an int-or-string (a whole float is a number).

    Anything else (a boolean, a list) gets the quantity's message once, instead of one error per
    member of the int | str union, named by a path that is no field (``resources.cpu.int``).
    """
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError(RULE_ERROR, QUANTITY_MESSAGE, {"field_path": ""})
    return value


def _is_quantity(value: int | str) -> bool:
    if isinstance(value, int):
        return value >= 0
    return len(value) <= QUANTITY_MAX_LENGTH and bool(re.fullmatch(QUANTITY_PATTERN, value))


#: An int-or-string Kubernetes quantity, not negative. A CEL rule, not a pattern, so that a
#: wrong value gets a hint ("48GB" and "8 Gi" are common) instead of a regular expression.
Quantity = Annotated[
    int | str,
    Field(json_schema_extra={INT_OR_STRING_KEY: True, "maxLength": QUANTITY_MAX_LENGTH}),
    FieldRule(
        cel=f"type(self) == int ? self >= 0 : self.matches({cel_string(QUANTITY_PATTERN)})",
        message=QUANTITY_MESSAGE,
        check=_is_quantity,
    ),
    BeforeValidator(_quantity_input),
]
#: A container image reference; pin it by digest (``…@sha256:…``) for reproducible runs.
ImageReference = Annotated[
    str,
    Field(min_length=1, max_length=512),
    FieldRule.matching(
        IMAGE_PATTERN,
        (
            "must be an image reference such as registry.example.com/team/trainer:1.2.0 or "
            "registry.example.com/team/trainer@sha256:<64 hex digits>: a lowercase repository, "
            "no spaces and no scheme (https://)"
        ),
    ),
]
LabelValue = Annotated[
    str,
    Field(max_length=63),
    FieldRule.matching(
        LABEL_VALUE_PATTERN,
        (
            "must be a label value: up to 63 letters, digits, '-', '_' or '.', starting and ending "
            'with a letter or digit (quote values YAML reads as other types, such as "true" or "1")'
        ),
    ),
]
#: A toleration's taint key: a label key, or empty (with operator Exists: every taint).
TaintKey = Annotated[
    str,
    Field(max_length=317),
    FieldRule(
        cel=f"self == '' || self.matches({cel_string(QUALIFIED_NAME_PATTERN)})",
        message=(
            "must be a label key such as nvidia.com/gpu.product or kubernetes.io/hostname: an "
            "optional DNS-name prefix and '/', then up to 63 letters, digits, '-', '_' or '.'"
        ),
        check=lambda v: v == "" or bool(re.fullmatch(QUALIFIED_NAME_PATTERN, v)),
    ),
]


_QUANTITY_SUFFIXES = {
    **{s: Decimal(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
}


#: Exact for every quantity QUANTITY_PATTERN admits (64 digits, an exponent of two, a suffix up to 2**60).
_QUANTITY_CONTEXT = Context(prec=200)


def quantity_value(quantity: int | str) -> Decimal:
    """A quantity's value: ``"64Gi"`` -> 68719476736, ``"7500m"`` -> 7.5 (apimachinery's rules)."""
    if isinstance(quantity, int):
        return Decimal(quantity)
    text = quantity.lstrip("+")
    number = text.rstrip("KMGTPEikmnu")
    suffix = text[len(number) :]
    if suffix not in _QUANTITY_SUFFIXES:  # an exponent (1e3) or a malformed value
        return Decimal(text)
    return _QUANTITY_CONTEXT.multiply(Decimal(number), _QUANTITY_SUFFIXES[suffix])


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; raises ValueError if malformed."""
    if not re.fullmatch(S3_URI_PATTERN, uri):
        raise ValueError(f"not an s3://bucket/prefix URI: {uri!r}")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _valid_source(source: str) -> bool:
    return bool(re.fullmatch(S3_URI_PATTERN if source.startswith("s3://") else HUB_ID_PATTERN, source))


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FineTuneJob's namespace."""

    name: SecretName
    """Name of the Secret, in the FineTuneJob's namespace."""
    key: SecretKey = "token"
    """Key in the Secret that holds the token."""


class ModelCacheSpec(ApiModel):
    """A PersistentVolumeClaim that keeps downloaded s3:// base models, so that a retried, resumed or
    later pod of a job on the same model reads it from the volume instead of object storage."""

    claim_name: SecretName
    """Name of the PersistentVolumeClaim, in the FineTuneJob's namespace. ReadWriteMany shares it
    across nodes (and jobs); ReadWriteOnce serves the pods of one node. Size it for the models it
    holds: each takes its size on disk once, however many jobs use it."""
    max_size: Quantity | None = None
    """Before downloading a model that is not cached, the least recently used other models are
    removed until the cache, the new one included, fits this size. Unset: nothing is removed (the
    volume's own size limits the cache; a full volume fails the download)."""


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    cel_rules = (
        Rule(
            cel=(
                f"self.source.startsWith('s3://') ? self.source.matches({cel_string(S3_URI_PATTERN)}) "
                f": self.source.matches({cel_string(HUB_ID_PATTERN)})"
            ),
            message="model.source must be a hub id (org/name) or an s3://bucket/prefix URI",
            field_path=".source",
            check=lambda m: _valid_source(m.source),
        ),
    )

    source: str = Field(min_length=1, max_length=1024)
    """A Hugging Face Hub model id (org/name) or the s3://bucket/prefix of a model saved with
    save_pretrained."""
    revision: str | None = Field(default=None, min_length=1, max_length=255)
    """Hub revision to load (branch, tag or commit sha). Ignored for s3:// sources."""
    token_secret_ref: SecretKeyRef | None = None
    """Secret holding a Hugging Face Hub token, for gated or private models. Mounted into the trainer
    as a read-only file (never an environment variable); never copied."""
    trust_remote_code: bool = False
    """Allow the model's own Python code from the hub to run (transformers trust_remote_code)."""
    cache: ModelCacheSpec | None = None
    """Keep the downloaded s3:// model on a PersistentVolumeClaim, keyed by its source and the
    listing of its objects (keys, sizes, ETags), checked before use; unset: each pod downloads it
    into its scratch disk. Hub models are cached there too (huggingface_hub's cache, by revision)."""

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")


class FieldMapping(ApiModel):
    """Column names in the dataset for each role the format uses, when they differ from the defaults."""

    instruction: ColumnName = "instruction"
    """Column holding the instruction (alpaca)."""
    input: ColumnName = "input"
    """Column holding the optional input (alpaca)."""
    output: ColumnName = "output"
    """Column holding the expected answer (alpaca)."""
    messages: ColumnName = "messages"
    """Column holding the list of chat messages (chat)."""
    prompt: ColumnName = "prompt"
    """Column holding the prompt (prompt_completion, preference, unpaired_preference)."""
    completion: ColumnName = "completion"
    """Column holding the completion (prompt_completion, unpaired_preference)."""
    text: ColumnName = "text"
    """Column holding the raw text (text), or the text to classify (classification)."""
    chosen: ColumnName = "chosen"
    """Column holding the preferred response (preference; the prompt is the prompt column)."""
    rejected: ColumnName = "rejected"
    """Column holding the dispreferred response (preference)."""
    label: ColumnName = "label"
    """Column holding the label: a boolean, true for a desirable completion (unpaired_preference),
    or a class name or index (classification)."""
    text_pair: ColumnName = "text_pair"
    """Column holding the optional second text of a pair to classify (classification), e.g. the
    hypothesis of an entailment pair."""


class DatasetSpec(ApiModel):
    """The training data, as JSON Lines (or JSON/Parquet) objects in object storage."""

    cel_rules = (
        Rule(
            cel="!(has(self.validation) && self.validationSplit > 0.0)",
            message="dataset.validation and dataset.validationSplit are exclusive: set one of them",
            field_path=".validationSplit",
            check=lambda d: not (d.validation is not None and d.validation_split > 0),
        ),
    )

    train: S3Uri
    """s3://bucket/key of the training file."""
    validation: S3Uri | None = None
    """s3://bucket/key of a validation file. Exclusive with validationSplit."""
    validation_split: float = Field(default=0.0, ge=0.0, lt=0.5)
    """Fraction of the training file held out for evaluation (0 to below 0.5). Exclusive with
    validation."""
    format: DatasetFormat = "auto"
    """Record format. alpaca: instruction/input/output; chat: a list of {role, content} messages;
    prompt_completion: prompt/completion; text: raw text; preference: prompt/chosen/rejected (text,
    or lists of {role, content} messages), for objectives dpo, orpo and reward;
    unpaired_preference: prompt/completion/label (true for a desirable completion), for objective
    kto; classification: text (and an optional text_pair) with a label, for task
    sequence-classification; auto: detected from the first records."""
    field_mapping: FieldMapping = FieldMapping()
    """Column names in the dataset for each role the format uses, when they differ from the defaults."""
    max_reported_errors: int = Field(default=20, ge=1, le=1000)
    """How many invalid records the trainer lists before failing with InvalidDataset."""


class QuantizationSpec(ApiModel):
    """How the base model is quantized while training (bitsandbytes)."""

    bits: Literal[4, 8, 16] | None = None
    """Weight precision of the frozen base model; 16 means no quantization. Unset: 4 for method
    qlora (which needs 4), 16 for every other method. lora takes 8 or 16; full, freeze,
    prompt-tuning and prefix-tuning train unquantized (unset or 16)."""
    quant_type: QuantType = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Also quantize the quantization constants (saves about 0.4 bits per parameter)."""
    compute_dtype: ComputeDtype = "auto"
    """Dtype of the matrix multiplications; auto picks bfloat16 where the GPU supports it."""


class LoraSpec(ApiModel):
    """The LoRA adapter (peft)."""

    r: int = Field(default=16, ge=1, le=1024)
    """Rank of the update matrices."""
    alpha: int = Field(default=32, ge=1, le=4096)
    """Scaling factor (lora_alpha)."""
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout probability of the LoRA layers."""
    target_modules: tuple[Annotated[str, Field(min_length=1, max_length=128)], ...] = Field(
        default=("all-linear",), min_length=1, max_length=64
    )
    """Module names to adapt (e.g. q_proj, v_proj), or [all-linear] for every linear layer except
    the output head."""


class TrainingSpec(ApiModel):
    """Training hyperparameters (transformers TrainingArguments / TRL SFTConfig)."""

    cel_rules = (
        Rule(
            cel="self.evalStrategy != 'steps' || has(self.evalSteps)",
            message="training.evalSteps is required when training.evalStrategy is steps",
            field_path=".evalSteps",
            check=lambda t: t.eval_strategy != "steps" or t.eval_steps is not None,
        ),
        Rule(
            cel="!(self.warmupRatio > 0.0 && self.warmupSteps > 0)",
            message="training.warmupRatio and training.warmupSteps are exclusive: set one of them",
            field_path=".warmupSteps",
            check=lambda t: not (t.warmup_ratio > 0 and t.warmup_steps > 0),
        ),
        Rule(
            cel="!self.packing || self.batching == 'auto' || self.batching == 'padding-free'",
            message=(
                "training.packing builds padding-free batches: set training.batching to auto or"
                " padding-free, or packing to false"
            ),
            field_path=".packing",
            check=lambda t: not t.packing or t.batching in ("auto", "padding-free"),
        ),
    )

    per_device_train_batch_size: int = Field(default=4, ge=1, le=1024)
    """Training batch size per GPU (or for the CPU)."""
    per_device_eval_batch_size: int = Field(default=4, ge=1, le=1024)
    """Evaluation batch size per GPU (or for the CPU)."""
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    """Batches accumulated before each optimizer step."""
    num_train_epochs: float = Field(default=1.0, gt=0, le=1000)
    """Passes over the training data; ignored when maxSteps is positive."""
    max_steps: Int64 = Field(default=-1, ge=-1)
    """Total optimizer steps; -1 trains for numTrainEpochs instead."""
    learning_rate: float = Field(default=2e-4, gt=0, le=1)
    """Peak learning rate."""
    precision: Precision = "auto"
    """Mixed precision mode; auto picks bf16 where supported, fp32 on CPU."""
    logging_steps: Int64 = Field(default=10, ge=1)
    """Log (and report progress) every this many steps."""
    eval_strategy: IntervalStrategy = "no"
    """When to evaluate on the validation data; needs dataset.validation or validationSplit. Quote
    "no": YAML reads a bare no as false."""
    eval_steps: Annotated[int, Field(ge=1), INT64] | None = None
    """Evaluate every this many steps (required when evalStrategy is steps)."""
    save_strategy: IntervalStrategy = "steps"
    """When to write a checkpoint to object storage. Quote "no": YAML reads a bare no as false."""
    save_steps: Int64 = Field(default=100, ge=1)
    """Checkpoint every this many steps (saveStrategy steps)."""
    save_total_limit: Int64 = Field(default=2, ge=1)
    """Number of most recent checkpoints to keep (in object storage too)."""
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Fraction of the steps used for learning-rate warmup. Exclusive with warmupSteps."""
    warmup_steps: Int64 = Field(default=0, ge=0)
    """Number of learning-rate warmup steps. Exclusive with warmupRatio."""
    max_seq_length: int = Field(default=1024, ge=16, le=131072)
    """Longest tokenized sequence; longer ones are truncated."""
    batching: Batching = "auto"
    """How rows form a batch; no choice lets a row attend to another. auto: padding-free (rows
    flattened into one sequence, no padding) where the attention kernel keeps them apart by their
    boundaries (flash attention on a GPU), else length-grouped. length-grouped: rows of similar
    length batched together, padded to the longest (about 2 % padding). padded: rows in random
    order padded to the longest of the batch (TRL's default). padding-free: flattened with a
    block-diagonal mask where the kernel is not varlen; the trainer checks before the first step
    that the model keeps the rows apart."""
    packing: bool = False
    """Pack several short examples into each maxSeqLength sequence (TRL best-fit packing), kept
    apart by their position ids (checked before the first step, as batching padding-free). Needs
    batching auto or padding-free."""
    attn_implementation: AttnImplementation = "auto"
    """The attention kernel. auto: flash_attention_2 on a GPU where the flash-attn package is
    installed and the precision is bf16 or fp16, else sdpa. flash_attention_2 needs a GPU."""
    liger_kernel: bool | None = None
    """Liger's Triton kernels (fused RMSNorm, RoPE, SwiGLU and linear cross-entropy): more tokens/s
    and much less activation memory. Unset: on for GPUs where the liger-kernel package is installed,
    off on CPU. true needs a GPU."""
    optim: Optimizer = "auto"
    """The optimizer. auto: paged_adamw_8bit for qlora on a GPU (the QLoRA recipe: 8-bit states,
    paged to CPU memory on spikes), adamw_torch_fused on other GPUs, adamw_torch on CPU. The
    bitsandbytes ones (adamw_8bit, paged_*) need a GPU."""
    lr_scheduler_type: SchedulerType = "linear"
    """Learning-rate schedule."""
    weight_decay: float = Field(default=0.0, ge=0.0)
    """AdamW weight decay."""
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000)
    """Clip the gradients' global norm to this value before each optimizer step."""
    seed: int = Field(default=42, ge=0, le=SEED_MAX)
    """Random seed for data shuffling and initialization (at most 4294967295: numpy's 32 bits)."""
    gradient_checkpointing: bool | None = None
    """Trade compute for memory; unset means on for GPUs and off on CPU."""


class DpoSpec(ApiModel):
    """Direct preference optimization (TRL's DPOTrainer); only with objective dpo."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0)
    """How far the trained model may move from the reference (the frozen base model): higher stays
    closer. For lossType ipo it is the regularization tau."""
    loss_type: DpoLossType = "sigmoid"
    """The DPO loss (TRL's loss_type). sigmoid: the DPO paper's; ipo: IPO, less prone to
    overfitting on deterministic preferences; hinge: SLiC's; sigmoid_norm: sigmoid over
    length-normalized log-probabilities; apo_zero and apo_down: anchored preference optimization,
    when the chosen responses are better (apo_zero) or worse (apo_down) than the model's own."""


class OrpoSpec(ApiModel):
    """Odds ratio preference optimization (TRL's ORPOTrainer); only with objective orpo."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0)
    """Weight of the odds-ratio (preference) term against the supervised loss on the chosen
    responses (the ORPO paper's lambda)."""


class KtoSpec(ApiModel):
    """Kahneman-Tversky optimization (TRL's KTOTrainer); only with objective kto."""

    beta: float = Field(default=0.1, gt=0.0, le=100.0)
    """How far the trained model may move from the reference (the frozen base model): higher stays
    closer."""
    desirable_weight: float = Field(default=1.0, gt=0.0, le=100.0)
    """Weight of the desirable (label true) examples' loss. With unbalanced data, keep
    desirableWeight x desirable count / (undesirableWeight x undesirable count) between 1 and 4/3."""
    undesirable_weight: float = Field(default=1.0, gt=0.0, le=100.0)
    """Weight of the undesirable (label false) examples' loss."""


class ClassificationSpec(ApiModel):
    """The labels of task sequence-classification."""

    cel_rules = (
        Rule(
            cel="!has(self.labels) || self.labels.all(l, self.labels.exists_one(m, m == l))",
            message="classification.labels must name each label once",
            field_path=".labels",
            check=lambda c: c.labels is None or len(set(c.labels)) == len(c.labels),
        ),
    )

    labels: tuple[Annotated[str, Field(min_length=1, max_length=128)], ...] | None = Field(
        default=None, min_length=2, max_length=256
    )
    """The class names, in index order (an integer label is an index into this list). Unset: the
    sorted distinct labels of the training data. A validation label outside the set is an error."""


class FreezeSpec(ApiModel):
    """Which parameters method freeze trains; every other one stays frozen."""

    cel_rules = (
        Rule(
            cel="has(self.trainableModules) != has(self.trainableLayers)",
            message="freeze needs exactly one of trainableModules and trainableLayers",
            field_path=".trainableModules",
            check=lambda f: (f.trainable_modules is None) != (f.trainable_layers is None),
        ),
    )

    trainable_modules: tuple[Annotated[str, Field(min_length=1, max_length=128)], ...] | None = Field(
        default=None, min_length=1, max_length=64
    )
    """Module names to train: a parameter trains when its dotted name contains one of them as
    whole parts (lm_head, norm, mlp.down_proj, layers.23). The job fails before training when one
    matches nothing."""
    trainable_layers: int | None = Field(default=None, ge=1, le=1024)
    """Train the last this many transformer layers (all their weights); the embeddings, the
    other layers and the output head stay frozen. At most the model's number of layers."""


class PromptTuningSpec(ApiModel):
    """Prompt tuning (peft): trained virtual-token embeddings put before every input."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """How many virtual tokens to train."""
    init_text: str | None = Field(default=None, min_length=1, max_length=4096)
    """Text whose token embeddings start the virtual tokens (e.g. "Classify the sentiment:");
    unset: random initialization."""


class PrefixTuningSpec(ApiModel):
    """Prefix tuning (peft): trained key/value prefixes in every attention layer."""

    num_virtual_tokens: int = Field(default=20, ge=1, le=1024)
    """Length of the prefix, in virtual tokens."""
    projection: bool = False
    """Reparameterize the prefix through a small MLP while training (the prefix-tuning paper's
    trick for stabler training); the saved adapter is the same size."""


class EvaluationSpec(ApiModel):
    """What the trainer generates after training, for people to read (task causal-lm)."""

    sample_prompts: tuple[Annotated[str, Field(min_length=1, max_length=4096)], ...] | None = Field(
        default=None, min_length=1, max_length=64
    )
    """Prompts to answer with and without the trained weights, written to samples.jsonl in the
    output (the first few in the model card). Unset: up to numSamples prompts from the validation
    data (none without validation data)."""
    num_samples: int = Field(default=4, ge=0, le=64)
    """How many validation prompts to sample when samplePrompts is unset; 0: no samples."""
    max_new_tokens: int = Field(default=64, ge=1, le=4096)
    """Longest generated answer, in tokens (greedy decoding)."""


class OutputSpec(ApiModel):
    """Where the result goes."""

    uri: S3Uri
    """s3://bucket/prefix under which the trainer writes checkpoints, the adapter, metrics, a model
    card and, last, a manifest."""
    merge_adapter: bool = False
    """Also write the base model with the adapter merged in."""


class CredentialsSecretRef(ApiModel):
    """Secret with the access keys, mounted into the trainer as read-only files (never environment
    variables; the values are never copied). Unset to use the pod's cloud identity."""

    name: SecretName
    """Name of the Secret, in the FineTuneJob's namespace."""
    access_key_id_key: SecretKey = "AWS_ACCESS_KEY_ID"
    """Key in the Secret holding the access key id."""
    secret_access_key_key: SecretKey = "AWS_SECRET_ACCESS_KEY"  # noqa: S105 - a key's name, not a secret
    """Key in the Secret holding the secret access key."""
    session_token_key: SecretKey | None = None
    """Key in the Secret holding a session token, for temporary credentials."""


class StorageSpec(ApiModel):
    """The S3-compatible object storage holding the dataset, (optionally) the model and the output.
    Credentials come from a Secret reference or the pod's cloud identity; never inline."""

    endpoint: Endpoint | None = Field(default=None, max_length=1024)
    """Endpoint URL of an S3-compatible server (e.g. https://minio.example:9000); unset for AWS S3."""
    region: str = Field(default="us-east-1", min_length=1, max_length=64)
    """Region of the bucket."""
    addressing_style: AddressingStyle = "auto"
    """Bucket addressing; most self-hosted servers need path."""
    max_attempts: int = Field(default=8, ge=1, le=50)
    """Attempts per object-storage request, with exponential backoff."""
    max_concurrency: int = Field(default=16, ge=1, le=128)
    """Object-storage requests in flight at once while downloading a folder (the model, a
    checkpoint): across its files and the parts of its large files (s3transfer's TransferManager)."""
    part_size_mi: int = Field(default=64, ge=5, le=5120)
    """Part size of multipart transfers, in MiB: objects larger than this move in parts of this
    size (S3's minimum is 5)."""
    credentials_secret_ref: CredentialsSecretRef | None = None
    """Secret with the access keys, mounted into the trainer as read-only files (never environment
    variables; the values are never copied); a rotated Secret is picked up while training. Unset to
    use the pod's cloud identity (see identity)."""


#: An MLflow tag key kubetune accepts: letters, digits and ``_ - . /`` (MLflow's own set, less
#: spaces), not starting with ``/`` or ``.``.
MLFLOW_TAG_KEY_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9_\-./]{0,249}$"
#: Tag prefixes MLflow and kubetune set themselves: a user's tag may not take them over.
RESERVED_TAG_PREFIXES = ("mlflow.", "kubetune.")
#: A URL with a user (and password) before its host: credentials go by Secret reference only.
URL_WITH_USERINFO_PATTERN = r"^[a-z]+://[^/]*@"


class MlflowCredentialsSecretRef(ApiModel):
    """Secret with the tracking server's credentials: a token, or a username and a password. Mounted
    into the trainer as read-only files (never environment variables; the values are never copied);
    the trainer sets MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD,
    in its own process only."""

    cel_rules = (
        Rule(
            cel=(
                "has(self.tokenKey) ? !has(self.usernameKey) && !has(self.passwordKey)"
                " : has(self.usernameKey) && has(self.passwordKey)"
            ),
            message=(
                "name either tokenKey (a bearer token) or both usernameKey and passwordKey (basic"
                " authentication), not both kinds"
            ),
            check=lambda r: (
                (r.username_key is None and r.password_key is None)
                if r.token_key is not None
                else (r.username_key is not None and r.password_key is not None)
            ),
        ),
    )

    name: SecretName
    """Name of the Secret, in the FineTuneJob's namespace."""
    token_key: SecretKey | None = None
    """Key in the Secret holding a bearer token (MLFLOW_TRACKING_TOKEN)."""
    username_key: SecretKey | None = None
    """Key in the Secret holding the username (MLFLOW_TRACKING_USERNAME), with passwordKey."""
    password_key: SecretKey | None = None
    """Key in the Secret holding the password (MLFLOW_TRACKING_PASSWORD), with usernameKey."""

    @property
    def kind(self) -> Literal["token", "basic"]:
        """Which credentials the Secret holds."""
        return "token" if self.token_key is not None else "basic"


def _tag_key_ok(key: str) -> bool:
    return bool(re.fullmatch(MLFLOW_TAG_KEY_PATTERN, key)) and not key.startswith(RESERVED_TAG_PREFIXES)


_TAG_KEY_CEL = f"key.matches({cel_string(MLFLOW_TAG_KEY_PATTERN)}) && " + " && ".join(
    f"!key.startsWith({cel_string(prefix)})" for prefix in RESERVED_TAG_PREFIXES
)
#: The run's tags: MLflow's key syntax (checked per key, as a CRD cannot constrain map keys
#: otherwise), values up to 5000 characters (MLflow takes 8000).
MlflowTags = Annotated[
    dict[str, Annotated[str, Field(max_length=5000)]],
    Field(max_length=32),
    FieldRule(
        cel=f"self.all(key, {_TAG_KEY_CEL})",
        message=(
            "keys must be MLflow tag keys such as team or data.version: up to 250 letters, digits, '_',"
            " '-', '.' and '/', not starting with '.' or '/'; mlflow. and kubetune. are reserved"
        ),
        check=lambda tags: all(_tag_key_ok(key) for key in tags),
    ),
]


class MlflowSpec(ApiModel):
    """An MLflow tracking server the trainer logs the run to: params, metrics per logging step,
    the output URI and the final metrics. A server that cannot be reached never fails training."""

    tracking_uri: Annotated[
        str,
        Field(max_length=1024),
        FieldRule.matching(
            ENDPOINT_PATTERN,
            (
                "must be an http:// or https:// URL of an MLflow tracking server such as "
                "https://mlflow.example:5000: a host without spaces, then an optional /path"
            ),
        ),
        FieldRule(
            cel=f"!self.matches({cel_string(URL_WITH_USERINFO_PATTERN)})",
            message="must not hold credentials (user:password@): name a Secret in credentialsSecretRef",
            check=lambda v: not re.match(URL_WITH_USERINFO_PATTERN, v),
        ),
    ]
    """URL of the tracking server (http or https). Its port (80/443 without one) is the one the
    trainer's NetworkPolicy lets out."""
    experiment_name: str | None = Field(default=None, min_length=1, max_length=500)
    """Experiment to log to, created if missing; unset: MLflow's Default experiment."""
    run_name: str | None = Field(default=None, min_length=1, max_length=250)
    """Name of the run; unset: <namespace>/<name> of the FineTuneJob."""
    tags: MlflowTags | None = None
    """Tags of the run; kubetune adds kubetune.name, kubetune.namespace and kubetune.uid (the
    FineTuneJob's), and kubetune.outputUri once the result is published."""
    credentials_secret_ref: MlflowCredentialsSecretRef | None = None
    """Secret with a token or a username and password for the server, mounted into the trainer as
    read-only files. Unset: no authentication."""


class TrackingSpec(ApiModel):
    """Experiment tracking: TensorBoard event files under the output, and an MLflow run."""

    tensorboard: bool = False
    """Write TensorBoard event files (every logged metric by step) under <output.uri>/tensorboard/,
    uploaded with each checkpoint and with the result (point TensorBoard at that prefix, or a
    downloaded copy)."""
    mlflow: MlflowSpec | None = None
    """Log the run to an MLflow tracking server."""


class ResourcesSpec(ApiModel):
    """Compute for the trainer pod."""

    cel_rules = (
        Rule(
            cel="!has(self.processes) || self.gpus == 0 || self.processes == self.gpus",
            message=(
                "resources.processes must equal resources.gpus (one process per GPU): unset it, or"
                " set it to the number of GPUs"
            ),
            field_path=".processes",
            check=lambda r: r.processes is None or r.gpus in (0, r.processes),
        ),
    )

    gpus: int = Field(default=1, ge=0, le=64)
    """GPUs for the trainer (one pod). More than one runs accelerate with one process per GPU; 0
    trains on CPU."""
    processes: int | None = Field(default=None, ge=1, le=64)
    """Trainer processes in the pod (accelerate launch --num_processes), training data parallel:
    each process takes its share of every batch. Unset: one per GPU, one on CPU. With GPUs it must
    equal gpus; on CPU (gpus 0) more than one process trains over gloo (small models, tests)."""
    gpu_resource_name: ResourceName = Field(default="nvidia.com/gpu", max_length=253)
    """Extended resource name of the GPUs (e.g. nvidia.com/gpu, amd.com/gpu)."""
    cpu: Quantity | None = None
    """CPU request and limit (a Kubernetes quantity, e.g. 8 or 7500m)."""
    memory: Quantity | None = None
    """Memory request and limit (a Kubernetes quantity, e.g. 64Gi)."""
    shared_memory: Quantity | None = None
    """Size limit of the in-memory /dev/shm volume (data loaders, NCCL); unset means no limit."""
    scratch: Quantity | None = None
    """Size of the trainer's scratch disk (/tmp: the model and data downloads, checkpoints before
    upload, the result): the emptyDir's sizeLimit and the pod's ephemeral-storage request and limit,
    so the scheduler picks a node with that much disk. The trainer checks before downloading that
    the inputs fit. Unset means no limit (the node's free disk)."""


DistributedStrategy = Literal["ddp", "fsdp"]
FsdpSharding = Literal["full", "shard-grad-op"]


class FsdpSpec(ApiModel):
    """How FSDP (PyTorch FSDP2 through accelerate) shards the model over the pod's GPUs."""

    sharding: FsdpSharding = "full"
    """full: parameters, gradients and optimizer states sharded, parameters gathered per layer for
    the forward and again for the backward (least memory, ZeRO-3). shard-grad-op: parameters kept
    gathered from the forward to the backward (less communication, more memory, ZeRO-2-like)."""
    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer states in CPU memory between uses
    (fits larger models, much slower); size resources.memory for it."""
    activation_checkpointing: bool = False
    """FSDP's own activation checkpointing of each wrapped layer: less activation memory without
    the extra all-gather that training.gradientCheckpointing costs under FSDP. Needs
    training.gradientCheckpointing false (both cannot be on)."""


class DistributedSpec(ApiModel):
    """How the trainer's processes share the work (one pod, one process per GPU)."""

    cel_rules = (
        Rule(
            cel="!has(self.fsdp) || self.strategy == 'fsdp'",
            message="distributed.fsdp applies to strategy fsdp only: set strategy fsdp, or remove fsdp",
            field_path=".fsdp",
            check=lambda d: d.fsdp is None or d.strategy == "fsdp",
        ),
    )

    strategy: DistributedStrategy = "ddp"
    """ddp: every process holds the whole model and trains on its share of each batch (the model
    must fit one GPU). fsdp: the model, its gradients and optimizer states are sharded over the
    GPUs, for models that do not fit one; needs resources.gpus 2 or more."""
    fsdp: FsdpSpec | None = None
    """Settings of strategy fsdp; unset: the defaults."""


def _is_exists(t: Toleration) -> bool:
    return t.operator == "Exists"


class Toleration(ApiModel):
    """A core/v1 Toleration, with core/v1's rules checked at apply time."""

    cel_rules = (
        Rule(
            cel="(has(self.key) && self.key != '') || (has(self.operator) && self.operator == 'Exists')",
            message=(
                "a toleration without a key matches every taint only with operator Exists: "
                "set key, or operator Exists"
            ),
            field_path=".operator",
            check=lambda t: bool(t.key) or _is_exists(t),
        ),
        Rule(
            cel="!(has(self.operator) && self.operator == 'Exists') || !has(self.value) || self.value == ''",
            message="operator Exists matches every value: remove value, or use operator Equal",
            field_path=".value",
            check=lambda t: not _is_exists(t) or not t.value,
        ),
        Rule(
            cel="!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            message=(
                "tolerationSeconds applies only to effect NoExecute: "
                "set effect NoExecute, or remove tolerationSeconds"
            ),
            field_path=".tolerationSeconds",
            check=lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
        ),
    )

    key: TaintKey | None = None
    """Taint key; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: LabelValue | None = None
    """Taint value, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: Annotated[int, Field(ge=0), INT64] | None = None
    """For NoExecute, how long the pod stays bound after the taint appears."""


class SchedulingSpec(ApiModel):
    """Where and when the trainer pod may run."""

    node_selector: (
        Annotated[
            dict[str, LabelValue],
            Field(max_length=64),
            FieldRule(
                cel=f"self.all(key, key.matches({cel_string(QUALIFIED_NAME_PATTERN)}))",
                message=(
                    "keys must be label keys such as nvidia.com/gpu.product: an optional DNS-name "
                    "prefix and '/', then up to 63 letters, digits, '-', '_' or '.'"
                ),
                check=lambda d: all(re.fullmatch(QUALIFIED_NAME_PATTERN, key) for key in d),
            ),
        ]
        | None
    ) = None
    """Node labels the trainer pod requires (e.g. a GPU product label)."""
    tolerations: tuple[Toleration, ...] | None = Field(default=None, max_length=32)
    """Taints the trainer pod tolerates (e.g. nvidia.com/gpu=present:NoSchedule)."""
    affinity: dict[str, Any] | None = Field(default=None, json_schema_extra={PRESERVE_UNKNOWN_KEY: True})
    """A core/v1 Affinity for the trainer pod (node, pod and anti-affinity rules), passed through."""
    priority_class_name: ObjectName | None = Field(default=None, max_length=253)
    """PriorityClass of the trainer pod."""
    queue_name: ObjectName | None = Field(default=None, max_length=63)
    """Kueue LocalQueue to submit to. The Job is then created suspended with the
    kueue.x-k8s.io/queue-name label and Kueue starts it when admitted (phase Queued until then)."""


#: Labels kubetune sets on its children; a user's pod labels may not take them over.
RESERVED_LABEL_PREFIX = "kubetune.dev/"


class IdentitySpec(ApiModel):
    """The trainer pod's identity: the Kubernetes ServiceAccount it runs as, and through it the cloud
    identity (IRSA, GKE or Azure workload identity) that object storage sees."""

    cel_rules = (
        Rule(
            cel="!(has(self.serviceAccountName) && has(self.serviceAccountAnnotations))",
            message=(
                "identity.serviceAccountAnnotations applies only to the ServiceAccount kubetune creates: "
                "annotate your own ServiceAccount, or unset identity.serviceAccountName"
            ),
            field_path=".serviceAccountAnnotations",
            check=lambda i: i.service_account_name is None or i.service_account_annotations is None,
        ),
    )

    service_account_name: ObjectName | None = Field(default=None, max_length=253)
    """An existing ServiceAccount in the FineTuneJob's namespace to run the trainer as (e.g. one
    already bound to a cloud role). kubetune then creates none, and binds its per-job Role (read
    this FineTuneJob, patch its status) to this account. Unset: a ServiceAccount is created per job."""
    service_account_annotations: (
        Annotated[
            dict[str, Annotated[str, Field(max_length=4096)]],
            Field(max_length=32),
            FieldRule(
                cel=f"self.all(key, key.matches({cel_string(QUALIFIED_NAME_PATTERN)}))",
                message=(
                    "keys must be annotation keys such as eks.amazonaws.com/role-arn: an optional "
                    "DNS-name prefix and '/', then up to 63 letters, digits, '-', '_' or '.'"
                ),
                check=lambda d: all(re.fullmatch(QUALIFIED_NAME_PATTERN, key) for key in d),
            ),
        ]
        | None
    ) = None
    """Annotations of the per-job ServiceAccount that give the pod a cloud identity, e.g.
    eks.amazonaws.com/role-arn (IRSA), iam.gke.io/gcp-service-account (GKE) or
    azure.workload.identity/client-id (Azure, with the pod label azure.workload.identity/use)."""
    pod_labels: (
        Annotated[
            dict[str, LabelValue],
            Field(max_length=32),
            FieldRule(
                cel=(
                    f"self.all(key, key.matches({cel_string(QUALIFIED_NAME_PATTERN)}) && "
                    f"!key.startsWith({cel_string(RESERVED_LABEL_PREFIX)}))"
                ),
                message=(
                    "keys must be label keys (an optional DNS-name prefix and '/', then up to 63 "
                    f"letters, digits, '-', '_' or '.'), outside {RESERVED_LABEL_PREFIX}"
                ),
                check=lambda d: all(
                    re.fullmatch(QUALIFIED_NAME_PATTERN, k) and not k.startswith(RESERVED_LABEL_PREFIX)
                    for k in d
                ),
            ),
        ]
        | None
    ) = None
    """Labels added to the trainer pod, for identity webhooks that select pods by label (Azure
    workload identity: azure.workload.identity/use: "true")."""


class LocalObjectReference(ApiModel):
    """A Secret in the FineTuneJob's namespace."""

    name: str = Field(min_length=1, max_length=253)
    """Name of a docker-registry Secret in the FineTuneJob's namespace."""


class LifecycleSpec(ApiModel):
    """Limits of the run. Editable at any time and applied to the Job, except
    terminationGracePeriodSeconds (part of the pod)."""

    backoff_limit: int = Field(default=3, ge=0, le=100)
    """Retries of a failed trainer pod before the job fails. Node disruptions do not count, invalid
    data fails at once."""
    active_deadline_seconds: Annotated[int, Field(ge=1), INT64] | None = None
    """Wall-clock limit of the whole run, in seconds; then it fails with DeadlineExceeded."""
    ttl_seconds_after_finished: int | None = Field(default=None, ge=0, le=INT32_MAX)
    """Delete the finished Job (and its pods) this many seconds after it ends (at most 2147483647,
    the Job's limit). The FineTuneJob and its status stay."""
    termination_grace_period_seconds: int = Field(
        default=300, ge=0, le=86400, json_schema_extra=immutable("lifecycle.terminationGracePeriodSeconds")
    )
    """Seconds a stopping trainer pod (suspend, preemption, drain, eviction) gets between SIGTERM
    and SIGKILL: enough to finish the step and save and upload one checkpoint."""


def _has_eval_data(dataset: DatasetSpec) -> bool:
    return dataset.validation is not None or dataset.validation_split > 0


def quantization_bits(method: Method, quantization: QuantizationSpec) -> int:
    """The base model's weight precision a run trains with: quantization.bits, else the method's
    default (4 for qlora, 16 for every other method)."""
    if quantization.bits is not None:
        return quantization.bits
    return 4 if method == "qlora" else 16


def _cel_in(expr: str, values: tuple[str, ...]) -> str:
    """CEL for "``expr`` is one of ``values``"."""
    return "(" + " || ".join(f"{expr} == '{v}'" for v in values) + ")"


#: Cross-section rules, shared by the spec and the trainer config (both have these sections).
QLORA_NEEDS_4BIT = Rule(
    cel="self.method != 'qlora' || !has(self.quantization.bits) || self.quantization.bits == 4",
    message="quantization.bits must be 4 when method is qlora (use method lora for 8 or 16 bits)",
    field_path=".quantization.bits",
    check=lambda s: s.method != "qlora" or s.quantization.bits in (None, 4),
)
QUANTIZATION_NEEDS_LORA = Rule(
    cel=(
        f"{_cel_in('self.method', LORA_METHODS)} ||"
        " !has(self.quantization.bits) || self.quantization.bits == 16"
    ),
    message=(
        "quantization applies to methods qlora and lora only (full, freeze, prompt-tuning and"
        " prefix-tuning train on unquantized weights): remove quantization.bits, or use method lora"
    ),
    field_path=".quantization.bits",
    check=lambda s: s.method in LORA_METHODS or s.quantization.bits in (None, 16),
)
MERGE_NEEDS_LORA = Rule(
    cel=f"!self.output.mergeAdapter || {_cel_in('self.method', LORA_METHODS)}",
    message=(
        "output.mergeAdapter merges a LoRA adapter (methods qlora and lora): full and freeze already"
        " write a complete model, and prompt or prefix tuning has no weights to merge; set it to false"
    ),
    field_path=".output.mergeAdapter",
    check=lambda s: not s.output.merge_adapter or s.method in LORA_METHODS,
)
FREEZE_NEEDS_SELECTION = Rule(
    cel="(self.method == 'freeze') == has(self.freeze)",
    message=(
        "method freeze trains what the freeze section names, and the freeze section is for method"
        " freeze only: set both (freeze.trainableModules or freeze.trainableLayers), or neither"
    ),
    field_path=".freeze",
    check=lambda s: (s.method == "freeze") == (s.freeze is not None),
)
PROMPT_TUNING_SETTINGS = Rule(
    cel="!has(self.promptTuning) || self.method == 'prompt-tuning'",
    message="promptTuning settings apply to method prompt-tuning only: set method, or remove the section",
    field_path=".promptTuning",
    check=lambda s: s.prompt_tuning is None or s.method == "prompt-tuning",
)
PREFIX_TUNING_SETTINGS = Rule(
    cel="!has(self.prefixTuning) || self.method == 'prefix-tuning'",
    message="prefixTuning settings apply to method prefix-tuning only: set method, or remove the section",
    field_path=".prefixTuning",
    check=lambda s: s.prefix_tuning is None or s.method == "prefix-tuning",
)
PROMPT_LEARNING_NEEDS_SFT = Rule(
    cel=(
        f"!{_cel_in('self.method', PROMPT_LEARNING_METHODS)} ||"
        " (self.objective == 'sft' && self.task == 'causal-lm')"
    ),
    message=(
        "methods prompt-tuning and prefix-tuning train with objective sft on task causal-lm only:"
        " use method lora for the other objectives and for classification"
    ),
    field_path=".method",
    check=lambda s: (
        s.method not in PROMPT_LEARNING_METHODS or (s.objective == "sft" and s.task == "causal-lm")
    ),
)
METHOD_RULES = (
    QLORA_NEEDS_4BIT,
    QUANTIZATION_NEEDS_LORA,
    MERGE_NEEDS_LORA,
    FREEZE_NEEDS_SELECTION,
    PROMPT_TUNING_SETTINGS,
    PREFIX_TUNING_SETTINGS,
    PROMPT_LEARNING_NEEDS_SFT,
)
EVAL_NEEDS_DATA = Rule(
    cel=(
        "self.training.evalStrategy == 'no' || has(self.dataset.validation) || "
        "self.dataset.validationSplit > 0.0"
    ),
    message="training.evalStrategy needs dataset.validation or dataset.validationSplit",
    field_path=".training.evalStrategy",
    check=lambda s: s.training.eval_strategy == "no" or _has_eval_data(s.dataset),
)


#: The dataset formats each kind of run reads (besides auto, which detects one of them).
def data_formats(objective: Objective, task: Task) -> tuple[str, ...]:
    """The formats a run of ``objective`` on ``task`` trains on."""
    if task == "sequence-classification":
        return ("classification",)
    if objective in PAIRED_PREFERENCE_OBJECTIVES:
        return ("preference",)
    if objective == "kto":
        return ("unpaired_preference",)
    return SUPERVISED_FORMATS


def _format_rule(when: str, check: Any, formats: tuple[str, ...], message: str) -> Rule:
    return Rule(
        cel=f"!({when}) || self.dataset.format == 'auto' || {_cel_in('self.dataset.format', formats)}",
        message=message,
        field_path=".dataset.format",
        check=lambda s: not check(s) or s.dataset.format == "auto" or s.dataset.format in formats,
    )


PREFERENCE_NEEDS_PAIRS = _format_rule(
    f"self.task == 'causal-lm' && {_cel_in('self.objective', PAIRED_PREFERENCE_OBJECTIVES)}",
    lambda s: s.task == "causal-lm" and s.objective in PAIRED_PREFERENCE_OBJECTIVES,
    ("preference",),
    "objectives dpo, orpo and reward train on preference pairs: set dataset.format to preference or"
    " auto (records with prompt, chosen and rejected), or objective to sft",
)
KTO_NEEDS_UNPAIRED = _format_rule(
    "self.objective == 'kto'",
    lambda s: s.objective == "kto",
    ("unpaired_preference",),
    "objective kto trains on unpaired records: set dataset.format to unpaired_preference or auto"
    " (records with prompt, completion and a boolean label)",
)
SFT_NEEDS_SUPERVISED = _format_rule(
    "self.task == 'causal-lm' && self.objective == 'sft'",
    lambda s: s.task == "causal-lm" and s.objective == "sft",
    SUPERVISED_FORMATS,
    "objective sft trains on supervised records: use dataset.format alpaca, chat, prompt_completion,"
    " text or auto, or set objective to dpo, orpo or reward for preference pairs and kto for unpaired"
    " ones, or task to sequence-classification for classification records",
)
CLASSIFICATION_NEEDS_LABELS = _format_rule(
    "self.task == 'sequence-classification'",
    lambda s: s.task == "sequence-classification",
    ("classification",),
    "task sequence-classification trains on labelled text: set dataset.format to classification or"
    " auto (records with text and label)",
)
CLASSIFICATION_IS_SUPERVISED = Rule(
    cel="self.task != 'sequence-classification' || self.objective == 'sft'",
    message=(
        "task sequence-classification trains on its labels with objective sft (the default):"
        " remove objective, or use task causal-lm"
    ),
    field_path=".objective",
    check=lambda s: s.task != "sequence-classification" or s.objective == "sft",
)
CLASSIFICATION_SETTINGS = Rule(
    cel="!has(self.classification) || self.task == 'sequence-classification'",
    message="classification settings apply to task sequence-classification only: set task, or remove them",
    field_path=".classification",
    check=lambda s: s.classification is None or s.task == "sequence-classification",
)
SAMPLES_NEED_CAUSAL_LM = Rule(
    cel="self.task == 'causal-lm' || !has(self.evaluation.samplePrompts)",
    message=(
        "evaluation.samplePrompts are generated by a causal-lm: remove them for task sequence-classification"
    ),
    field_path=".evaluation.samplePrompts",
    check=lambda s: s.task == "causal-lm" or s.evaluation.sample_prompts is None,
)


def _section_rule(section: str, attribute: str, objective: str) -> Rule:
    return Rule(
        cel=f"!has(self.{section}) || self.objective == '{objective}'",
        message=(
            f"{section} settings apply to objective {objective} only: set objective to {objective},"
            f" or remove the {section} section"
        ),
        field_path=f".{section}",
        check=lambda s: getattr(s, attribute) is None or s.objective == objective,
    )


#: Objectives whose batches are rows of one sequence each (packing and padding-free are SFT's).
UNPACKED = "self.task == 'sequence-classification' || self.objective != 'sft'"
NO_PACKING = Rule(
    cel=f"!({UNPACKED}) || !self.training.packing",
    message=(
        "training.packing is for objective sft on task causal-lm: the preference trainers batch a"
        " prompt with its responses and classification batches one text per row; set packing to false"
    ),
    field_path=".training.packing",
    check=lambda s: (
        not (s.task == "sequence-classification" or s.objective != "sft") or not s.training.packing
    ),
)
NO_PADDING_FREE = Rule(
    cel=f"!({UNPACKED}) || self.training.batching != 'padding-free'",
    message=(
        "training.batching padding-free is for objective sft on task causal-lm (the other trainers'"
        " collators pad): use auto, length-grouped or padded"
    ),
    field_path=".training.batching",
    check=lambda s: (
        not (s.task == "sequence-classification" or s.objective != "sft")
        or s.training.batching != "padding-free"
    ),
)
#: KTO's KL term pairs each prompt with another completion of the same per-device batch.
KTO_MIN_BATCH = 2
KTO_NEEDS_BATCHES = Rule(
    cel=f"self.objective != 'kto' || self.training.perDeviceTrainBatchSize >= {KTO_MIN_BATCH}",
    message=(
        "objective kto estimates its KL term by pairing each prompt with another completion of its"
        f" batch: set training.perDeviceTrainBatchSize to {KTO_MIN_BATCH} or more"
        " (gradientAccumulationSteps does not count)"
    ),
    field_path=".training.perDeviceTrainBatchSize",
    check=lambda s: s.objective != "kto" or s.training.per_device_train_batch_size >= KTO_MIN_BATCH,
)
#: The objective and task rules, shared by the spec and the trainer config.
OBJECTIVE_RULES = (
    KTO_NEEDS_BATCHES,
    PREFERENCE_NEEDS_PAIRS,
    KTO_NEEDS_UNPAIRED,
    SFT_NEEDS_SUPERVISED,
    CLASSIFICATION_NEEDS_LABELS,
    CLASSIFICATION_IS_SUPERVISED,
    CLASSIFICATION_SETTINGS,
    SAMPLES_NEED_CAUSAL_LM,
    _section_rule("dpo", "dpo", "dpo"),
    _section_rule("orpo", "orpo", "orpo"),
    _section_rule("kto", "kto", "kto"),
    NO_PACKING,
    NO_PADDING_FREE,
)


#: Settings that only run on a GPU, refused at apply time for a CPU job (resources.gpus 0).
FLASH_ATTENTION_NEEDS_GPU = Rule(
    cel="self.resources.gpus > 0 || self.training.attnImplementation != 'flash_attention_2'",
    message=(
        "training.attnImplementation flash_attention_2 needs a GPU (resources.gpus 0 is CPU):"
        " use auto or sdpa"
    ),
    field_path=".training.attnImplementation",
    check=lambda s: s.resources.gpus > 0 or s.training.attn_implementation != "flash_attention_2",
)
LIGER_NEEDS_GPU = Rule(
    cel="self.resources.gpus > 0 || !has(self.training.ligerKernel) || !self.training.ligerKernel",
    message="training.ligerKernel needs a GPU (resources.gpus 0 is CPU): unset it",
    field_path=".training.ligerKernel",
    check=lambda s: s.resources.gpus > 0 or not s.training.liger_kernel,
)
BITSANDBYTES_OPTIMIZER_NEEDS_GPU = Rule(
    cel=(
        "self.resources.gpus > 0 || !("
        + " || ".join(f"self.training.optim == '{name}'" for name in BITSANDBYTES_OPTIMIZERS)
        + ")"
    ),
    message=(
        "training.optim adamw_8bit and paged_* run on a GPU only (resources.gpus 0 is CPU):"
        " use auto or adamw_torch"
    ),
    field_path=".training.optim",
    check=lambda s: s.resources.gpus > 0 or s.training.optim not in BITSANDBYTES_OPTIMIZERS,
)


FSDP_NEEDS_GPUS = Rule(
    cel="self.distributed.strategy != 'fsdp' || self.resources.gpus > 1",
    message=(
        "distributed.strategy fsdp shards the model over 2 or more GPUs (accelerate runs FSDP on GPUs"
        " only): set resources.gpus to 2 or more, or use strategy ddp"
    ),
    field_path=".distributed.strategy",
    check=lambda s: s.distributed.strategy != "fsdp" or s.resources.gpus > 1,
)
FSDP_ACTIVATION_CHECKPOINTING_ALONE = Rule(
    cel=(
        "self.distributed.strategy != 'fsdp' || !has(self.distributed.fsdp) ||"
        " !self.distributed.fsdp.activationCheckpointing ||"
        " (has(self.training.gradientCheckpointing) && !self.training.gradientCheckpointing)"
    ),
    message=(
        "distributed.fsdp.activationCheckpointing replaces training.gradientCheckpointing (on by"
        " default on GPUs): set training.gradientCheckpointing to false"
    ),
    field_path=".training.gradientCheckpointing",
    check=lambda s: (
        s.distributed.strategy != "fsdp"
        or s.distributed.fsdp is None
        or not s.distributed.fsdp.activation_checkpointing
        or s.training.gradient_checkpointing is False
    ),
)


#: The optional (unset by default) sections of the training definition, by their API names.
OPTIONAL_SECTIONS = ("dpo", "orpo", "kto", "classification", "freeze", "promptTuning", "prefixTuning")


#: The message of the transition rule that keeps spec.cancel true once set.
CANCEL_IS_FINAL = (
    "cancel cannot be set back to false: a cancelled FineTuneJob never runs again;"
    " create a new FineTuneJob to train again"
)


class FineTuneJobSpec(ApiModel):
    """The desired fine-tuning run. The training definition (everything except suspend, cancel and
    lifecycle) is immutable once created: to change it, create a new FineTuneJob."""

    cel_rules = (
        *METHOD_RULES,
        EVAL_NEEDS_DATA,
        *OBJECTIVE_RULES,
        FLASH_ATTENTION_NEEDS_GPU,
        LIGER_NEEDS_GPU,
        BITSANDBYTES_OPTIMIZER_NEEDS_GPU,
        FSDP_NEEDS_GPUS,
        FSDP_ACTIVATION_CHECKPOINTING_ALONE,
        *(immutable_optional(section) for section in OPTIONAL_SECTIONS),
        immutable_optional("image"),
        immutable_optional("imagePullPolicy"),
        immutable_optional("imagePullSecrets"),
    )

    model: ModelSpec = Field(json_schema_extra=immutable("model"))
    """The base model to fine-tune."""
    dataset: DatasetSpec = Field(json_schema_extra=immutable("dataset"))
    """The training data, as JSON Lines (or JSON/Parquet) objects in object storage."""
    task: Task = Field(default="causal-lm", json_schema_extra=immutable("task"))
    """What the model is for. causal-lm: text generation (the default); sequence-classification:
    a classification head on the base model, trained on labelled text (dataset.format
    classification), judged by accuracy, precision, recall and F1."""
    objective: Objective = Field(default="sft", json_schema_extra=immutable("objective"))
    """What training optimizes. sft: supervised fine-tuning on the dataset's responses (or, for
    sequence-classification, its labels); dpo and orpo: preference optimization on pairs
    (dataset.format preference), dpo's reference being the frozen base model, orpo needing none;
    kto: on unpaired records labelled desirable or not (unpaired_preference); reward: a reward
    model (a one-score head) trained on preference pairs."""
    dpo: DpoSpec | None = Field(default=None, json_schema_extra=immutable("dpo"))
    """DPO settings (objective dpo only); unset: the defaults."""
    orpo: OrpoSpec | None = Field(default=None, json_schema_extra=immutable("orpo"))
    """ORPO settings (objective orpo only); unset: the defaults."""
    kto: KtoSpec | None = Field(default=None, json_schema_extra=immutable("kto"))
    """KTO settings (objective kto only); unset: the defaults."""
    classification: ClassificationSpec | None = Field(
        default=None, json_schema_extra=immutable("classification")
    )
    """The label set (task sequence-classification only); unset: discovered from the data."""
    method: Method = Field(default="qlora", json_schema_extra=immutable("method"))
    """Which parameters train. qlora: a LoRA adapter on the 4-bit quantized base model; lora: a
    LoRA adapter on the base at 16 (or 8) bits; full: every weight (writes a complete model);
    freeze: only the modules or last layers the freeze section names (writes a complete model);
    prompt-tuning and prefix-tuning: virtual tokens (writes a peft adapter; the weights stay)."""
    freeze: FreezeSpec | None = Field(default=None, json_schema_extra=immutable("freeze"))
    """What method freeze trains (required with it, refused without it)."""
    prompt_tuning: PromptTuningSpec | None = Field(default=None, json_schema_extra=immutable("promptTuning"))
    """Prompt tuning settings (method prompt-tuning only); unset: the defaults."""
    prefix_tuning: PrefixTuningSpec | None = Field(default=None, json_schema_extra=immutable("prefixTuning"))
    """Prefix tuning settings (method prefix-tuning only); unset: the defaults."""
    quantization: QuantizationSpec = Field(
        default=QuantizationSpec(), json_schema_extra=immutable("quantization")
    )
    """How the base model is quantized while training (bitsandbytes)."""
    lora: LoraSpec = Field(default=LoraSpec(), json_schema_extra=immutable("lora"))
    """The LoRA adapter (peft)."""
    training: TrainingSpec = Field(default=TrainingSpec(), json_schema_extra=immutable("training"))
    """Training hyperparameters (transformers TrainingArguments / TRL SFTConfig)."""
    output: OutputSpec = Field(json_schema_extra=immutable("output"))
    """Where the result goes."""
    evaluation: EvaluationSpec = Field(default=EvaluationSpec(), json_schema_extra=immutable("evaluation"))
    """Sample generations after training (task causal-lm), with and without the trained weights."""
    storage: StorageSpec = Field(default=StorageSpec(), json_schema_extra=immutable("storage"))
    """The S3-compatible object storage holding the dataset, (optionally) the model and the output.
    Credentials come from a Secret reference or the pod's cloud identity; never inline."""
    tracking: TrackingSpec = Field(default=TrackingSpec(), json_schema_extra=immutable("tracking"))
    """Experiment tracking: TensorBoard event files under the output, and an MLflow run."""
    resources: ResourcesSpec = Field(default=ResourcesSpec(), json_schema_extra=immutable("resources"))
    """Compute for the trainer pod."""
    distributed: DistributedSpec = Field(
        default=DistributedSpec(), json_schema_extra=immutable("distributed")
    )
    """How the trainer's processes share the work: ddp (the default) or fsdp for models that do
    not fit one GPU."""
    scheduling: SchedulingSpec = Field(default=SchedulingSpec(), json_schema_extra=immutable("scheduling"))
    """Where and when the trainer pod may run."""
    identity: IdentitySpec = Field(default=IdentitySpec(), json_schema_extra=immutable("identity"))
    """The trainer pod's identity: the Kubernetes ServiceAccount it runs as, and through it the cloud
    identity (IRSA, GKE or Azure workload identity) that object storage sees."""
    image: ImageReference | None = None
    """Trainer image, by tag or by digest (repository@sha256:…); defaults to the operator's
    configured trainer image."""
    image_pull_policy: PullPolicy | None = None
    """Pull policy of the trainer image; unset uses the Kubernetes default."""
    image_pull_secrets: tuple[LocalObjectReference, ...] | None = Field(default=None, max_length=8)
    """Secrets for pulling the trainer image from a private registry."""
    suspend: bool = False
    """true stops the trainer pod (checkpoints in object storage are kept; phase Suspended); false
    runs or resumes it. Editable at any time."""
    cancel: bool = Field(default=False, json_schema_extra=cel("self || !oldSelf", CANCEL_IS_FINAL))
    """true stops the run for good: the trainer pod gets SIGTERM (it saves a checkpoint), the
    trainer Job is deleted, the FineTuneJob, its status and its checkpoints are kept (phase
    Cancelled). Cannot be set back to false, and spec.suspend no longer does anything. A run that
    already Succeeded or Failed keeps that outcome."""
    lifecycle: LifecycleSpec = LifecycleSpec()
    """Limits of the run. Editable at any time; applied to the Job."""
