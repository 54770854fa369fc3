"""GPU check: tokens/s, MFU and peak GPU memory of the trainer's own code path, option by option.

Random-init Llama models of ~1B and ~8B shape (no download, no network, no tokenizer: random token
ids of a long-tailed length distribution), QLoRA (NF4, bitsandbytes) and LoRA bf16, each attention
kernel (sdpa, flash_attention_2, eager on the 1B only), Liger kernels on and off, and each batching
(padded, length-grouped, padding-free). Every option goes through what ``train.build`` does:
``hardware.probe``/``choose_precision``, ``throughput.plan``, ``modeling.load_model`` (so
``modeling.quantization_config``'s BitsAndBytesConfig and ``prepare_model_for_kbit_training``),
``modeling.lora_config``, ``sft.sft_config``, ``sft.build_trainer``, ``modeling.adapter_dtype_fix``
and, for padding-free, ``batching.check_rows_kept_apart``; then ``trainer.train()`` for a few steps.

The random model of each shape is saved once, in bf16 safetensors, to ``--work-dir`` (local disk:
the 8B is 16 GB) so that ``modeling.load_model`` loads it as it loads any model folder. A loaded
model is reused by the next options of the same shape, method and Liger setting: the adapter is
unloaded (peft), TRL's fused-LM-head forward removed, the attention switched with
``set_attn_implementation``; ``--no-reuse`` loads it afresh for every option instead.

Printed per option: one JSON line (stdout) with real (non-pad) tokens/s over the timed steps, MFU
(6 x (frozen + trainable parameters) x tokens/s / peak bf16 FLOP/s of the device), peak GPU memory
(``torch.cuda.max_memory_allocated``, reset before each option's training), padding waste and
the trainer's reasons; a table at the end. Failures (out of memory, a missing package, the
trainer refusing a combination) are reported as such and the check goes on. The time is bounded:
``--option-budget-s`` per option, ``--deadline-s`` for the whole run, after which the remaining
options are listed as skipped.

    bench/gpu/run.sh                                   # on the GPU machine (see bench/gpu/README.md)
    .venv/bin/python bench/gpu/gpu_check.py --cpu-smoke  # here: the same code, tiny shape, on CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import importlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

# No network on the GPU machine: nothing may try the hub.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ATTENTIONS: Final = ("flash_attention_2", "sdpa", "eager")
BATCHINGS: Final = ("padding-free", "length-grouped", "padded")
METHODS: Final = ("qlora", "lora")
#: Dense bf16 peak FLOP/s by device name (no sparsity); the first match wins.
PEAK_BF16: Final = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
FIRST_TOKEN: Final = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    def config(self, max_positions: int) -> Any:
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-5,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            tie_word_embeddings=False,
        )


SHAPES: Final = {
    "1b": Shape("1b", hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=8192, vocab=32000),
    "8b": Shape("8b", hidden=4096, layers=32, heads=32, kv_heads=8, intermediate=14336, vocab=128256),
    "tiny": Shape("tiny", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=1024),
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One measured combination. ``default``: the spec leaves attention, batching and Liger at auto,
    so ``throughput.plan`` chooses (and the values here are what it chose)."""

    shape: str
    method: str
    attention: str
    liger: bool
    batching: str
    default: bool = False

    @property
    def name(self) -> str:
        liger = "liger" if self.liger else "no-liger"
        tail = " (default)" if self.default else ""
        return f"{self.shape}/{self.method}/{self.attention}/{liger}/{self.batching}{tail}"

    @property
    def group(self) -> tuple[str, str, bool]:
        """Options that can share one loaded model (Liger patches the model it runs on)."""
        return (self.shape, self.method, self.liger)

    def concrete(self) -> tuple[str, str, str, bool, str]:
        return (self.shape, self.method, self.attention, self.liger, self.batching)


@dataclasses.dataclass
class Settings:
    shapes: tuple[str, ...]
    methods: tuple[str, ...]
    attentions: tuple[str, ...]
    matrix: str
    warmup: int
    steps: int
    batch_size: int
    max_seq_length: int
    rows: int
    median_length: int
    precision: str
    gradient_checkpointing: bool | None
    deadline_s: float
    option_budget_s: float
    peak_flops: float | None
    work_dir: Path
    jsonl: Path | None
    reuse: bool
    only: str | None
    out: Any = sys.stdout


