"""The final result in object storage, with ``manifest.json`` written last.

Layout under ``output.uri`` (next to ``checkpoints/``)::

    adapter_model.safetensors, adapter_config.json   the LoRA adapter
    tokenizer files                                   tokenizer.json, tokenizer_config.json, ...
    trainer_config.json                               the resolved config
    metrics.json                                      loss histories, eval loss, tokens/s, runtime, data stats
    loss.png                                          train (and eval) loss by step, when it could be drawn
    README.md                                         model card
    merged/                                           the merged model, when output.mergeAdapter
    manifest.json                                     every file above: size and sha256 -- LAST
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.spec import DpoSpec
from kubetune_api.trainer import TrainerConfig

from . import lossplot
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


def local_folder(cfg: TrainerConfig) -> str:
    """The folder the card's snippet downloads the output into: the job's name, else the
    output prefix's last segment (a path the user can paste as it is)."""
    name = cfg.reporting.name or cfg.output.uri.rstrip("/").rsplit("/", 1)[-1] or "output"
    return f"./{name}"


#: Where the card's snippet downloads an ``s3://`` base model.
BASE_FOLDER = "./base-model"


def download_commands(cfg: TrainerConfig) -> list[str]:
    """Shell lines that fetch what the snippet loads: ``from_pretrained`` reads local folders and
    hub ids, not ``s3://``. ``checkpoints/`` is left out (it is not the result)."""
    dest = local_folder(cfg)
    endpoint = f" --endpoint-url {shlex.quote(cfg.storage.endpoint)}" if cfg.storage.endpoint else ""
    lines = []
    if cfg.reporting.name:
        namespace = f" -n {shlex.quote(cfg.reporting.namespace)}" if cfg.reporting.namespace else ""
        lines += [
            f"kubetune download {shlex.quote(cfg.reporting.name)} {shlex.quote(dest)}{namespace}"
            "   # every file checked against manifest.json",
            "# or with the AWS CLI:",
        ]
    lines.append(
        f"aws s3 sync {shlex.quote(cfg.output.uri)} {shlex.quote(dest)} --exclude 'checkpoints/*'{endpoint}"
    )
    if cfg.model.is_s3:
        lines += [
            "# the base model is in object storage too:",
            f"aws s3 sync {shlex.quote(cfg.model.source)} {BASE_FOLDER}{endpoint}",
        ]
    return lines


def _load_args(cfg: TrainerConfig, folder: str, *, base: bool = False) -> str:
    """``from_pretrained``'s arguments as Python source: the folder (or hub id), the base's
    revision, ``trust_remote_code`` when the run needed it."""
    args = [json.dumps(folder)]
    if base and cfg.model.revision:
        args.append(f"revision={json.dumps(cfg.model.revision)}")
    if cfg.model.trust_remote_code:
        args.append("trust_remote_code=True")
    return ", ".join(args)


def usage_snippets(cfg: TrainerConfig) -> list[tuple[str, list[str]]]:
    """``(title, python lines)`` for each way to load the downloaded output."""
    dest = local_folder(cfg)
    base = BASE_FOLDER if cfg.model.is_s3 else cfg.model.source
    adapter = [
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({_load_args(cfg, base, base=True)})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(dest)})",
        f"tokenizer = AutoTokenizer.from_pretrained({_load_args(cfg, dest)})",
    ]
    found = [("The adapter on its base model", adapter)]
    if cfg.output.merge_adapter:
        merged = f"{dest}/{wellknown.MERGED_DIR}"
        found.append(
            (
                "The merged model, on its own (no base model or peft needed)",
                [
                    "from transformers import AutoModelForCausalLM, AutoTokenizer",
                    "",
                    f"model = AutoModelForCausalLM.from_pretrained({_load_args(cfg, merged)})",
                    f"tokenizer = AutoTokenizer.from_pretrained({_load_args(cfg, merged)})",
                ],
            )
        )
    return found


def _usage_section(cfg: TrainerConfig) -> list[str]:
    lines = [
        "## Use",
        "",
        "Download this output first (`from_pretrained` cannot read `s3://`):",
        "",
        "```shell",
        *download_commands(cfg),
        "```",
        "",
    ]
    for title, code in usage_snippets(cfg):
        lines += [f"{title}:", "", "```python", *code, "```", ""]
    return lines


def _objective_lines(cfg: TrainerConfig, metrics: dict[str, Any]) -> list[str]:
    """What a DPO run optimized and how it ended; nothing for sft (its card is unchanged)."""
    if cfg.objective != "dpo":
        return []
    dpo = cfg.dpo or DpoSpec()
    return [
        f"- Objective: dpo (loss {dpo.loss_type}, beta {dpo.beta}; reference: the base model)",
        f"- Final reward accuracy: {metrics.get('rewardAccuracy')}, margin: {metrics.get('rewardMargin')}",
    ]


def model_card(cfg: TrainerConfig, metrics: dict[str, Any], plot: bool = False) -> str:
    """The README.md a user reads first: what was trained, the loss curve (``plot``: loss.png was
    written) and code that loads the output as published."""
    lora = cfg.lora
    final_loss = metrics.get("trainLoss")
    eval_loss = metrics.get("evalLoss")
    lines = [
        "---",
        "library_name: peft",
        # The hub's metadata names a hub model; an s3:// base is named in the text below.
        *([] if cfg.model.is_s3 else [f"base_model: {cfg.model.source}"]),
        f"tags: [kubetune, lora, {cfg.objective}, trl]",
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
        *_objective_lines(cfg, metrics),
        "",
    ]
    if plot:
        lines += ["## Loss", "", f"![loss]({lossplot.LOSS_PLOT})", ""]
    lines += _usage_section(cfg)
    lines += ["`manifest.json` lists every file with its size and sha256.", ""]
    return "\n".join(lines)


def write_local(
    folder: Path, cfg: TrainerConfig, model: Any | None, tokenizer: Any, metrics: dict[str, Any]
) -> None:
    """Write the adapter (unless ``model`` is None: saved already, as under FSDP), tokenizer, config,
    metrics, loss plot (when it can be drawn) and model card into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / wellknown.RESOLVED_CONFIG).write_text(cfg.to_resolved_json() + "\n")
    (folder / wellknown.METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    plotted = lossplot.write(folder, metrics)
    (folder / wellknown.MODEL_CARD).write_text(model_card(cfg, metrics, plot=plotted))


def merge_adapter(base_source: str, folder: Path, cfg: TrainerConfig, precision: PrecisionChoice) -> None:
    """Reload the base unquantized, merge the adapter saved in ``folder``, save to ``folder/merged``
    with the tokenizer (and chat template) saved next to the adapter, so ``merged/`` loads on its
    own with AutoTokenizer and AutoModelForCausalLM."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(
        base_source,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=getattr(torch, precision.torch_dtype_name),
    )
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged_dir = folder / wellknown.MERGED_DIR
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    # The tokenizer as trained (pad token, kubetune's default chat template when the base had none).
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.save_pretrained(str(merged_dir))
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
