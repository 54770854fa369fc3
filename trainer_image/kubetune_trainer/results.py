"""The final result in object storage, with ``manifest.json`` written last.

Layout under ``output.uri`` (next to ``checkpoints/``)::

    adapter_model.safetensors, adapter_config.json   the adapter (qlora, lora, prompt-tuning, prefix-tuning)
    model.safetensors, config.json, ...               or the complete model (full, freeze)
    tokenizer files                                   tokenizer.json, tokenizer_config.json, ...
    trainer_config.json                               the resolved config
    metrics.json                                      loss histories, eval loss, tokens/s, runtime, data stats
    loss.png                                          train (and eval) loss by step, when it could be drawn
    samples.jsonl                                     prompts answered by the base and the trained model
    README.md                                         model card
    merged/                                           the merged model, when output.mergeAdapter
    manifest.json                                     every file above: size and sha256 -- LAST
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.spec import (
    ADAPTER_METHODS,
    LORA_METHODS,
    DpoSpec,
    KtoSpec,
    OrpoSpec,
    PrefixTuningSpec,
    PromptTuningSpec,
)
from kubetune_api.trainer import TrainerConfig

from . import lossplot, modeling, samples
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
    if cfg.model.is_s3 and writes_adapter(cfg):
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


def writes_adapter(cfg: TrainerConfig) -> bool:
    """Whether the output is a peft adapter (loaded on its base) rather than a complete model
    (full, freeze)."""
    return cfg.method in ADAPTER_METHODS


def auto_class(cfg: TrainerConfig) -> str:
    """The transformers class that loads the trained model: a classification (or reward) head,
    else a causal LM."""
    return (
        "AutoModelForSequenceClassification"
        if modeling.peft_task_type(cfg) == "SEQ_CLS"
        else "AutoModelForCausalLM"
    )


def head_source(cfg: TrainerConfig, labels: Sequence[str]) -> str:
    """The base classifier's from_pretrained arguments for its head, as Python source (an adapter's
    base has none of its own): ``labels``' classes, or one score (objective reward)."""
    if modeling.peft_task_type(cfg) != "SEQ_CLS":
        return ""
    if cfg.objective == "reward":
        return ", num_labels=1, pad_token_id=tokenizer.pad_token_id"
    id2label = "{" + ", ".join(f"{i}: {json.dumps(name)}" for i, name in enumerate(labels)) + "}"
    return f", num_labels={len(labels)}, id2label={id2label}, pad_token_id=tokenizer.pad_token_id"


def usage_snippets(cfg: TrainerConfig, labels: Sequence[str] = ()) -> list[tuple[str, list[str]]]:
    """``(title, python lines)`` for each way to load the downloaded output (``labels``: a
    classifier's class names, which its adapter's base needs)."""
    dest, cls = local_folder(cfg), auto_class(cfg)
    if not writes_adapter(cfg):
        return [
            (
                "The fine-tuned model, on its own (no base model or peft needed)",
                [
                    f"from transformers import {cls}, AutoTokenizer",
                    "",
                    f"model = {cls}.from_pretrained({_load_args(cfg, dest)})",
                    f"tokenizer = AutoTokenizer.from_pretrained({_load_args(cfg, dest)})",
                ],
            )
        ]
    base = BASE_FOLDER if cfg.model.is_s3 else cfg.model.source
    adapter = [
        "from peft import PeftModel",
        f"from transformers import {cls}, AutoTokenizer",
        "",
        f"base = {cls}.from_pretrained({_load_args(cfg, base, base=True)}{head_source(cfg, labels)})",
        f"model = PeftModel.from_pretrained(base, {json.dumps(dest)})",
        f"tokenizer = AutoTokenizer.from_pretrained({_load_args(cfg, dest)})",
    ]
    if head_source(cfg, labels):  # the head's arguments name the tokenizer's pad token: load it first
        adapter.insert(2, adapter.pop())
    found = [("The adapter on its base model", adapter)]
    if cfg.output.merge_adapter:
        merged = f"{dest}/{wellknown.MERGED_DIR}"
        found.append(
            (
                "The merged model, on its own (no base model or peft needed)",
                [
                    f"from transformers import {cls}, AutoTokenizer",
                    "",
                    f"model = {cls}.from_pretrained({_load_args(cfg, merged)})",
                    f"tokenizer = AutoTokenizer.from_pretrained({_load_args(cfg, merged)})",
                ],
            )
        )
    return found


def _usage_section(cfg: TrainerConfig, labels: Sequence[str] = ()) -> list[str]:
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
    for title, code in usage_snippets(cfg, labels):
        lines += [f"{title}:", "", "```python", *code, "```", ""]
    return lines