class DeadlineError(Exception):
    """SIGTERM (the hard ``timeout`` of run.sh) or the global deadline."""


# -- what is installed -----------------------------------------------------------------------------
def importable(module: str) -> bool:
    """Whether the module really imports (a broken CUDA build of flash-attn counts as missing)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def missing_package(option: Option, cuda: bool) -> str | None:
    if option.attention == "flash_attention_2" and not (cuda and importable("flash_attn")):
        return "flash_attn" if cuda else "flash_attn (needs a GPU)"
    if option.liger and not (cuda and importable("liger_kernel.transformers")):
        return "liger_kernel" if cuda else "liger_kernel (needs a GPU)"
    return None


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    return next((flops for key, flops in PEAK_BF16 if key in device_name), None)


# -- the matrix ------------------------------------------------------------------------------------
def default_option(shape: str, method: str, settings: Settings) -> Option:
    """What the trainer picks on this machine with attention, batching and Liger left at auto."""
    from kubetune_trainer import hardware, throughput

    training = training_spec(settings, None)
    hw = hardware.probe()
    precision = hardware.choose_precision(training.precision, hw)
    speed = throughput.plan(training, method, hw, precision, throughput.installed())  # type: ignore[arg-type]
    return Option(shape, method, speed.attn_implementation, speed.liger_kernel, speed.batching, default=True)


def attentions_for(shape: str, settings: Settings) -> list[str]:
    """eager only for the small shapes (its L x L scores make the 8B pointless)."""
    return [a for a in settings.attentions if a != "eager" or shape != "8b"]


def build_matrix(settings: Settings, defaults: dict[tuple[str, str], Option]) -> list[Option]:
    """Ordered by what matters most, shape by shape: the trainer's default, then one axis changed
    at a time (batching, attention with its auto batching, Liger flipped), then (``--matrix full``)
    every other combination. Options of one model group are adjacent, so a model loads once."""
    from kubetune_trainer import throughput

    ordered: list[Option] = []
    seen: set[tuple[str, str, str, bool, str]] = set()

    def add(option: Option) -> None:
        if option.concrete() not in seen and (settings.only is None or settings.only in option.name):
            seen.add(option.concrete())
            ordered.append(option)

    for full_pass in (False, True) if settings.matrix == "full" else (False,):
        for shape in settings.shapes:
            for method in settings.methods:
                base = defaults[(shape, method)]
                attentions = attentions_for(shape, settings)
                axes: list[Option] = [base]
                axes += [dataclasses.replace(base, batching=b, default=False) for b in BATCHINGS]
                for attention in attentions:
                    batching, _ = throughput.choose_batching("auto", False, attention)  # type: ignore[arg-type]
                    axes.append(
                        dataclasses.replace(base, attention=attention, batching=batching, default=False)
                    )
                axes.append(dataclasses.replace(base, liger=not base.liger, default=False))
                if full_pass:
                    axes = [
                        Option(shape, method, a, liger, b)
                        for liger in (base.liger, not base.liger)
                        for a in attentions
                        for b in BATCHINGS
                    ]
                # Same Liger setting as the default first: one model load per Liger setting.
                for option in sorted(axes, key=lambda o: o.liger != base.liger):
                    add(option)
    return ordered


# -- data and tokenizer ----------------------------------------------------------------------------
def long_tailed_lengths(count: int, median: int, longest: int, seed: int) -> list[int]:
    """Log-normal row lengths (sigma 0.9: most rows short, a tail to ``longest``), like chat data."""
    rng = random.Random(seed)
    return [min(longest, max(16, int(rng.lognormvariate(math.log(median), 0.9)))) for _ in range(count)]


def random_rows(lengths: Sequence[int], vocab: int, seed: int) -> Any:
    """A tokenized dataset (``input_ids`` only): TRL takes it as already processed."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict(
        {"input_ids": [[rng.randrange(FIRST_TOKEN, vocab) for _ in range(n)] for n in lengths]}
    )


