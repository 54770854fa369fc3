"""The config schema, precision choice and world-size check: pure functions, no GPU needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from kubetune_api.exitcodes import ExitCode
from kubetune_api.trainer import TrainerConfig
from kubetune_trainer.errors import InvalidConfigError, WorldSizeMismatchError
from kubetune_trainer.hardware import (
    Hardware,
    check_strategy,
    check_world_size,
    choose_precision,
    cpu_has_native_bf16,
    expected_processes,
)

MINIMAL = {
    "model": {"source": "s3://models/tiny"},
    "dataset": {"train": "s3://data/train.jsonl"},
    "output": {"uri": "s3://out/job"},
}


def test_minimal_config_round_trips_with_camel_case() -> None:
    cfg = TrainerConfig.model_validate({**MINIMAL, "training": {"maxSeqLength": 512}, "workDir": "/scratch"})
    again = TrainerConfig.model_validate_json(cfg.to_json())
    assert again == cfg
    # Only what differs from the defaults is written (tests/api/test_trainer_config.py says why).
    assert json.loads(cfg.to_json()) == {**MINIMAL, "training": {"maxSeqLength": 512}, "workDir": "/scratch"}


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"training": {"evalStrategy": "steps", "evalSteps": 5}}, "needs dataset.validation"),
        ({"training": {"warmupRatio": 0.1, "warmupSteps": 10}}, "warmupSteps are exclusive"),
        ({"method": "qlora", "quantization": {"bits": 8}}, "bits must be 4 when method is qlora"),
        ({"training": {"bogus": 1}}, "Extra inputs are not permitted"),
    ],
)
def test_inconsistent_configs_are_rejected(patch: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainerConfig.model_validate({**MINIMAL, **patch})


def test_invalid_config_file_exits_43(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    # An invalid config still reports to the terminationMessagePath its JSON names.
    term = tmp_path / "term"
    path.write_text(
        json.dumps({**MINIMAL, "method": "ia3", "reporting": {"terminationMessagePath": str(term)}})
    )
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == ExitCode.INVALID_CONFIG
    assert "invalid config" in proc.stderr
    assert "method" in proc.stderr
    assert json.loads(term.read_text())["exitCode"] == ExitCode.INVALID_CONFIG


GPU_BF16 = Hardware(cuda=True, cuda_bf16=True, cpu_bf16=False, device_name="NVIDIA A100")
GPU_FP16 = Hardware(cuda=True, cuda_bf16=False, cpu_bf16=False, device_name="Tesla T4")
CPU_PLAIN = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=False, device_name="cpu")
CPU_BF16 = Hardware(cuda=False, cuda_bf16=False, cpu_bf16=True, device_name="cpu")


@pytest.mark.parametrize(
    ("hw", "expected"),
    [(GPU_BF16, "bf16"), (GPU_FP16, "fp16"), (CPU_PLAIN, "fp32"), (CPU_BF16, "bf16")],
)
def test_auto_precision_follows_the_hardware(hw: Hardware, expected: str) -> None:
    choice = choose_precision("auto", hw)
    assert choice.precision == expected
    assert choice.reason.startswith("auto:")


def test_explicit_precision_the_hardware_cannot_run_is_a_config_error() -> None:
    with pytest.raises(InvalidConfigError, match="fp16 needs a CUDA GPU"):
        choose_precision("fp16", CPU_PLAIN)
    with pytest.raises(InvalidConfigError, match="Tesla T4 does not support bf16"):
        choose_precision("bf16", GPU_FP16)
    assert choose_precision("fp32", GPU_BF16).precision == "fp32"


def test_cpu_bf16_flag_detection(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16(info)
    info.write_text("flags\t\t: fpu sse avx512f\n")
    assert not cpu_has_native_bf16(info)
    assert not cpu_has_native_bf16(tmp_path / "missing")


def test_world_size_must_match_the_gpus_requested() -> None:
    check_world_size(gpus=4, world_size=4, visible_gpus=4)
    check_world_size(gpus=0, world_size=1, visible_gpus=0)
    with pytest.raises(WorldSizeMismatchError, match="launcher started 1 process"):
        check_world_size(gpus=4, world_size=1, visible_gpus=4)
    with pytest.raises(WorldSizeMismatchError, match="only 2 visible"):
        check_world_size(gpus=4, world_size=4, visible_gpus=2)
    with pytest.raises(WorldSizeMismatchError, match="gpus is 0"):
        check_world_size(gpus=0, world_size=2, visible_gpus=0)


def test_cpu_runs_as_many_processes_as_the_config_asks() -> None:
    """resources.processes on CPU: the launch must start exactly that many (gloo data parallel)."""
    assert expected_processes(gpus=0, processes=None) == 1
    assert expected_processes(gpus=0, processes=3) == 3
    assert expected_processes(gpus=4, processes=None) == 4
    check_world_size(gpus=0, world_size=2, visible_gpus=0, processes=2)
    check_world_size(gpus=4, world_size=4, visible_gpus=4, processes=4)
    with pytest.raises(WorldSizeMismatchError, match="processes is 2, but 1 process"):
        check_world_size(gpus=0, world_size=1, visible_gpus=0, processes=2)
    with pytest.raises(WorldSizeMismatchError, match="--num_processes 2"):
        check_world_size(gpus=0, world_size=3, visible_gpus=0, processes=2)


def test_fsdp_must_have_taken_effect() -> None:
    """accelerate drops --use_fsdp without a word where it cannot shard (CPU): the trainer must not."""
    check_strategy("ddp", fsdp_enabled=False)
    check_strategy("fsdp", fsdp_enabled=True)
    with pytest.raises(WorldSizeMismatchError, match="strategy is fsdp but the Trainer runs plain data"):
        check_strategy("fsdp", fsdp_enabled=False)
    with pytest.raises(WorldSizeMismatchError, match="strategy is ddp but the Trainer runs FSDP"):
        check_strategy("ddp", fsdp_enabled=True)


def test_world_size_mismatch_exits_44(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**MINIMAL, "reporting": {"terminationMessagePath": str(tmp_path / "term")}}))
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "WORLD_SIZE": "2"},
        check=False,
    )
    assert proc.returncode == 44, proc.stderr
    summary = json.loads((tmp_path / "term").read_text())
    assert summary["reason"] == "WorldSizeMismatchError"


def test_config_and_pipeline_modules_import_without_heavy_libraries() -> None:
    """The operator imports the schema; the entrypoint must validate data before loading torch."""
    code = (
        "import sys, kubetune_api.trainer, kubetune_trainer.__main__, kubetune_trainer.train\n"
        "names = ('torch', 'transformers', 'trl', 'peft', 'datasets', 'boto3')\n"
        "heavy = [m for m in names if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
