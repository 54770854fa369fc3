"""The base model, its tokenizer, quantization, and which parameters train (the method).

qlora and lora train a LoRA adapter, prompt-tuning and prefix-tuning peft's virtual tokens
(:func:`peft_config`); full trains every weight and freeze the ones :func:`trainable_names`
picks (no peft config: the TRL trainers take ``peft_config=None``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.spec import (
    ADAPTER_METHODS,
    LORA_METHODS,
    FreezeSpec,
    ModelSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
    quantity_value,
    quantization_bits,
)
from kubetune_api.trainer import TrainerConfig

from . import modelcache
from .errors import InvalidConfigError, ObjectAccessError
from .hardware import PrecisionChoice
from .storage import ObjectStore

log = logging.getLogger(__name__)

#: The chat template used when the tokenizer has none. Simple role headers, the
#: assistant turn ends with the EOS token; ``{% generation %}`` marks the tokens the
#: loss covers (TRL's assistant-only loss). Saved with the adapter for inference.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|assistant|>\n' }}{% generation %}{{- message['content'] + eos_token }}{% endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- '<|' + message['role'] + '|>\n' + message['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\n' }}{%- endif %}"
)


def hub_token() -> str | None:
    """The hub token the operator mounts from ``model.tokenSecretRef`` (None: huggingface_hub's own
    lookup, $HF_TOKEN or its token file, applies)."""
    path = os.environ.get(wellknown.ENV_HUB_TOKEN_PATH)
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8").strip() or None
    return None


def resolve_source(spec: ModelSpec, store: ObjectStore, work_dir: Path, cache_dir: str | None = None) -> str:
    """A local folder for an ``s3://`` model (downloaded once, into the model cache when the job
    has one), else the hub id itself."""
    if not spec.is_s3:
        return spec.source
    if cache_dir is not None:
        max_size = None if spec.cache is None else spec.cache.max_size
        max_bytes = None if max_size is None else int(quantity_value(max_size))
        try:
            return str(modelcache.fetch(store, spec.source, Path(cache_dir), max_bytes))
        except ObjectAccessError as err:
            raise ObjectAccessError(
                spec.source, f"{err.reason}: model.source must name a folder written by save_pretrained"
            ) from err
    dest = work_dir / "base-model"
    if not (dest / "config.json").exists():
        try:
            files = store.download_folder(spec.source, dest)
        except ObjectAccessError as err:
            raise ObjectAccessError(
                spec.source, f"{err.reason}: model.source must name a folder written by save_pretrained"
            ) from err
        log.info("model: downloaded %d files from %s", len(files), spec.source)
    return str(dest)


def load_tokenizer(source: str, spec: ModelSpec) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, token=hub_token(), trust_remote_code=spec.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        log.info("tokenizer: no chat template, using kubetune's default (see docs/trainer.md)")
    return tokenizer


def quantization_config(cfg: TrainerConfig, precision: PrecisionChoice) -> Any | None:
    """bitsandbytes config: 4-bit for qlora, 8-bit for lora with bits 8, else None."""
    import torch
    from transformers import BitsAndBytesConfig

    quant, fsdp = cfg.quantization, cfg.distributed.strategy == "fsdp"
    if cfg.method == "qlora":
        compute = precision.torch_dtype_name if quant.compute_dtype == "auto" else quant.compute_dtype
        return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type=quant.quant_type,
            bnb_4bit_use_double_quant=quant.double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute),
            # FSDP shards floating-point tensors only: 4-bit weights stored as the compute dtype
            # are sharded with the rest (the default, uint8, would leave them out).
            **({"bnb_4bit_quant_storage": getattr(torch, compute)} if fsdp else {}),
        )
    if quantization_bits(cfg.method, quant) == 8:
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return None


def head_arguments(cfg: TrainerConfig, labels: Sequence[str] = ()) -> dict[str, Any]:
    """from_pretrained's arguments for the model's head: a classifier over ``labels`` (task
    sequence-classification), one score (objective reward); none for a causal LM."""
    if cfg.task == "sequence-classification":
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }
    if cfg.objective == "reward":
        return {"num_labels": 1}
    return {}


def load_model(
    source: str,
    cfg: TrainerConfig,
    precision: PrecisionChoice,
    gradient_checkpointing: bool,
    attn_implementation: str,
    *,
    labels: Sequence[str] = (),
) -> Any:
    """Load the base model (quantized for qlora) with the chosen attention kernel and prepare it for
    k-bit training: a causal LM, or with a new sequence-classification head (``labels``' classes;
    one score for objective reward), whose weights start random."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, set_seed

    quant = quantization_config(cfg, precision)
    head = head_arguments(cfg, labels)
    auto: Any = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    if head:  # the new head's random weights: the same for the same training.seed
        set_seed(cfg.training.seed)
    model = auto.from_pretrained(
        source,
        revision=cfg.model.revision,
        token=hub_token(),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=getattr(torch, precision.torch_dtype_name),
        quantization_config=quant,
        attn_implementation=attn_implementation,
        device_map={"": PartialState().device} if quant is not None else None,
        **head,
    )
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    # No KV cache while training: with one, transformers skips the block-diagonal mask that keeps
    # the rows of a padding-free batch apart on sdpa and eager (batching.check_rows_kept_apart).
    model.config.use_cache = False
    if cfg.method == "freeze":
        apply_freeze(model, cfg)
    return model


