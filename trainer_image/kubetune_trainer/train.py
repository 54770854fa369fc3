"""The trainer's pipeline: fetch -> validate -> load -> LoRA -> train -> evaluate -> publish.

Heavy libraries (torch, transformers, peft, trl) are imported inside functions,
like trl's ``scripts/sft.py``, so a bad dataset fails in about a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import checkpoints, dataset, errors, hardware, modeling, reporting, results
from .config import TrainerConfig
from .storage import ObjectStore, join_uri

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    cfg: TrainerConfig
    store: ObjectStore
    work_dir: Path
    flag: checkpoints.TerminationFlag
    #: ``cfg.fingerprint()``, computed once: every marker and the manifest record it.
    fingerprint: str

    @property
    def is_main(self) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Downloads happen once per node: the local main process first, the others after it."""
    if hardware.launched_world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


def already_published(ctx: RunContext) -> dict[str, Any] | None:
    """The metrics of a finished run when ``manifest.json`` exists (a restarted pod after success)."""
    manifest_uri = join_uri(ctx.cfg.output.uri, results.MANIFEST)
    if not ctx.store.exists(manifest_uri):
        return None
    import json

    errors.check_same_run(manifest_uri, json.loads(ctx.store.get_bytes(manifest_uri)), ctx.fingerprint)
    metrics: dict[str, Any] = json.loads(ctx.store.get_bytes(join_uri(ctx.cfg.output.uri, "metrics.json")))
    return metrics


def prepare_data(ctx: RunContext) -> dataset.ValidatedData:
    with local_main_first():
        files = dataset.fetch(ctx.cfg.dataset, ctx.store, ctx.work_dir / "data")
    return dataset.validate(ctx.cfg.dataset, files)