def minimal_tokenizer() -> Any:
    """Four special tokens: TRL needs a pad token, the rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<unk>": UNK_ID, "<s>": BOS_ID, "</s>": EOS_ID}
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special["unk_token"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)  # type: ignore[no-untyped-call]


# -- the model on disk -----------------------------------------------------------------------------
def parameter_count(shape: Shape, max_positions: int) -> int:
    """Exact parameters of the unquantized model (4-bit weights count as the weights they stand for)."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(shape.config(max_positions))
    return sum(p.numel() for p in model.parameters())


def saved_model(shape: Shape, settings: Settings, device: str) -> tuple[Path, float]:
    """The random-init model's folder (bf16 on a GPU, fp32 on CPU), written once; seconds spent."""
    import torch
    from transformers import LlamaForCausalLM

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    key = json.dumps([dataclasses.asdict(shape), settings.max_seq_length, str(dtype)], sort_keys=True)
    folder = settings.work_dir / f"llama-{shape.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    done = folder / ".complete"
    if done.exists():
        return folder, 0.0
    started = time.monotonic()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    params = parameter_count(shape, settings.max_seq_length)
    need = params * (2 if device == "cuda" else 4) * 1.1
    free = shutil.disk_usage(folder).free
    if free < need:
        raise RuntimeError(
            f"{folder}: {free / 2**30:.1f} GiB free, the {shape.name} model needs {need / 2**30:.1f}"
        )
    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(shape.config(settings.max_seq_length))
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, max_shard_size="5GB")
    del model
    free_memory()
    done.write_text(key)
    return folder, time.monotonic() - started


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the trainer's config --------------------------------------------------------------------------
def training_spec(settings: Settings, option: Option | None) -> Any:
    """A TrainingSpec; ``option`` None or a default option leaves the throughput choices at auto."""
    from kubetune_api.spec import TrainingSpec

    spec: dict[str, Any] = {
        "perDeviceTrainBatchSize": settings.batch_size,
        "maxSteps": settings.warmup + settings.steps,
        "maxSeqLength": settings.max_seq_length,
        "learningRate": 1e-4,
        "precision": settings.precision,
        "saveStrategy": "no",
        "loggingSteps": 1000,
        "gradientCheckpointing": settings.gradient_checkpointing,
    }
    if option is not None and not option.default:
        spec |= {
            "attnImplementation": option.attention,
            "batching": option.batching,
            "ligerKernel": option.liger,
        }
    return TrainingSpec.model_validate(spec)


def trainer_config(option: Option, settings: Settings, cuda: bool) -> Any:
    from kubetune_api.trainer import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "model": {"source": f"kubetune/gpu-check-{option.shape}"},  # the folder is passed to load_model
            "dataset": {"train": "s3://kubetune-gpu-check/unused.jsonl"},
            "output": {"uri": "s3://kubetune-gpu-check/out"},
            "method": option.method,
            "quantization": {"bits": 4 if option.method == "qlora" else 16},
            "training": training_spec(settings, option).model_dump(by_alias=True, exclude_none=True),
            "gpus": 1 if cuda else 0,
        }
    )


# -- measuring -------------------------------------------------------------------------------------
class CountingCollator:
    """Wraps the trainer's collator: real (non-pad) and computed tokens of each batch, in order."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.batches: list[tuple[int, int]] = []

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        batch = self.inner(examples)
        real = sum(len(e["input_ids"]) for e in examples)
        self.batches.append((real, int(batch["input_ids"].numel())))
        return batch


def step_clock(cuda: bool, budget_s: float, deadline: float) -> Any:
    """A TrainerCallback timing each optimizer step (synchronized) and stopping past a budget."""
    import torch
    from transformers import TrainerCallback

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.monotonic()

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.begins: list[float] = []
            self.ends: list[float] = []
            self.stopped: str | None = None

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.begins.append(now())

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.ends.append(now())
            if self.ends[-1] - self.begins[0] > budget_s:
                self.stopped, control.should_training_stop = "option budget", True
            elif self.ends[-1] > deadline:
                self.stopped, control.should_training_stop = "deadline", True

    return StepClock()


@contextlib.contextmanager
def restored_llama_module() -> Iterator[None]:
    """Liger rebinds names in transformers' llama module (RMSNorm, MLP, RoPE) for every model built
    afterwards; put them back so a later option without Liger runs transformers' own code."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    classes = {name: dict(vars(value)) for name, value in saved.items() if isinstance(value, type)}
    try:
        yield
    finally:
        for name in set(vars(modeling_llama)) - set(saved):
            delattr(modeling_llama, name)
        for name, value in saved.items():
            if vars(modeling_llama).get(name) is not value:
                setattr(modeling_llama, name, value)
        for name, attrs in classes.items():
            cls = saved[name]
            for attr, value in attrs.items():
                if vars(cls).get(attr) is not value:
                    setattr(cls, attr, value)


