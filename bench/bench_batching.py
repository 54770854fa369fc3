"""Training throughput on this CPU: kubetune's batching defaults vs. plain TRL SFT (padded batches).

Same random-init Llama (4 layers, hidden 256), same LoRA (r 16), same long-tailed text data, seed
and steps. Each variant trains in its own process (so peak RSS is its own) and reports:

- real tokens/s: non-padding tokens trained per second of ``trainer.train()``;
- padding waste: padding tokens / all tokens in the batches the collator actually built;
- peak RSS of the process;
- final loss: the token-weighted next-token loss of the trained model on the same held-out rows,
  each row run alone (so no batching choice can bias it).

Variants: ``trl-padded`` (the baseline: TRL's SFTConfig and SFTTrainer with its defaults, random
order padded to the longest row); ``trl-group-by-length`` (transformers' own length-grouped
sampler, to show what kubetune's sampler adds); ``kubetune-auto`` (the trainer's own code path:
``throughput.plan`` for this hardware, ``sft.sft_config``, ``sft.build_trainer``); and
``kubetune-padding-free`` (the same path with ``training.batching: padding-free``: flattened rows
with transformers' block-diagonal mask on sdpa).

    .venv/bin/python bench/bench_batching.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

COMMAND = "python bench/bench_batching.py"
VARIANTS = ("trl-padded", "trl-group-by-length", "kubetune-auto", "kubetune-padding-free")
BATCH_SIZE = 8
MAX_LENGTH = 1024


def long_tailed_rows(tokenizer: Any, count: int, seed: int) -> list[dict[str, str]]:
    """Text rows of log-normal length in words (median ~90, a tail to 1,000): like chat data."""
    rng = random.Random(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    return [
        {
            "text": " ".join(
                rng.choice(words) for _ in range(min(1000, max(8, int(rng.lognormvariate(4.5, 0.8)))))
            )
        }
        for _ in range(count)
    ]


class CountingCollator:
    """Wraps the trainer's collator and counts real and padding tokens of every batch it builds."""

    def __init__(self, inner: Any, pad_id: int) -> None:
        self.inner, self.pad_id = inner, pad_id
        self.real = self.total = 0

    def __call__(self, examples: list[dict[str, Any]]) -> Any:
        batch = self.inner(examples)
        self.total += int(batch["input_ids"].numel())
        self.real += sum(len(e["input_ids"]) for e in examples)
        return batch


def held_out_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Token-weighted next-token loss over ``rows``, each run alone."""
    import torch

    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"]
            batch = torch.tensor([ids])
            loss = model(input_ids=batch, labels=batch).loss
            total += float(loss) * (len(ids) - 1)
            tokens += len(ids) - 1
    return total / tokens


def run_variant(variant: str, steps: int, work: Path) -> dict[str, Any]:
    """Train one variant and measure it (runs in a child process)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import LlamaForCausalLM
    from trl.trainer.sft_config import SFTConfig
    from trl.trainer.sft_trainer import SFTTrainer

    from kubetune_api.spec import TrainingSpec
    from kubetune_localenv import tinymodel
    from kubetune_trainer import hardware, sft, throughput

    tokenizer = tinymodel.build_tokenizer()
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    train_rows, eval_rows = long_tailed_rows(tokenizer, 2000, seed=1), long_tailed_rows(tokenizer, 48, seed=2)
    torch.manual_seed(0)
    config = tinymodel.llama_config(tokenizer, hidden=256, layers=4, heads=8)
    config.max_position_embeddings = MAX_LENGTH
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    common: dict[str, Any] = {
        "per_device_train_batch_size": BATCH_SIZE,
        "max_steps": steps,
        "learning_rate": 1e-3,
        "seed": 42,
    }
    if variant.startswith("trl-"):
        strategy = "group_by_length" if variant == "trl-group-by-length" else "random"
        args = SFTConfig(
            output_dir=str(work),
            max_length=MAX_LENGTH,
            use_cpu=True,
            bf16=False,
            report_to="none",
            disable_tqdm=True,
            save_strategy="no",
            logging_steps=1000,
            dataloader_num_workers=0,
            train_sampling_strategy=strategy,
            **common,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=tokenizer,
            peft_config=lora,
        )
        choice = {"batching": "padded" if strategy == "random" else "group_by_length (transformers)"}
    else:
        batching = "padding-free" if variant == "kubetune-padding-free" else "auto"
        training = TrainingSpec.model_validate(
            {
                "perDeviceTrainBatchSize": BATCH_SIZE,
                "maxSteps": steps,
                "learningRate": 1e-3,
                "maxSeqLength": MAX_LENGTH,
                "saveStrategy": "no",
                "loggingSteps": 1000,
                "batching": batching,
            }
        )
        hw = hardware.probe()
        precision = hardware.choose_precision(training.precision, hw)
        speed = throughput.plan(training, "lora", hw, precision, throughput.installed())
        plan = sft.Plan(precision, hw.cuda, False, False, speed)
        args = sft.sft_config(training, plan, work)
        args.disable_tqdm = True
        trainer = sft.build_trainer(
            model,
            tokenizer=tokenizer,
            args=args,
            datasets=(Dataset.from_list(train_rows), None),
            peft_config=lora,
            callbacks=[],
            speed=speed,
            max_row_length=MAX_LENGTH,
        )
        choice = {"batching": speed.batching, "attention": speed.attn_implementation, "optim": speed.optim}
    counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
    trainer.data_collator = counter
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {
        "variant": variant,
        **choice,
        "seconds": round(seconds, 2),
        "realTokensPerSecond": round(counter.real / seconds, 1),
        "paddingWaste": round(1 - counter.real / counter.total, 4),
        "peakRssMiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "heldOutLoss": round(held_out_loss(trainer.model, tokenizer, eval_rows), 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--variant", choices=VARIANTS, help="run one variant and print its JSON (internal)")
    opts = parser.parse_args()
    if opts.variant:
        with tempfile.TemporaryDirectory() as work:
            print(json.dumps(run_variant(opts.variant, opts.steps, Path(work))))
        return
    results = {}
    for variant in VARIANTS:
        child = subprocess.run(
            [sys.executable, __file__, "--steps", str(opts.steps), "--variant", variant],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if child.returncode != 0:
            sys.exit(f"{variant} failed:\n{child.stderr[-3000:]}")
        results[variant] = json.loads(child.stdout.strip().splitlines()[-1])
    base = results["trl-padded"]
    print(
        f"{'variant':24} {'batching':32} {'real tok/s':>10} {'vs TRL':>7} {'padding':>8}"
        f" {'RSS MiB':>8} {'loss':>7}"
    )
    for variant, r in results.items():
        ratio = r["realTokensPerSecond"] / base["realTokensPerSecond"]
        print(
            f"{variant:24} {r['batching']:32} {r['realTokensPerSecond']:10.0f} {ratio:6.2f}x"
            f" {100 * r['paddingWaste']:7.1f}% {r['peakRssMiB']:8.0f} {r['heldOutLoss']:7.4f}"
        )
    auto = results["kubetune-auto"]
    loss_change = auto["heldOutLoss"] / base["heldOutLoss"] - 1
    speedup = auto["realTokensPerSecond"] / base["realTokensPerSecond"]
    print(
        f"\nkubetune-auto vs plain TRL: {speedup:.2f}x real tokens/s,"
        f" {100 * auto['paddingWaste']:.1f}% padding, held-out loss {100 * loss_change:+.2f}%"
    )
    print(f"reproduce: {COMMAND} --steps {opts.steps}")


if __name__ == "__main__":
    main()
