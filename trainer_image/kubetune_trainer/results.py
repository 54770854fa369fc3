"""The final result in object storage, with ``manifest.json`` written last.

Layout under ``output.uri`` (next to ``checkpoints/``)::

    adapter_model.safetensors, adapter_config.json   the LoRA adapter
    tokenizer files                                   tokenizer.json, tokenizer_config.json, ...
    trainer_config.json                               the resolved config
    metrics.json                                      loss history, eval loss, tokens/s, runtime, data stats
    README.md                                         model card
    merged/                                           the merged model, when output.mergeAdapter
    manifest.json                                     every file above: size and sha256 -- LAST
"""

from __future__ import annotations

import hashlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.trainer import TrainerConfig

from .hardware import PrecisionChoice
from .storage import ObjectStore, join_uri

log = logging.getLogger(__name__)

MANIFEST = wellknown.MANIFEST


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Every file under ``folder`` with its size and sha256, sorted by path."""
    files = [
        {"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    ]
    return {"version": wellknown.MANIFEST_VERSION, **extra, "files": files}


def model_card(cfg: TrainerConfig, metrics: dict[str, Any]) -> str:
    lora = cfg.lora
    final_loss = metrics.get("trainLoss")
    eval_loss = metrics.get("evalLoss")
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {cfg.model.source}",
        "tags: [kubetune, lora, sft, trl]",
        "---",
        "",
        "# LoRA adapter trained by kubetune",
        "",
        f"- Base model: `{cfg.model.source}`"
        + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        f"- Method: {cfg.method}; LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
        f"targets={', '.join(lora.target_modules)}",
        f"- Dataset: `{cfg.dataset.train}` (format {metrics.get('datasetFormat')})",
        f"- Steps: {metrics.get('globalStep')}, epochs: {metrics.get('epoch')}, "
        f"precision: {metrics.get('precision')}",
        f"- Final train loss: {final_loss}" + (f", eval loss: {eval_loss}" if eval_loss is not None else ""),
        "",
        "## Use",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{cfg.model.source}")',
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        'tokenizer = AutoTokenizer.from_pretrained("<this folder>")',
        "```",
        "",
        "`manifest.json` lists every file with its size and sha256.",
        "",
    ]
    return "\n".join(lines)


def write_local(
    folder: Path, cfg: TrainerConfig, model: Any | None, tokenizer: Any, metrics: dict[str, Any]
) -> None:
    """Write the adapter (unless ``model`` is None: saved already, as under FSDP), tokenizer, config,
    metrics and model card into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / wellknown.RESOLVED_CONFIG).write_text(cfg.to_resolved_json() + "\n")
    (folder / wellknown.METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    (folder / wellknown.MODEL_CARD).write_text(model_card(cfg, metrics))


def merge_adapter(base_source: str, folder: Path, cfg: TrainerConfig, precision: PrecisionChoice) -> None:
    """Reload the base unquantized, merge the adapter saved in ``folder``, save to ``folder/merged``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(
        base_source,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=getattr(torch, precision.torch_dtype_name),
    )
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged.save_pretrained(str(folder / wellknown.MERGED_DIR), safe_serialization=True)
    log.info("result: merged model saved (%s)", precision.torch_dtype_name)


def publish(
    store: ObjectStore, folder: Path, output_uri: str, fingerprint: str | None = None
) -> dict[str, Any]:
    """Upload ``folder``, then its manifest last (naming the run); returns the manifest.

    Each object waits out an unavailable store (``ObjectStore.ride_out``): a restart of the store
    during the publish delays it instead of failing a run whose training is done.
    """
    extra: dict[str, Any] = {"outputUri": output_uri}
    if fingerprint:
        extra["fingerprint"] = fingerprint
    manifest = build_manifest(folder, extra)
    for entry in manifest["files"]:
        uri = join_uri(output_uri, entry["path"])
        store.ride_out(f"upload of {uri}", partial(store.upload_file, folder / entry["path"], uri))
    body, manifest_uri = json.dumps(manifest, indent=2).encode(), join_uri(output_uri, MANIFEST)
    store.ride_out(
        f"upload of {manifest_uri}", partial(store.put_bytes, manifest_uri, body, "application/json")
    )
    log.info("result: %d files and %s written to %s", len(manifest["files"]), MANIFEST, output_uri)
    return manifest