@dataclasses.dataclass
class Loaded:
    """A model loaded by ``modeling.load_model``, shared by the options of one group."""

    group: tuple[str, str, bool]
    model: Any
    attention: str
    load_seconds: float
    uses: int = 0


def load(option: Option, settings: Settings, cuda: bool, folders: dict[str, Path]) -> Loaded:
    from kubetune_trainer import hardware, modeling

    started = time.monotonic()
    if option.shape not in folders:
        folders[option.shape], seconds = saved_model(
            SHAPES[option.shape], settings, "cuda" if cuda else "cpu"
        )
        log(f"saved the random {option.shape} model in {seconds:.1f} s: {folders[option.shape]}")
    cfg = trainer_config(option, settings, cuda)
    hw = hardware.probe()
    precision = hardware.choose_precision(cfg.training.precision, hw)
    gc_on = (
        cfg.training.gradient_checkpointing if cfg.training.gradient_checkpointing is not None else hw.cuda
    )
    model = modeling.load_model(str(folders[option.shape]), cfg, precision, gc_on, option.attention)
    seconds = time.monotonic() - started
    log(f"loaded {option.shape}/{option.method} ({option.attention}) in {seconds:.1f} s")
    return Loaded(option.group, model, option.attention, seconds)


def release(loaded: Loaded | None) -> None:
    if loaded is not None:
        loaded.model = None
    free_memory()


def build_trainer(model: Any, *, tokenizer: Any, args: Any, train_ds: Any, speed: Any, cfg: Any) -> Any:
    """``sft.build_trainer`` as ``train.build`` calls it."""
    from kubetune_trainer import modeling, sft

    return sft.build_trainer(
        model,
        tokenizer=tokenizer,
        args=args,
        datasets=(train_ds, None),
        peft_config=modeling.peft_config(cfg, tokenizer.name_or_path),
        callbacks=[],
        speed=speed,
        max_row_length=cfg.training.max_seq_length,
    )


