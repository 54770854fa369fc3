"""Sample generations (``evaluation``): prompts answered by the base model and by the trained one.

People judge a fine-tune by reading what it writes. After training, the main process answers
``evaluation.samplePrompts`` (else up to ``numSamples`` validation prompts) greedily, at most
``maxNewTokens`` new tokens each, in batches of ``training.perDeviceEvalBatchSize``, twice:
without the trained weights and with them. The result (``samples.jsonl``, one ``{"prompt",
"base", "tuned"}`` per line) is published with the output, before the manifest; the model card
shows the first few.

"Without the trained weights" never costs a second model in memory:

* adapters (qlora, lora, prompt-tuning, prefix-tuning): after training, with peft's adapter
  disabled (``PeftModel.disable_adapter``), on the same weights;
* full and freeze change the model's own weights, so the base answers are generated before the
  first step (:func:`prepare`, from the build stage: the loaded weights are the base's even when
  the run resumes, since the Trainer loads a checkpoint's weights inside ``train()``).

A prompt is rendered as training renders the data's prompts: a conversation (alpaca, chat,
conversational preference records) through the chat template with the generation prompt, a
string (prompt_completion, text preference/unpaired records) as it is. The text format has no
prompts: samples then come from ``samplePrompts`` only. Nothing is generated for a
classification or reward model (no text to generate), nor under FSDP (the sharded model
generates on no single process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_api.spec import EvaluationSpec
from kubetune_api.trainer import TrainerConfig

log = logging.getLogger(__name__)

#: The published file: one JSON object per line, ``{"prompt", "base", "tuned"}``.
SAMPLES_FILE = "samples.jsonl"


@dataclass(frozen=True)
class Pending:
    """What :func:`prepare` decided: the rendered prompts, and the base's answers when they had
    to be generated before training (full, freeze)."""

    prompts: tuple[str, ...] = ()
    #: Whether a prompt's tokens take the tokenizer's special tokens (plain text, as TRL
    #: tokenizes it) or not (a chat template already renders them).
    special_tokens: bool = True
    max_new_tokens: int = 64
    #: Prompts are cut to their last this many tokens (training.maxSeqLength).
    max_length: int = 1024
    #: Prompts generated together (training.perDeviceEvalBatchSize: sized for the device).
    batch_size: int = 4
    base: tuple[str, ...] | None = None


def why_none(cfg: TrainerConfig) -> str | None:
    """Why this run generates no samples at all, or None."""
    if cfg.task == "sequence-classification" or cfg.objective == "reward":
        return "a classification or reward model does not generate text"
    if cfg.distributed.strategy == "fsdp":
        return "under FSDP the sharded model generates on no single process"
    if cfg.evaluation.sample_prompts is None and cfg.evaluation.num_samples == 0:
        return "evaluation.numSamples is 0"
    return None


def render_row(row: Mapping[str, Any], tokenizer: Any) -> str | None:
    """A TRL row's prompt as the model sees it, or None for a row without one (text)."""
    if "messages" in row:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return _chat(messages[:last], tokenizer)
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _chat(prompt, tokenizer)
    return prompt if isinstance(prompt, str) else None


def render_prompt(text: str, conversational: bool, tokenizer: Any) -> str:
    """A ``samplePrompts`` entry: a user turn for a model trained on conversations, else as is."""
    return _chat([{"role": "user", "content": text}], tokenizer) if conversational else text


def _chat(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> str:
    return str(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False))


def choose_prompts(
    evaluation: EvaluationSpec, eval_rows: Iterable[Mapping[str, Any]], conversational: bool, tokenizer: Any
) -> list[str]:
    """``samplePrompts``, rendered; else the first ``numSamples`` validation rows' prompts."""
    if evaluation.sample_prompts is not None:
        return [render_prompt(text, conversational, tokenizer) for text in evaluation.sample_prompts]
    found: list[str] = []
    for row in eval_rows:
        if len(found) >= evaluation.num_samples:
            break
        text = render_row(row, tokenizer)
        if text is not None:
            found.append(text)
    return found


def generate(model: Any, tokenizer: Any, pending: Pending) -> list[str]:
    """Greedy answers to ``pending.prompts`` (the new tokens only, special tokens dropped), in
    batches of ``pending.batch_size`` left-padded prompts, in eval mode, then back."""
    import torch

    was_training, sides = model.training, (tokenizer.padding_side, tokenizer.truncation_side)
    model.eval()
    # Left: the answer follows each prompt's last token; a long prompt keeps its end.
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    device = next(model.parameters()).device
    answers: list[str] = []
    try:
        for start in range(0, len(pending.prompts), pending.batch_size):
            encoded = tokenizer(
                list(pending.prompts[start : start + pending.batch_size]),
                add_special_tokens=pending.special_tokens,
                padding=True,
                truncation=True,
                max_length=pending.max_length,
                return_tensors="pt",
            ).to(device)
            with torch.no_grad():
                out = model.generate(
                    input_ids=encoded.input_ids,
                    attention_mask=encoded.attention_mask,
                    max_new_tokens=pending.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    use_cache=True,  # the training config turned the cache off
                )
            new_tokens = out[:, encoded.input_ids.shape[1] :]
            answers += [str(a) for a in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        model.train(was_training)
        tokenizer.padding_side, tokenizer.truncation_side = sides
    return answers


def is_adapter(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def prepare(
    cfg: TrainerConfig, model: Any, tokenizer: Any, datasets: tuple[Any, Any | None], main: bool
) -> Pending:
    """The prompts of this run (build stage, before training) and, for a model without an adapter
    (full, freeze), the base's answers now, on the main process."""
    from trl.data_utils import is_conversational

    why = why_none(cfg)
    train, validation = datasets
    conversational = is_conversational(dict(train[0]))
    prompts = [] if why else choose_prompts(cfg.evaluation, validation or [], conversational, tokenizer)
    if not why and not prompts:
        why = "no evaluation.samplePrompts, and no validation prompts to sample (text records have none)"
    if why:
        log.info("samples: none (%s)", why)
        return Pending()
    evaluation = cfg.evaluation
    training = cfg.training
    pending = Pending(
        tuple(prompts),
        not conversational,
        evaluation.max_new_tokens,
        training.max_seq_length,
        training.per_device_eval_batch_size,
    )
    source = "evaluation.samplePrompts" if evaluation.sample_prompts is not None else "validation data"
    log.info("samples: %d prompts from %s, answered after training", len(prompts), source)
    if main and not is_adapter(model):
        log.info("samples: the base model answers before training (method %s trains its weights)", cfg.method)
        return dataclasses.replace(pending, base=tuple(generate(model, tokenizer, pending)))
    return pending


def finish(pending: Pending, model: Any, tokenizer: Any) -> list[dict[str, str]]:
    """The trained model's answers and the base's (the adapter disabled, or from before
    training): the rows of ``samples.jsonl``. Main process only."""
    if not pending.prompts:
        return []
    tuned = generate(model, tokenizer, pending)
    base = pending.base
    if base is None:
        with model.disable_adapter():
            base = tuple(generate(model, tokenizer, pending))
    log.info("samples: %d prompts answered with and without the trained weights", len(tuned))
    return [
        {"prompt": prompt, "base": before, "tuned": after}
        for prompt, before, after in zip(pending.prompts, base, tuned, strict=True)
    ]


def write(folder: Path, rows: Sequence[Mapping[str, str]]) -> None:
    """``samples.jsonl`` in ``folder`` (none without rows; a stale one from an earlier attempt goes)."""
    path = folder / SAMPLES_FILE
    path.unlink(missing_ok=True)
    if rows:
        path.write_text("".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows))