def _objective_lines(cfg: TrainerConfig, metrics: dict[str, Any]) -> list[str]:
    """What a preference run (dpo, orpo, kto) optimized and how it ended; nothing for sft (its card
    is unchanged) or reward (:func:`_head_lines`)."""
    margin = f"margin: {metrics.get('rewardMargin')}"
    if cfg.objective == "dpo":
        dpo = cfg.dpo or DpoSpec()
        setting = f"loss {dpo.loss_type}, beta {dpo.beta}; reference: the base model"
        result = f"- Final reward accuracy: {metrics.get('rewardAccuracy')}, {margin}"
    elif cfg.objective == "orpo":
        setting = f"beta {(cfg.orpo or OrpoSpec()).beta}; no reference model"
        result = f"- Final reward accuracy: {metrics.get('rewardAccuracy')}, {margin}"
    elif cfg.objective == "kto":
        kto = cfg.kto or KtoSpec()
        setting = (
            f"beta {kto.beta}, desirable weight {kto.desirable_weight}, undesirable weight"
            f" {kto.undesirable_weight}; reference: the base model"
        )
        result = (
            f"- Final rewards: desirable {metrics.get('rewardChosen')},"
            f" undesirable {metrics.get('rewardRejected')}, {margin}"
        )
    else:
        return []
    return [f"- Objective: {cfg.objective} ({setting})", result]


def _head_lines(cfg: TrainerConfig, metrics: dict[str, Any]) -> list[str]:
    """A classifier's labels and validation metrics, a reward model's accuracy; nothing else."""
    if cfg.task == "sequence-classification":
        names = metrics.get("labels") or []
        lines = [f"- Task: sequence-classification, {len(names)} labels: {', '.join(map(str, names))}"]
        if metrics.get("evalAccuracy") is not None:
            figures = ", ".join(
                f"{what} {metrics[key]:.4f}"
                for what, key in (
                    ("accuracy", "evalAccuracy"),
                    ("precision", "evalPrecision"),
                    ("recall", "evalRecall"),
                    ("F1", "evalF1"),
                )
            )
            lines.append(f"- Validation (macro averages): {figures}; the confusion matrix is in metrics.json")
        return lines
    if cfg.objective == "reward":
        return [
            "- Objective: reward (a reward model: one score per text, higher for the preferred response)",
            f"- Reward accuracy: {metrics.get('rewardAccuracy')} (training),"
            f" {metrics.get('evalRewardAccuracy')} (validation); margin: {metrics.get('rewardMargin')}",
        ]
    return []


#: How many samples the model card shows (samples.jsonl has them all).
CARD_SAMPLES = 3


def _title(cfg: TrainerConfig) -> str:
    return {
        "full": "Model fine-tuned by kubetune (every weight)",
        "freeze": "Model fine-tuned by kubetune (selected layers)",
        "prompt-tuning": "Prompt-tuning adapter trained by kubetune",
        "prefix-tuning": "Prefix-tuning adapter trained by kubetune",
    }.get(cfg.method, "LoRA adapter trained by kubetune")


def _method_line(cfg: TrainerConfig) -> str:
    """What trained, in the method's own terms."""
    if cfg.method in LORA_METHODS:
        lora = cfg.lora
        return (
            f"- Method: {cfg.method}; LoRA r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, "
            f"targets={', '.join(lora.target_modules)}"
        )
    if cfg.method == "freeze" and cfg.freeze is not None:
        modules = cfg.freeze.trainable_modules
        what = f"the last {cfg.freeze.trainable_layers} layers" if modules is None else ", ".join(modules)
        return f"- Method: freeze; trained {what}, every other weight as in the base (a complete model)"
    if cfg.method == "prompt-tuning":
        prompt = cfg.prompt_tuning or PromptTuningSpec()
        init = "random" if prompt.init_text is None else f"from the text {json.dumps(prompt.init_text)}"
        return f"- Method: prompt-tuning; {prompt.num_virtual_tokens} virtual tokens, initialized {init}"
    if cfg.method == "prefix-tuning":
        prefix = cfg.prefix_tuning or PrefixTuningSpec()
        projection = "with" if prefix.projection else "without"
        return f"- Method: prefix-tuning; {prefix.num_virtual_tokens} virtual tokens, {projection} projection"
    return "- Method: full; every weight trained (a complete model)"