def run_option(
    option: Option, loaded: Loaded, settings: Settings, env: dict[str, Any], deadline: float
) -> dict[str, Any]:
    """Build the trainer on the loaded model, train warm-up + timed steps, measure; give the model back
    without its adapter."""
    import torch

    from kubetune_trainer import batching, hardware, modeling, sft, throughput

    cuda: bool = env["cuda"]
    cfg = trainer_config(option, settings, cuda)
    hw = hardware.probe()
    precision = hardware.choose_precision(cfg.training.precision, hw)
    gc_on = (
        cfg.training.gradient_checkpointing if cfg.training.gradient_checkpointing is not None else hw.cuda
    )
    speed = throughput.plan(cfg.training, cfg.method, hw, precision, throughput.installed())
    record: dict[str, Any] = {
        "precision": precision.precision,
        "gradientCheckpointing": gc_on,
        "optim": speed.optim,
        "reasons": list(speed.reasons),
    }
    resolved = (speed.attn_implementation, speed.liger_kernel, speed.batching)
    if resolved != (option.attention, option.liger, option.batching):
        raise RuntimeError(f"throughput.plan chose {resolved}, the option is {option.name}")
    model = loaded.model
    if loaded.attention != option.attention:
        model.set_attn_implementation(option.attention)
        loaded.attention = option.attention
        record["attnSwitched"] = True
    plan = sft.Plan(precision, hw.cuda, gc_on, False, speed)
    args = sft.sft_config(cfg.training, plan, settings.work_dir / "checkpoints")
    trainer = build_trainer(
        model, tokenizer=env["tokenizer"], args=args, train_ds=env["rows"], speed=speed, cfg=cfg
    )
    try:
        modeling.adapter_dtype_fix(trainer.model, precision)
        if speed.batching == "padding-free":
            batching.check_rows_kept_apart(trainer.model, trainer.data_collator, speed.attn_implementation)
            record["rowsKeptApart"] = True
        counter = CountingCollator(trainer.data_collator)
        trainer.data_collator = counter
        clock = step_clock(cuda, settings.option_budget_s, deadline)
        trainer.add_callback(clock)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            record["modelMemGiB"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        trainer.train()
        if cuda:
            record["peakMemGiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            record["peakReservedGiB"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        record |= measure(
            clock, counter, settings, env["params"][option.shape] + trainable, env["peak_flops"]
        )
        record["trainableParams"] = trainable
        losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        record["firstLoss"] = round(float(losses[0]), 4) if losses else None
    finally:
        base = trainer.model
        with contextlib.suppress(Exception):
            base = trainer.model.unload()  # peft: the base model without the adapter layers
        base.__dict__.pop("forward", None)  # TRL's fused-LM-head forward, added per trainer
        loaded.model = base
        trainer.model = trainer.model_wrapped = None
        del trainer
        free_memory()
    return record


def measure(
    clock: Any, counter: CountingCollator, settings: Settings, params: int, flops: float | None
) -> dict[str, Any]:
    """Tokens/s over the timed steps (after the warm-up ones), MFU, padding waste of those batches."""
    done = len(clock.ends)
    timed = done - settings.warmup
    out: dict[str, Any] = {"steps": done, "timedSteps": max(timed, 0), "stoppedBy": clock.stopped}
    if timed < 1:
        out["status"] = "over-budget"
        out["message"] = f"{done} step(s) in the {settings.option_budget_s:.0f} s budget, none timed"
        return out
    start = clock.ends[settings.warmup - 1] if settings.warmup > 0 else clock.begins[0]
    seconds = clock.ends[-1] - start
    batches = counter.batches[settings.warmup : done]
    real = sum(r for r, _ in batches)
    total = sum(t for _, t in batches)
    tokens_per_s = real / seconds
    out |= {
        "tokensPerSecond": round(tokens_per_s, 1),
        "secondsPerStep": round(seconds / timed, 3),
        "realTokens": real,
        "paddingWaste": round(1 - real / total, 4) if total else 0.0,
        "params": params,
        "mfu": round(6 * params * tokens_per_s / flops, 4) if flops else None,
    }
    return out


# -- the run ---------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[gpu_check] {message}", file=sys.stderr, flush=True)


def emit(record: dict[str, Any], settings: Settings) -> None:
    line = json.dumps(record, sort_keys=False)
    print(line, file=settings.out, flush=True)
    if settings.jsonl is not None:
        with settings.jsonl.open("a", encoding="utf-8") as out:
            out.write(line + "\n")


def classify(err: BaseException) -> tuple[str, str]:
    import torch

    from kubetune_trainer.errors import InvalidConfigError

    text = f"{type(err).__name__}: {err}".strip()
    if isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower():
        return "oom", text.splitlines()[0][:300]
    if isinstance(err, ImportError):
        return "missing-package", text[:300]
    if isinstance(err, InvalidConfigError):
        return "refused", text[:500]
    return "error", text[:500]


def run(settings: Settings, started: float, out: Any) -> list[dict[str, Any]]:
    import torch

    from kubetune_trainer import hardware

    deadline = started + settings.deadline_s
    settings.out = out
    hw = hardware.probe()
    cuda = hw.cuda
    flops = peak_flops(hw.device_name, settings.peak_flops)
    env: dict[str, Any] = {
        "cuda": cuda,
        "tokenizer": minimal_tokenizer(),
        "peak_flops": flops,
        "params": {s: parameter_count(SHAPES[s], settings.max_seq_length) for s in settings.shapes},
        "rows": random_rows(
            long_tailed_lengths(settings.rows, settings.median_length, settings.max_seq_length, seed=1),
            min(SHAPES[s].vocab for s in settings.shapes),
            seed=2,
        ),
    }
    header = {
        "device": hw.device_name,
        "peakBf16Tflops": flops / 1e12 if flops else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": {
            m: package_version(m) for m in ("transformers", "trl", "peft", "accelerate", "bitsandbytes")
        },
        "flashAttn": importable("flash_attn") if cuda else False,
        "ligerKernel": importable("liger_kernel.transformers") if cuda else False,
        "settings": {
            f.name: str(getattr(settings, f.name)) for f in dataclasses.fields(settings) if f.name != "out"
        },
    }
    log(json.dumps(header))
    defaults = {(s, m): default_option(s, m, settings) for s in settings.shapes for m in settings.methods}
    matrix = build_matrix(settings, defaults)
    log(f"{len(matrix)} options, deadline {settings.deadline_s:.0f} s")
    folders: dict[str, Path] = {}
    results: list[dict[str, Any]] = []
    loaded: Loaded | None = None
    load_seconds: dict[tuple[str, str], float] = {}
    try:
        for index, option in enumerate(matrix):
            base: dict[str, Any] = {"option": option.name, **dataclasses.asdict(option)}
            missing = missing_package(option, cuda)
            if missing is not None:
                results.append(base | {"status": "missing-package", "message": f"{missing} does not import"})
                emit(results[-1], settings)
                continue
            left = deadline - time.monotonic()
            needs_load = loaded is None or loaded.group != option.group or not settings.reuse
            expected_load = 0.0
            if needs_load:
                # Measured once known; before that a guess: writing bf16 at ~250 MB/s, reading at ~1 GB/s.
                size = 2 * env["params"][option.shape]
                guess = size / (1e9 if option.shape in folders else 250e6)
                expected_load = load_seconds.get((option.shape, option.method), guess)
            if left < expected_load + 5:
                skip_rest(matrix[index:], results, settings, cuda, f"deadline ({left:.0f} s left)")
                break
            record = dict(base)
            option_started = time.monotonic()
            try:
                if needs_load:
                    release(loaded)
                    loaded = None
                    loaded = load(option, settings, cuda, folders)
                    load_seconds[(option.shape, option.method)] = loaded.load_seconds
                    record |= {"modelLoad": "fresh", "loadSeconds": round(loaded.load_seconds, 1)}
                else:
                    record["modelLoad"] = "reused"
                assert loaded is not None
                loaded.uses += 1
                record |= {"status": "ok"} | run_option(option, loaded, settings, env, deadline)
            except DeadlineError:
                raise
            except BaseException as err:  # every failure is a result, and the check goes on
                if isinstance(err, KeyboardInterrupt):
                    raise
                record["status"], record["message"] = classify(err)
                log(f"{option.name}: {record['status']}\n{traceback.format_exc()[-3000:]}")
                release(loaded)
                loaded = None
            record["wallSeconds"] = round(time.monotonic() - option_started, 1)
            results.append(record)
            emit(record, settings)
    except DeadlineError:
        done = {r["option"] for r in results}
        skip_rest(
            [o for o in matrix if o.name not in done], results, settings, cuda, "SIGTERM (hard timeout)"
        )
    finally:
        release(loaded)
    return results


