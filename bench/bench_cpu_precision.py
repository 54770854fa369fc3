"""Training speed on this CPU: kubetune's precision choice vs. TRL's defaults.

TRL's SFTConfig defaults to ``bf16=True`` and gradient checkpointing on. On a CPU
without native bf16 that means emulated bf16 and recomputed activations. kubetune's
``hardware.choose_precision("auto", ...)`` picks fp32 (or bf16 where the CPU has it)
and turns checkpointing off on CPU. This benchmark trains the same LoRA on the same
small random Llama for the same steps both ways and prints the steps/s ratio.

    .venv/bin/python bench/bench_cpu_precision.py --steps 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kubetune_localenv import tinymodel
from kubetune_trainer import hardware

COMMAND = "python bench/bench_cpu_precision.py"


def _model(tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # Larger than the test model so that compute, not Python overhead, dominates a step.
    return LlamaForCausalLM(tinymodel.llama_config(tokenizer, hidden=256, layers=4, heads=8))


def train_once(steps: int, *, bf16: bool, checkpointing: bool, work: Path) -> float:
    """Seconds per step for ``steps`` LoRA steps (after one warm-up step)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    tokenizer = tinymodel.build_tokenizer()
    rows = [{"text": r["text"] * 4} for r in tinymodel.text_records(64)]
    args = SFTConfig(
        output_dir=str(work),
        per_device_train_batch_size=8,
        max_steps=steps + 1,
        learning_rate=1e-3,
        logging_steps=1000,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        bf16=bf16,
        activation_checkpointing=checkpointing,
        max_length=128,
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(
        model=_model(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    step_times: list[float] = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        started = 0.0

        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_times.append(time.perf_counter() - self.started)

    trainer.add_callback(Timer())
    trainer.train()
    measured = step_times[1:]  # the first step pays one-off costs
    return sum(measured) / len(measured)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    steps = max(2, min(args.steps, 500))

    hw = hardware.probe()
    choice = hardware.choose_precision("auto", hw)
    print(f"kubetune's choice here: {choice.precision} ({choice.reason}); gradient checkpointing off on CPU")
    with tempfile.TemporaryDirectory() as tmp:
        ours = train_once(
            steps, bf16=choice.precision == "bf16", checkpointing=False, work=Path(tmp) / "ours"
        )
        trl_defaults = train_once(steps, bf16=True, checkpointing=True, work=Path(tmp) / "trl")
    print(f"kubetune ({choice.precision}, no checkpointing): {ours * 1000:.0f} ms/step")
    print(f"TRL defaults (bf16, gradient checkpointing): {trl_defaults * 1000:.0f} ms/step")
    print(f"TRL defaults / kubetune time-per-step ratio: {trl_defaults / ours:.1f}")
    print(f"reproduce: {COMMAND} --steps {steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
