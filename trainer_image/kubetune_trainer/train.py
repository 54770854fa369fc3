"""The trainer's pipeline, as thin as trl's ``scripts/sft.py``: prepare -> build -> train -> publish.

Each stage is a named function over a :class:`RunContext`; heavy libraries (torch,
transformers, peft, trl) are imported inside them, so a bad dataset fails in about a second.
The TRL specifics are in :mod:`.sft` (objective sft), :mod:`.dpo`, :mod:`.orpo` and :mod:`.kto`
(the preference objectives, over what :mod:`.preference` shares).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api import wellknown
from kubetune_api.trainer import TrainerConfig

from . import (
    batching,
    checkpoints,
    classification,
    dataset,
    dpo,
    errors,
    hardware,
    kto,
    lossplot,
    modeling,
    orpo,
    preflight,
    reporting,
    results,
    reward,
    samples,
    sft,
    throughput,
    tracking,
)
from .storage import ObjectStore, join_uri

log = logging.getLogger(__name__)

#: The summary fields that fit a termination message (the rest is in metrics.json).
SUMMARY_KEYS = (
    "datasetFormat",
    "globalStep",
    "epoch",
    "trainLoss",
    "evalLoss",
    "tokensPerSecond",
    "trainRuntimeSeconds",
    "resumedFromStep",
    "precision",
    "batching",
    "paddingWaste",
    "dataStats",
    "objective",
    "rewardAccuracy",
    "rewardMargin",
    "evalAccuracy",
    "evalF1",
)


@dataclass
class RunContext:
    cfg: TrainerConfig
    store: ObjectStore
    work_dir: Path
    flag: checkpoints.TerminationFlag
    #: ``cfg.fingerprint()``, computed once: every marker and the manifest record it.
    fingerprint: str
    started: float

    @property
    def is_main(self) -> bool:
        return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Built:
    """What :func:`build` made: the TRL trainer and what publishing needs."""

    trainer: Any
    tokenizer: Any
    source: str
    plan: sft.Plan
    data_format: str
    stats: dataset.TokenStats
    has_eval: bool
    resume: Path | None
    checkpoint_sync: Any
    #: The expected fraction of padding in the first epoch's training batches.
    padding_waste: float
    #: The sample prompts (evaluation), and the base's answers when generated before training.
    sampling: samples.Pending


@contextlib.contextmanager
def local_main_first() -> Iterator[None]:
    """Downloads happen once per node: the local main process first, the others after it."""
    if hardware.launched_world_size() == 1:
        yield
        return
    from accelerate import PartialState

    with PartialState().local_main_process_first():
        yield


# -- prepare ---------------------------------------------------------------------------------------
def prepare(cfg: TrainerConfig) -> RunContext:
    """Signals, the launch's world size, the work dir and the object store."""
    started = time.monotonic()
    flag = checkpoints.TerminationFlag()
    flag.install()
    gpus_visible = 0
    if cfg.gpus > 0:
        import torch

        gpus_visible = torch.cuda.device_count()
    hardware.check_world_size(cfg.gpus, hardware.launched_world_size(), gpus_visible, cfg.processes)
    work_dir = Path(cfg.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    store = ObjectStore.from_spec(cfg.storage)
    return RunContext(cfg, store, work_dir, flag, cfg.fingerprint(), started)


def already_published(ctx: RunContext) -> dict[str, Any] | None:
    """The metrics of a finished run when ``manifest.json`` exists (a restarted pod after success)."""
    manifest_uri = join_uri(ctx.cfg.output.uri, wellknown.MANIFEST)
    if not ctx.store.exists(manifest_uri):
        return None
    errors.check_same_run(manifest_uri, json.loads(ctx.store.get_bytes(manifest_uri)), ctx.fingerprint)
    metrics: dict[str, Any] = json.loads(ctx.store.get_bytes(join_uri(ctx.cfg.output.uri, wellknown.METRICS)))
    return metrics


def prepare_data(ctx: RunContext) -> dataset.ValidatedData:
    """Download and check every record, before any model is loaded."""
    with local_main_first():
        files = dataset.fetch(ctx.cfg.dataset, ctx.store, ctx.work_dir / "data")
    labels = ctx.cfg.classification.labels if ctx.cfg.classification else None
    return dataset.validate(ctx.cfg.dataset, files, ctx.cfg.objective, ctx.cfg.task, labels)


# -- build -----------------------------------------------------------------------------------------
def plan_hardware(
    cfg: TrainerConfig,
) -> tuple[hardware.Hardware, hardware.PrecisionChoice, bool, throughput.ThroughputPlan]:
    """The device, the precision, whether to checkpoint activations, and the throughput choices."""
    hw = hardware.probe()
    precision = hardware.choose_precision(cfg.training.precision, hw)
    log.info("precision: %s (%s)", precision.precision, precision.reason)
    checkpointing = cfg.training.gradient_checkpointing
    gc = checkpointing if checkpointing is not None else hw.cuda
    log.info("gradient checkpointing: %s", "on" if gc else "off")
    speed = throughput.plan(cfg.training, cfg.method, hw, precision, throughput.installed())
    if cfg.task == "sequence-classification":
        speed = throughput.without_padding_free(speed, "task sequence-classification")
    elif cfg.objective != "sft":
        speed = throughput.without_padding_free(speed, f"objective {cfg.objective}")
    for reason in speed.reasons:
        log.info("%s", reason)
    return hw, precision, gc, speed


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


def restore_checkpoint(ctx: RunContext, ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint in object storage (else one left on local disk) to resume from."""
    resume: Path | None = None
    with local_main_first():
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            resume = checkpoints.restore_latest(ctx.store, ctx.cfg.output.uri, ckpt_root, ctx.fingerprint)
    return resume if resume is not None else checkpoints.local_latest(ckpt_root)


def callbacks(ctx: RunContext) -> tuple[Any, list[Any]]:
    """The checkpoint sync (uploads each save, reacts to SIGTERM) and, on rank 0, progress reporting."""
    cfg = ctx.cfg
    sync = checkpoints.make_checkpoint_callback(
        ctx.store, cfg.output.uri, cfg.training.save_total_limit, ctx.flag, ctx.fingerprint
    )
    found: list[Any] = [sync]
    ref = reporting.job_ref(cfg.reporting)
    if ref is None:
        log.info("progress: no FineTuneJob name known, status reporting off")
    elif ctx.is_main:
        reporter = reporting.ProgressReporter(
            send=reporting.safe_patcher(ref), interval=cfg.reporting.interval_seconds
        )
        found.append(reporting.make_progress_callback(reporter, lambda: sync.last.uri if sync.last else None))
    return sync, found


def build(ctx: RunContext, data: dataset.ValidatedData, tracker: tracking.Tracker | None = None) -> Built:
    """Tokenizer, rows, model and the TRL trainer, resumed from the newest checkpoint."""
    cfg = ctx.cfg
    hw, precision, gc, speed = plan_hardware(cfg)
    with local_main_first():
        source = modeling.resolve_source(cfg.model, ctx.store, ctx.work_dir, cfg.model_cache_dir)
    tokenizer = modeling.load_tokenizer(source, cfg.model)
    assistant_mask = (
        cfg.objective == "sft" and data.format == "chat" and sft.chat_uses_assistant_mask(tokenizer)
    )
    plan = sft.Plan(precision, hw.cuda, gc, assistant_mask, speed)
    train_rows, eval_rows = sft.to_rows(data, plan.assistant_only_loss)
    stats = dataset.token_stats(train_rows + eval_rows, tokenizer, cfg.training.max_seq_length)
    log.info("tokens: %s", stats.describe())
    datasets = build_datasets(cfg, train_rows, eval_rows)
    model = modeling.load_model(source, cfg, precision, gc, speed.attn_implementation, labels=data.labels)
    ckpt_root = ctx.work_dir / "checkpoints"
    resume = restore_checkpoint(ctx, ckpt_root)
    sync, found = callbacks(ctx)
    found += tracker.callbacks() if tracker is not None else []
    trainer = make_trainer(
        cfg, plan, ckpt_root=ckpt_root, model=model, tokenizer=tokenizer, datasets=datasets, callbacks=found
    )
    hardware.check_strategy(cfg.distributed.strategy, bool(getattr(trainer, "is_fsdp_enabled", False)))
    modeling.adapter_dtype_fix(trainer.model, precision)
    if speed.batching == "padding-free":
        batching.check_rows_kept_apart(trainer.model, trainer.data_collator, speed.attn_implementation)
    waste = first_epoch_padding(cfg, trainer, speed.batching)
    log.info("batching: %.1f %% of the tokens in the first epoch's batches are padding", 100 * waste)
    has_eval = datasets[1] is not None
    sampling = samples.prepare(cfg, trainer.model, tokenizer, datasets, ctx.is_main)
    return Built(
        trainer, tokenizer, source, plan, data.format, stats, has_eval, resume, sync, waste, sampling
    )


def first_epoch_padding(cfg: TrainerConfig, trainer: Any, batching_choice: str) -> float:
    """The expected padding share of the first epoch's training batches, by the objective's rows."""
    rows, args = trainer.train_dataset, trainer.args
    if cfg.objective == "kto":  # its rows are read in the order kto.row_order gave them
        return kto.padding_waste(rows, args.per_device_train_batch_size)
    lengths = {"dpo": dpo.pair_lengths, "orpo": orpo.pair_lengths, "reward": reward.pair_lengths}.get(
        cfg.objective, batching.row_lengths
    )
    return batching.expected_padding_waste(
        batching_choice, lengths(rows), args.per_device_train_batch_size, args.seed
    )


def make_trainer(
    cfg: TrainerConfig,
    plan: sft.Plan,
    *,
    ckpt_root: Path,
    model: Any,
    tokenizer: Any,
    datasets: tuple[Any, Any | None],
    callbacks: list[Any],
) -> Any:
    """TRL's trainer for the objective: SFTTrainer, DPOTrainer or KTOTrainer with the base model as
    reference, or ORPOTrainer (which needs none)."""
    peft_config = modeling.peft_config(cfg, tokenizer.name_or_path)
    common = {
        "tokenizer": tokenizer,
        "datasets": datasets,
        "peft_config": peft_config,
        "callbacks": callbacks,
    }
    if cfg.objective == "dpo":
        reference = modeling.reference_init_kwargs(cfg)
        args = dpo.dpo_config(cfg.training, cfg.dpo, plan, ckpt_root, reference)
        return dpo.build_trainer(model, args=args, speed=plan.speed, **common)
    if cfg.objective == "orpo":
        args = orpo.orpo_config(cfg.training, cfg.orpo, plan, ckpt_root)
        return orpo.build_trainer(model, args=args, speed=plan.speed, **common)
    if cfg.objective == "kto":
        reference = modeling.reference_init_kwargs(cfg)
        args = kto.kto_config(cfg.training, cfg.kto, plan, ckpt_root, reference)
        return kto.build_trainer(model, args=args, speed=plan.speed, **common)
    if cfg.objective == "reward":
        args = reward.reward_config(cfg.training, plan, ckpt_root)
        return reward.build_trainer(model, args=args, speed=plan.speed, **common)
    if cfg.task == "sequence-classification":
        args = classification.arguments(cfg.training, plan, ckpt_root)
        max_length = cfg.training.max_seq_length
        return classification.build_trainer(
            model, args=args, speed=plan.speed, max_length=max_length, **common
        )
    args = sft.sft_config(cfg.training, plan, ckpt_root)
    return sft.build_trainer(
        model, args=args, speed=plan.speed, max_row_length=cfg.training.max_seq_length, **common
    )


def objective_metrics(
    cfg: TrainerConfig, history: list[dict[str, Any]], trainer: Any = None
) -> dict[str, Any]:
    """What a preference run is judged by (dpo, orpo: reward accuracy, margins, chosen and rejected
    rewards; orpo also its log-odds ratio; kto: margins, chosen and rejected rewards, its KL
    estimate; reward: the reward model's accuracy and margin); task sequence-classification:
    accuracy, precision, recall, F1 and the confusion matrix (from ``trainer``'s last evaluation);
    for sft only the objective's name."""
    extra: dict[str, Any] = {"objective": cfg.objective}
    rewards = {
        "dpo": dpo.reward_metrics,
        "orpo": orpo.reward_metrics,
        "kto": kto.reward_metrics,
        "reward": reward.reward_metrics,
    }
    if cfg.objective in rewards:
        extra |= rewards[cfg.objective](history)
    if cfg.task == "sequence-classification":
        extra |= {"task": cfg.task, **classification.metrics(history, trainer)}
    return extra


# -- train -----------------------------------------------------------------------------------------
def train(ctx: RunContext, built: Built) -> dict[str, Any]:
    """Train (stopping with a checkpoint on SIGTERM), evaluate, and return the run's metrics."""
    trainer, resume = built.trainer, built.resume
    ctx.flag.training = True
    train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    ctx.flag.training = False
    if ctx.flag.requested:
        raise checkpoints.Terminated(ctx.flag.signum or 15, trainer.state.global_step)
    eval_loss = float(trainer.evaluate()["eval_loss"]) if built.has_eval else None
    state, history = trainer.state, trainer.state.log_history
    return {
        "datasetFormat": built.data_format,
        "precision": built.plan.precision.precision,
        "precisionReason": built.plan.precision.reason,
        "batching": built.plan.speed.batching,
        "attnImplementation": built.plan.speed.attn_implementation,
        "optimizer": built.plan.speed.optim,
        "ligerKernel": built.plan.speed.liger_kernel,
        "throughputReasons": list(built.plan.speed.reasons),
        "paddingWaste": round(built.padding_waste, 4),
        "globalStep": state.global_step,
        "epoch": round(float(state.epoch or 0.0), 4),
        "trainLoss": train_out.training_loss,
        "evalLoss": eval_loss,
        "trainRuntimeSeconds": round(train_out.metrics.get("train_runtime", 0.0), 2),
        "tokensPerSecond": _last_logged(history, "train_tokens_per_second"),
        "inputTokensSeen": state.num_input_tokens_seen,
        "resumedFromStep": checkpoints.step_of(resume) if resume else None,
        "dataStats": built.stats.as_dict(),
        "lossHistory": [{"step": e["step"], "loss": e["loss"]} for e in history if "loss" in e],
        "evalLossHistory": lossplot.eval_loss_history(history),
        "totalRuntimeSeconds": round(time.monotonic() - ctx.started, 2),
        **objective_metrics(ctx.cfg, history, trainer),
    }


# -- publish ---------------------------------------------------------------------------------------
def publish(ctx: RunContext, built: Built, metrics: dict[str, Any]) -> None:
    """Write the result locally, merge if asked, then upload it with the manifest last (rank 0)."""
    cfg, out_dir, trainer = ctx.cfg, ctx.work_dir / "result", built.trainer
    model: Any = trainer.model
    if getattr(trainer, "is_fsdp_enabled", False):
        # Sharded weights: every rank takes part in gathering them; the Trainer writes on rank 0.
        # (Not run here: FSDP needs GPUs; docs/trainer.md, "Multi-process and FSDP".)
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(out_dir))
        model = None
    if not ctx.is_main:
        return
    rows = samples.finish(built.sampling, trainer.model, built.tokenizer)  # before the manifest
    results.write_local(out_dir, cfg, model, built.tokenizer, metrics, samples_rows=rows)
    if cfg.output.merge_adapter:
        results.merge_adapter(built.source, out_dir, cfg, built.plan.precision)
    results.publish(ctx.store, out_dir, cfg.output.uri, ctx.fingerprint)


def run(cfg: TrainerConfig) -> dict[str, Any]:
    """Train and publish; returns the summary (also written to the termination message)."""
    ctx = prepare(cfg)
    preflight.check_secret_files(cfg.secret_files)
    # Before anything else reads the output prefix: a missing bucket is OutputNotWritable.
    if ctx.is_main:
        preflight.check_output_writable(ctx.store, cfg.output.uri, cfg.storage.endpoint)
    done = already_published(ctx)
    if done is not None:
        log.info("result already published at %s; nothing to do", cfg.output.uri)
        return {"phase": "Succeeded", "outputUri": cfg.output.uri, "alreadyComplete": True, **_summary(done)}
    checkpoints.check_owner(ctx.store, cfg.output.uri, ctx.fingerprint)
    preflight.check_scratch(cfg, ctx.store, ctx.work_dir)  # before any download
    tracker = tracking.Tracker(cfg, ctx.store, ctx.work_dir, ctx.is_main)
    tracker.start()  # before the data: a bad dataset is a FAILED run too
    metrics = tracked_run(ctx, tracker)
    return {"phase": "Succeeded", "outputUri": cfg.output.uri, **_summary(metrics)}


def tracked_run(ctx: RunContext, tracker: tracking.Tracker) -> dict[str, Any]:
    """Data -> build -> train -> publish; the MLflow run ends FINISHED once the result is
    published, KILLED on SIGTERM (a later pod reopens it), FAILED on anything else."""
    try:
        data = prepare_data(ctx)
        built = build(ctx, data, tracker)
        metrics = train(ctx, built)
        tracker.sync_tensorboard()  # the event files are in storage before the manifest
        publish(ctx, built, metrics)
    except checkpoints.Terminated:
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED", metrics)
    return metrics


def _last_logged(log_history: list[dict[str, Any]], key: str) -> Any:
    """The latest value the Trainer logged for ``key`` (None if never)."""
    return next((e[key] for e in reversed(log_history) if key in e), None)


def _summary(metrics: dict[str, Any]) -> dict[str, Any]:
    return {key: metrics[key] for key in SUMMARY_KEYS if key in metrics}