def _fenced(text: str, lang: str = "text") -> list[str]:
    """``text`` in a code fence longer than any run of backticks inside it (CommonMark)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [f"{fence}{lang}", text, fence]


def _samples_section(cfg: TrainerConfig, rows: Sequence[Mapping[str, str]]) -> list[str]:
    if not rows:
        return []
    shown = min(CARD_SAMPLES, len(rows))
    lines = [
        "## Samples",
        "",
        f"The first {shown} of {len(rows)} prompts in `{samples.SAMPLES_FILE}`, answered greedily (at most"
        f" {cfg.evaluation.max_new_tokens} new tokens) by the base model and by this one:",
        "",
    ]
    for i, row in enumerate(rows[:shown], 1):
        lines += [f"**Prompt {i}**", "", *_fenced(row["prompt"]), ""]
        lines += ["Base model:", "", *_fenced(row["base"]), "", "Fine-tuned:", "", *_fenced(row["tuned"]), ""]
    return lines


def model_card(
    cfg: TrainerConfig,
    metrics: dict[str, Any],
    plot: bool = False,
    samples_rows: Sequence[Mapping[str, str]] = (),
) -> str:
    """The README.md a user reads first: what was trained, the loss curve (``plot``: loss.png was
    written), the first samples and code that loads the output as published."""
    final_loss = metrics.get("trainLoss")
    eval_loss = metrics.get("evalLoss")
    tag = "lora" if cfg.method in LORA_METHODS else cfg.method
    lines = [
        "---",
        f"library_name: {'peft' if writes_adapter(cfg) else 'transformers'}",
        # The hub's metadata names a hub model; an s3:// base is named in the text below.
        *([] if cfg.model.is_s3 else [f"base_model: {cfg.model.source}"]),
        f"tags: [kubetune, {tag}, {cfg.objective}, trl]",
        "---",
        "",
        f"# {_title(cfg)}",
        "",
        f"- Base model: `{cfg.model.source}`"
        + (f" (revision `{cfg.model.revision}`)" if cfg.model.revision else ""),
        _method_line(cfg),
        f"- Dataset: `{cfg.dataset.train}` (format {metrics.get('datasetFormat')})",
        f"- Steps: {metrics.get('globalStep')}, epochs: {metrics.get('epoch')}, "
        f"precision: {metrics.get('precision')}",
        f"- Final train loss: {final_loss}" + (f", eval loss: {eval_loss}" if eval_loss is not None else ""),
        *_objective_lines(cfg, metrics),
        *_head_lines(cfg, metrics),
        "",
    ]
    if plot:
        lines += ["## Loss", "", f"![loss]({lossplot.LOSS_PLOT})", ""]
    lines += _samples_section(cfg, samples_rows)
    lines += _usage_section(cfg, metrics.get("labels") or ())
    lines += ["`manifest.json` lists every file with its size and sha256.", ""]
    return "\n".join(lines)


def write_local(
    folder: Path,
    cfg: TrainerConfig,
    model: Any | None,
    tokenizer: Any,
    metrics: dict[str, Any],
    *,
    samples_rows: Sequence[Mapping[str, str]] = (),
) -> None:
    """Write the model (unless ``model`` is None: saved already, as under FSDP): the adapter, or
    for full and freeze the complete model; the tokenizer, config, metrics, samples, loss plot
    (when it can be drawn) and model card into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if model is not None:
        # Training turned the KV cache off; a complete model's config.json is for generating.
        model.config.use_cache = True
        model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    (folder / wellknown.RESOLVED_CONFIG).write_text(cfg.to_resolved_json() + "\n")
    (folder / wellknown.METRICS).write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    samples.write(folder, samples_rows)
    plotted = lossplot.write(folder, metrics)
    (folder / wellknown.MODEL_CARD).write_text(
        model_card(cfg, metrics, plot=plotted, samples_rows=samples_rows)
    )


def merge_adapter(base_source: str, folder: Path, cfg: TrainerConfig, precision: PrecisionChoice) -> None:
    """Reload the base unquantized, merge the adapter saved in ``folder``, save to ``folder/merged``
    with the tokenizer (and chat template) saved next to the adapter, so ``merged/`` loads on its
    own with AutoTokenizer and AutoModelForCausalLM (AutoModelForSequenceClassification for a
    classifier, whose labels metrics.json names, or a reward model)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    # The tokenizer as trained (pad token, kubetune's default chat template when the base had none).
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=cfg.model.trust_remote_code)
    labels = json.loads((folder / wellknown.METRICS).read_text()).get("labels") or ()
    head = modeling.head_arguments(cfg, labels)
    auto: Any = AutoModelForSequenceClassification if head else AutoModelForCausalLM
    base = auto.from_pretrained(
        base_source,
        revision=cfg.model.revision,
        trust_remote_code=cfg.model.trust_remote_code,
        dtype=getattr(torch, precision.torch_dtype_name),
        **({**head, "pad_token_id": tokenizer.pad_token_id} if head else {}),
    )
    merged = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    merged_dir = folder / wellknown.MERGED_DIR
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
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