#: The hidden size of prefix tuning's reparameterization MLP (prefixTuning.projection): the
#: prefix-tuning paper's 512; only the prefix it computes is saved.
PREFIX_PROJECTION_HIDDEN = 512


def peft_task_type(cfg: TrainerConfig) -> str:
    """peft's task type: a classification (or one-score reward) head, else causal LM."""
    return "SEQ_CLS" if cfg.task == "sequence-classification" or cfg.objective == "reward" else "CAUSAL_LM"


def peft_config(cfg: TrainerConfig, tokenizer_path: str) -> Any | None:
    """The peft config for the method: LoRA (qlora, lora), prompt tuning, prefix tuning; None for
    full and freeze (no adapter: the model's own weights train). ``tokenizer_path``: where prompt
    tuning's initText is tokenized (the base's folder or hub id; the hub token, if any, is found by
    huggingface_hub through $HF_TOKEN_PATH, so none is written into the adapter's config)."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig

    if cfg.method == "prompt-tuning":
        spec = cfg.prompt_tuning or PromptTuningSpec()
        text, revision = spec.init_text, cfg.model.revision
        return PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=spec.num_virtual_tokens,
            prompt_tuning_init="RANDOM" if text is None else "TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path=None if text is None else tokenizer_path,
            tokenizer_kwargs={"revision": revision} if text is not None and revision else None,
        )
    if cfg.method == "prefix-tuning":
        prefix = cfg.prefix_tuning or PrefixTuningSpec()
        return PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=prefix.num_virtual_tokens,
            prefix_projection=prefix.projection,
            encoder_hidden_size=PREFIX_PROJECTION_HIDDEN,
        )
    if cfg.method not in LORA_METHODS:
        return None
    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias="none",
        task_type=peft_task_type(cfg),
    )


def reference_init_kwargs(cfg: TrainerConfig) -> dict[str, Any]:
    """from_pretrained's arguments for the frozen reference copy that TRL's DPO and KTO trainers
    load when no adapter trains (full, freeze; with an adapter the reference is the base with it
    disabled, and nothing is loaded): the policy's revision and trust_remote_code, which TRL would
    otherwise leave at the hub's default branch and False. TRL takes the dtype and attention from
    the policy, and huggingface_hub finds a hub token through $HF_TOKEN_PATH."""
    if cfg.method in ADAPTER_METHODS:
        return {}
    revision = {"revision": cfg.model.revision} if cfg.model.revision else {}
    return {**revision, "trust_remote_code": cfg.model.trust_remote_code}


# -- method freeze ---------------------------------------------------------------------------------
def matches_module(name: str, module: str) -> bool:
    """Whether the dotted parameter ``name`` contains ``module`` as whole dotted parts:
    ``norm`` matches ``model.norm.weight``, not ``model.layers.0.input_layernorm.weight``."""
    parts, wanted = name.split("."), module.split(".")
    return any(parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1))


@dataclass(frozen=True)
class LayerStack:
    """The model's transformer layers: the ModuleList's dotted name and its length."""

    prefix: str
    count: int


def trainable_names(
    names: Sequence[str], spec: FreezeSpec, layers: LayerStack | None, head: Sequence[str] = ()
) -> set[str]:
    """The parameters method freeze trains: those matching ``spec.trainableModules``, or those of
    the last ``spec.trainableLayers`` layers; plus ``head`` (a classification head, which starts
    untrained). Raises InvalidConfigError (exit 43) for a module that matches nothing or more
    layers than the model has."""
    if spec.trainable_modules is not None:
        unmatched = [m for m in spec.trainable_modules if not any(matches_module(n, m) for n in names)]
        if unmatched:
            raise InvalidConfigError(
                f"freeze.trainableModules {', '.join(unmatched)} match(es) no parameter of the model;"
                f" its modules are named like {_module_examples(names)}"
            )
        chosen = {n for n in names if any(matches_module(n, m) for m in spec.trainable_modules)}
    else:
        wanted = spec.trainable_layers or 0
        if layers is None:
            raise InvalidConfigError(
                "freeze.trainableLayers: the model's transformer layers were not found (no ModuleList of"
                " config.num_hidden_layers layers); name them with freeze.trainableModules instead"
            )
        if wanted > layers.count:
            raise InvalidConfigError(
                f"freeze.trainableLayers is {wanted} but the model has {layers.count} layers"
                f" ({layers.prefix}): set it to at most {layers.count}"
            )
        last = {f"{layers.prefix}.{i}" for i in range(layers.count - wanted, layers.count)}
        chosen = {n for n in names if any(n.startswith(p + ".") for p in last)}
    return chosen | set(head)


def _module_examples(names: Sequence[str], shown: int = 6) -> str:
    """A few distinct module names (parameter names without the ``.weight``/``.bias``)."""
    modules = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))
    return ", ".join(modules[:shown]) + (", ..." if len(modules) > shown else "")


def find_layers(model: Any) -> LayerStack | None:
    """The outermost ModuleList holding config.num_hidden_layers modules (``model.layers`` in
    Llama, ``transformer.h`` in GPT-2, ``bert.encoder.layer`` in BERT)."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count and name:
            return LayerStack(name, len(module))
    return None