def skip_rest(
    options: Sequence[Option], results: list[dict[str, Any]], settings: Settings, cuda: bool, why: str
) -> None:
    for option in options:
        missing = missing_package(option, cuda)
        status = "missing-package" if missing else "skipped"
        message = f"{missing} does not import" if missing else f"not run: {why}"
        results.append(
            {"option": option.name, **dataclasses.asdict(option), "status": status, "message": message}
        )
        emit(results[-1], settings)


def package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def table(results: Sequence[dict[str, Any]]) -> str:
    def fmt(value: Any, spec: str, width: int) -> str:
        return f"{'-' if value is None else format(value, spec):>{width}}"

    rows = [
        f"{'option':58} {'status':15} {'tok/s':>9} {'MFU':>6} {'peak GiB':>8} {'pad':>6} {'load':>6}  note"
    ]
    for r in results:
        mfu, pad = r.get("mfu"), r.get("paddingWaste")
        note = r.get("message") or (f"stopped by {r['stoppedBy']}" if r.get("stoppedBy") else "")
        load_s = r.get("loadSeconds") if r.get("modelLoad") == "fresh" else None
        rows.append(
            f"{r['option']:58} {r['status']:15} {fmt(r.get('tokensPerSecond'), '.0f', 9)}"
            f" {fmt(mfu, '.1%', 6)} {fmt(r.get('peakMemGiB'), '.2f', 8)} {fmt(pad, '.1%', 6)}"
            f" {fmt(load_s, '.1f', 6)}  {note[:120]}"
        )
    return "\n".join(rows)


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shape, LoRA fp32, sdpa, one step, on CPU"
    )
    parser.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b, tiny")
    parser.add_argument("--methods", default="qlora,lora")
    parser.add_argument(
        "--attentions", help=f"default {','.join(ATTENTIONS)}; eager runs on the small shapes only"
    )
    parser.add_argument("--matrix", choices=("axes", "full"), default="axes", help="axes: one axis at a time")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per option")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument(
        "--rows", type=int, default=512, help="dataset rows (the length-grouped sampler sorts them)"
    )
    parser.add_argument("--median-length", type=int, default=350, help="median row length in tokens")
    parser.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--deadline-s", type=float, default=420.0, help="no option starts after this")
    parser.add_argument("--option-budget-s", type=float, default=60.0, help="training seconds per option")
    parser.add_argument(
        "--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (else from the device name)"
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/kubetune-gpu-check"))
    parser.add_argument("--jsonl", type=Path, help="also append each JSON line to this file")
    parser.add_argument("--no-reuse", action="store_true", help="load the model afresh for every option")
    parser.add_argument("--only", help="run only options whose name contains this")
    opts = parser.parse_args(argv)
    checkpointing = {"auto": None, "on": True, "off": False}[opts.gradient_checkpointing]
    settings = Settings(
        shapes=tuple(opts.shapes.split(",")),
        methods=tuple(opts.methods.split(",")),
        attentions=tuple((opts.attentions or ",".join(ATTENTIONS)).split(",")),
        matrix=opts.matrix,
        warmup=opts.warmup,
        steps=opts.steps,
        batch_size=opts.batch_size,
        max_seq_length=opts.max_seq_length,
        rows=opts.rows,
        median_length=opts.median_length,
        precision="bf16",
        gradient_checkpointing=checkpointing,
        deadline_s=opts.deadline_s,
        option_budget_s=opts.option_budget_s,
        peak_flops=opts.peak_tflops,
        work_dir=opts.work_dir,
        jsonl=opts.jsonl,
        reuse=not opts.no_reuse,
        only=opts.only,
    )
    if opts.cpu_smoke:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the same code on CPU, even on a GPU machine
        settings = dataclasses.replace(
            settings,
            shapes=("tiny",),
            methods=("lora",),
            attentions=settings.attentions if opts.attentions else ("flash_attention_2", "sdpa"),
            warmup=0,
            steps=1,
            batch_size=4,
            max_seq_length=128,
            rows=64,
            median_length=40,
            precision="fp32",
            deadline_s=min(opts.deadline_s, 110.0),
        )
    unknown = [s for s in settings.shapes if s not in SHAPES] + [
        m for m in settings.methods if m not in METHODS
    ]
    unknown += [a for a in settings.attentions if a not in ATTENTIONS]
    if unknown:
        parser.error(f"unknown shape, method or attention: {', '.join(unknown)}")
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    settings = parse(argv)

    def on_term(signum: int, frame: FrameType | None) -> None:
        raise DeadlineError(signum)

    signal.signal(signal.SIGTERM, on_term)
    settings.work_dir.mkdir(parents=True, exist_ok=True)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    datasets.disable_progress_bars()
    # stdout carries the JSON lines and the table only: the Trainer's own log lines go to stderr.
    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        results = run(settings, started, stdout)
    print(table(results), flush=True)
    ok = sum(r["status"] == "ok" for r in results)
    print(f"{ok} of {len(results)} options ran in {time.monotonic() - started:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