def chat_uses_assistant_mask(tokenizer: Any) -> bool:
    """Whether TRL can mask non-assistant tokens with this tokenizer's chat template."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return True
    try:
        return get_training_chat_template(tokenizer) is not None
    except Exception:  # an unknown template: TRL cannot patch it
        return False


def to_rows(
    data: dataset.ValidatedData, assistant_mask: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """TRL rows; chat falls back to last-turn prompt/completion without an assistant mask."""
    from .formats import split_last_assistant_turn

    if data.format != "chat" or assistant_mask:
        return data.train, data.validation
    log.warning(
        "chat template cannot mark assistant tokens: training on the last assistant turn of each record"
    )
    return (
        [split_last_assistant_turn(r["messages"]) for r in data.train],
        [split_last_assistant_turn(r["messages"]) for r in data.validation],
    )


def build_datasets(
    cfg: TrainerConfig, train_rows: list[dict[str, Any]], eval_rows: list[dict[str, Any]]
) -> tuple[Any, Any | None]:
    from datasets import Dataset

    train = Dataset.from_list(train_rows)
    if eval_rows:
        return train, Dataset.from_list(eval_rows)
    if cfg.dataset.validation_split > 0:
        split = train.train_test_split(test_size=cfg.dataset.validation_split, seed=cfg.training.seed)
        return split["train"], split["test"]
    return train, None


def sft_config(
    cfg: TrainerConfig,
    output_dir: Path,
    *,
    precision: hardware.PrecisionChoice,
    hw: hardware.Hardware,
    gc: bool,
    chat_mask: bool,
) -> Any:
    from trl.trainer.sft_config import SFTConfig

    t = cfg.training
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps if t.warmup_steps > 0 else t.warmup_ratio,
        weight_decay=t.weight_decay,
        seed=t.seed,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy=t.eval_strategy,
        eval_steps=t.eval_steps,
        save_strategy=t.save_strategy,
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        max_length=t.max_seq_length,
        packing=t.packing,
        assistant_only_loss=chat_mask,
        bf16=precision.precision == "bf16",
        fp16=precision.precision == "fp16",
        use_cpu=not hw.cuda,
        activation_checkpointing=gc,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False if hardware.launched_world_size() > 1 else None,
    )


def loss_history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e]


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Train and publish; returns the summary (also written to the termination message)."""
    started = time.monotonic()
    flag = checkpoints.TerminationFlag()
    flag.install()
    gpus_visible = 0
    if cfg.gpus > 0:
        import torch

        gpus_visible = torch.cuda.device_count()
    hardware.check_world_size(cfg.gpus, hardware.launched_world_size(), gpus_visible)

    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(
        cfg=cfg,
        store=ObjectStore.from_spec(cfg.storage),
        work_dir=work_dir,
        flag=flag,
        fingerprint=cfg.fingerprint(),
    )
    done = already_published(ctx)
    if done is not None:
        log.info("result already published at %s; nothing to do", cfg.output.uri)
        return {"phase": "Succeeded", "outputUri": cfg.output.uri, "alreadyComplete": True, **_short(done)}
    checkpoints.check_owner(ctx.store, cfg.output.uri, ctx.fingerprint)

    data = prepare_data(ctx)

    # ---- heavy part: tokenizer, model, trainer ----
    hw = hardware.probe()
    precision = hardware.choose_precision(cfg.training.precision, hw)
    log.info("precision: %s (%s)", precision.precision, precision.reason)
    gc = cfg.training.gradient_checkpointing if cfg.training.gradient_checkpointing is not None else hw.cuda
    log.info("gradient checkpointing: %s", "on" if gc else "off")

    with local_main_first():
        source = modeling.resolve_source(cfg.model, ctx.store, work_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    chat_mask = data.format == "chat" and chat_uses_assistant_mask(tokenizer)
    train_rows, eval_rows = to_rows(data, chat_mask)
    stats = dataset.token_stats(train_rows + eval_rows, tokenizer, cfg.training.max_seq_length)
    log.info(
        "tokens: %d records, p50 %d, p95 %d, max %d; %d longer than maxSeqLength %d (truncated)",
        stats.records,
        stats.p50,
        stats.p95,
        stats.max,
        stats.truncated,
        stats.max_length,
    )
    train_ds, eval_ds = build_datasets(cfg, train_rows, eval_rows)

    model = modeling.load_model(source, cfg, precision, gc)
    ckpt_root = work_dir / "checkpoints"
    resume: Path | None = None
    with local_main_first():
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            resume = checkpoints.restore_latest(ctx.store, cfg.output.uri, ckpt_root, ctx.fingerprint)
    if resume is None:
        resume = _local_latest(ckpt_root)

    from trl.trainer.sft_trainer import SFTTrainer

    sync = checkpoints.make_checkpoint_callback(
        ctx.store, cfg.output.uri, cfg.training.save_total_limit, flag, ctx.fingerprint
    )
    callbacks = [sync]
    ref = reporting.job_ref(cfg.reporting)
    if ref is not None and ctx.is_main:
        reporter = reporting.ProgressReporter(
            send=_safe_patcher(ref), interval=cfg.reporting.interval_seconds
        )
        callbacks.append(
            reporting.make_progress_callback(reporter, lambda: sync.last.uri if sync.last else None)
        )
    elif ref is None:
        log.info("progress: no FineTuneJob name known, status reporting off")

    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, ckpt_root, precision=precision, hw=hw, gc=gc, chat_mask=chat_mask),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=modeling.lora_config(cfg),
        callbacks=callbacks,
    )
    modeling.adapter_dtype_fix(trainer.model, precision)
    flag.training = True
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    flag.training = False
    if flag.requested:
        raise checkpoints.Terminated(flag.signum or 15, trainer.state.global_step)

    eval_loss: float | None = None
    if eval_ds is not None:
        eval_loss = float(trainer.evaluate()["eval_loss"])

    metrics = {
        "datasetFormat": data.format,
        "precision": precision.precision,
        "precisionReason": precision.reason,
        "globalStep": trainer.state.global_step,
        "epoch": round(float(trainer.state.epoch or 0.0), 4),
        "trainLoss": train_out.training_loss,
        "evalLoss": eval_loss,
        "trainRuntimeSeconds": round(train_out.metrics.get("train_runtime", 0.0), 2),
        "tokensPerSecond": _last_logged(trainer.state.log_history, "train_tokens_per_second"),
        "inputTokensSeen": trainer.state.num_input_tokens_seen,
        "resumedFromStep": int(resume.name.split("-")[-1]) if resume else None,
        "dataStats": stats.as_dict(),
        "lossHistory": loss_history(trainer.state.log_history),
        "totalRuntimeSeconds": round(time.monotonic() - started, 2),
    }
    if ctx.is_main:
        out_dir = work_dir / "result"
        results.write_local(out_dir, cfg, trainer.model, tokenizer, metrics)
        if cfg.output.merge_adapter:
            results.merge_adapter(source, out_dir, cfg, precision)
        results.publish(ctx.store, out_dir, cfg.output.uri, ctx.fingerprint)
    return {"phase": "Succeeded", "outputUri": cfg.output.uri, **_short(metrics)}


def _last_logged(log_history: list[dict[str, Any]], key: str) -> Any:
    """The latest value the Trainer logged for ``key`` (None if never)."""
    return next((e[key] for e in reversed(log_history) if key in e), None)


def _short(metrics: dict[str, Any]) -> dict[str, Any]:
    """The summary subset that fits a termination message."""
    keys = (
        "datasetFormat",
        "globalStep",
        "epoch",
        "trainLoss",
        "evalLoss",
        "tokensPerSecond",
        "trainRuntimeSeconds",
        "resumedFromStep",
        "precision",
        "dataStats",
    )
    return {k: metrics[k] for k in keys if k in metrics}


def _local_latest(root: Path) -> Path | None:
    """A checkpoint left on local disk (same pod, restarted container) when storage had none."""
    found = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def _safe_patcher(ref: reporting.JobRef) -> Any:
    """The status patcher, or a sender that always fails (logged once) if the client cannot be set up."""
    try:
        return reporting.status_patcher(ref)
    except Exception as exc:
        reason = str(exc)

        def unavailable(_progress: dict[str, Any]) -> None:
            raise RuntimeError(f"no Kubernetes client: {reason}")

        return unavailable
