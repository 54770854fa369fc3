"""The base model, its tokenizer, quantization and the LoRA adapter config."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.spec import ModelSpec, quantization_bits
from kubetune_api.trainer import TrainerConfig

from .errors import ObjectAccessError
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


def resolve_source(spec: ModelSpec, store: ObjectStore, work_dir: Path) -> str:
    """A local folder for an ``s3://`` model (downloaded once), else the hub id itself."""
    if not spec.is_s3:
        return spec.source
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


def load_model(
    source: str,
    cfg: TrainerConfig,
    precision: PrecisionChoice,
    gradient_checkpointing: bool,
    attn_implementation: str,
) -> Any:
    """Load the base model (quantized for qlora) with the chosen attention kernel and prepare it for
    k-bit training."""
    import torch
    from accelerate import PartialState
    from transformers import AutoModelForCausalLM

    quant = quantization_config(cfg, precision)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        revision=cfg.model.revision,
        token=hub_token(),
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=getattr(torch, precision.torch_dtype_name),
        quantization_config=quant,
        attn_implementation=attn_implementation,
        device_map={"": PartialState().device} if quant is not None else None,
    )
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    # No KV cache while training: with one, transformers skips the block-diagonal mask that keeps
    # the rows of a padding-free batch apart on sdpa and eager (batching.check_rows_kept_apart).
    model.config.use_cache = False
    return model


def lora_config(cfg: TrainerConfig) -> Any:
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    return LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules="all-linear" if targets == ("all-linear",) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def adapter_dtype_fix(model: Any, precision: PrecisionChoice) -> None:
    """Keep trainable adapter weights in fp32 unless training in bf16.

    TRL casts a quantized model's adapter to bf16 (the QLoRA paper's choice); on
    a GPU without bf16 or a CPU without native bf16 that is slow or unsupported.
    """
    import torch

    if precision.precision == "bf16":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.to(torch.float32)
