"""Hardware decisions: numeric precision and the launched world size.

The decisions are pure functions of a :class:`Hardware` description so they can
be tested without a GPU; :func:`probe` fills it in from torch at run time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune_api.spec import Precision

from .errors import InvalidConfigError, WorldSizeMismatchError

ResolvedPrecision = Literal["bf16", "fp16", "fp32"]
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    cuda_bf16: bool
    cpu_bf16: bool
    device_name: str


@dataclass(frozen=True)
class PrecisionChoice:
    precision: ResolvedPrecision
    reason: str

    @property
    def torch_dtype_name(self) -> str:
        return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[self.precision]


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    words = set(text.split())
    return any(flag in words for flag in _CPU_BF16_FLAGS)


def probe() -> Hardware:
    import torch

    cuda = torch.cuda.is_available()
    return Hardware(
        cuda=cuda,
        cuda_bf16=bool(cuda and torch.cuda.is_bf16_supported()),
        cpu_bf16=cpu_has_native_bf16(),
        device_name=torch.cuda.get_device_name(0) if cuda else "cpu",
    )


def choose_precision(requested: Precision, hw: Hardware) -> PrecisionChoice:
    """bf16 where the device runs it natively, fp16 on older GPUs, fp32 on other CPUs."""
    if requested == "auto":
        if hw.cuda:
            if hw.cuda_bf16:
                return PrecisionChoice("bf16", f"auto: {hw.device_name} supports bf16")
            return PrecisionChoice("fp16", f"auto: {hw.device_name} lacks bf16, using fp16 mixed precision")
        if hw.cpu_bf16:
            return PrecisionChoice("bf16", "auto: CPU has native bf16 (avx512_bf16/amx_bf16)")
        return PrecisionChoice("fp32", "auto: CPU without native bf16; bf16 would be emulated and slow")
    if requested == "fp16" and not hw.cuda:
        raise InvalidConfigError("training.precision fp16 needs a CUDA GPU; use auto, bf16 or fp32 on CPU")
    if requested == "bf16" and hw.cuda and not hw.cuda_bf16:
        raise InvalidConfigError(
            f"training.precision bf16 requested but {hw.device_name} does not support bf16;"
            " set training.precision to auto or fp16"
        )
    return PrecisionChoice(requested, f"requested {requested} in the config")


def launched_world_size() -> int:
    """Processes started by the launcher (``accelerate launch``/torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def expected_processes(gpus: int, processes: int | None) -> int:
    """The world size a config asks for: ``processes``, else one per GPU, else one on CPU."""
    if processes is not None:
        return processes
    return max(gpus, 1)


def check_world_size(gpus: int, world_size: int, visible_gpus: int, processes: int | None = None) -> None:
    """Fail when the launch does not match the config (accelerate can fall back to 1 process).

    ``processes`` is the config's ``processes`` (spec.resources.processes): on CPU more than one
    process trains over gloo; with GPUs it equals ``gpus`` (the API refuses anything else).
    """
    expected = expected_processes(gpus, processes)
    if gpus == 0:
        if world_size != expected:
            launch = (
                "python" if expected == 1 else f"accelerate launch --multi_gpu --num_processes {expected}"
            )
            raise WorldSizeMismatchError(
                f"gpus is 0 (CPU) and processes is {expected}, but {world_size} process(es) were"
                f" launched; run `{launch}` (resources.processes sets the number on CPU)"
            )
        return
    if visible_gpus < gpus:
        raise WorldSizeMismatchError(
            f"{gpus} GPU(s) requested but only {visible_gpus} visible to the process;"
            " check resources.gpus and resources.gpuResourceName against the node's GPU device plugin"
        )
    if world_size != expected:
        raise WorldSizeMismatchError(
            f"{gpus} GPU(s) requested but the launcher started {world_size} process(es); "
            f"run `accelerate launch --num_processes {expected}`"
        )


def check_strategy(strategy: str, fsdp_enabled: bool) -> None:
    """Fail when FSDP was asked for but the Trainer did not shard (or the reverse).

    accelerate turns ``ACCELERATE_USE_FSDP`` into FSDP only on GPUs; elsewhere (CPU, a launch
    without ``--use_fsdp``) it trains plain data parallel without a word, which on GPUs means
    a full model per GPU and an out-of-memory later. Call with the Trainer's ``is_fsdp_enabled``.
    """
    if (strategy == "fsdp") != fsdp_enabled:
        actual = "FSDP" if fsdp_enabled else "plain data parallel (DDP)"
        raise WorldSizeMismatchError(
            f"distributed.strategy is {strategy} but the Trainer runs {actual}; the launch command must"
            " carry accelerate's --use_fsdp flags exactly when the strategy is fsdp, on GPUs"
        )