def head_names(model: Any, cfg: TrainerConfig) -> list[str]:
    """The classification (or reward) head's parameters: those outside the base model (``score``,
    ``classifier``); none for a causal LM, whose output head is frozen with the rest."""
    if peft_task_type(cfg) != "SEQ_CLS":
        return []
    prefix = getattr(model, "base_model_prefix", "") + "."
    return [n for n, _ in model.named_parameters() if not n.startswith(prefix)]


def apply_freeze(model: Any, cfg: TrainerConfig) -> None:
    """Method freeze: requires_grad only on what :func:`trainable_names` picks; before training,
    so a selection that matches nothing fails (exit 43) before any step."""
    assert cfg.freeze is not None  # the API requires the section with method freeze
    params = dict(model.named_parameters())
    chosen = trainable_names(list(params), cfg.freeze, find_layers(model), head_names(model, cfg))
    for name, param in params.items():
        param.requires_grad_(name in chosen)
    trained = sum(params[n].numel() for n in chosen)
    total = sum(p.numel() for p in params.values())
    log.info(
        "freeze: training %d of %d parameters (%.1f %%) in %d tensors",
        trained,
        total,
        100 * trained / max(total, 1),
        len(chosen),
    )


def adapter_dtype_fix(model: Any, precision: PrecisionChoice) -> None:
    """Keep every trainable weight in fp32 unless training in bf16: an adapter's, and with full or
    freeze the model's own trained weights (the frozen ones keep the loaded dtype).

    TRL casts a quantized model's adapter to bf16 (the QLoRA paper's choice); on a GPU without
    bf16 or a CPU without native bf16 that is slow or unsupported. fp16 mixed precision needs
    fp32 trained weights (AMP's gradient scaler refuses fp16 ones), and full and freeze load the
    model in fp16 there. (The name is older than full and freeze; bench/gpu calls it.)
    """
    import torch

    if precision.precision == "bf16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
