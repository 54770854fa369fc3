"""What TRL's preference trainers (DPO, ORPO, KTO, reward) share: the config from the declared
map, their length-grouped order, and the reward metrics.

Each objective's module (:mod:`.dpo`, :mod:`.orpo`, :mod:`.kto`) names its TRL config and trainer,
the ``training`` fields that do not apply to it and its own section's map; the rest is here and
built like :mod:`.sft`: every ``training`` field whose name the TRL config also has is passed as it
is, SFT's translations apply (:data:`sft.TRANSLATED`), kubetune's fixed choices hold. The tests of
each objective fail when a ``training`` field is in none of these places.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import TrainingSpec

from . import sft

log = logging.getLogger(__name__)

#: Why ``training.packing`` does not apply to the preference trainers (refused at apply time:
#: spec.NO_PACKING).
NO_PACKING: Final = "TRL's preference trainers do not pack: each prompt is batched with its own responses"
#: SFT's fixed arguments that the preference configs do not have.
SFT_ONLY_FIXED: Final = frozenset({"assistant_only_loss", "packing_strategy"})


def translated(training: TrainingSpec, plan: sft.Plan, config_class: type) -> dict[str, Any]:
    """SFT's translations, with the preference trainers' own length handling: TRL truncates every
    row at ``max_length`` itself (keep the start), and none of them batches padding-free (DPO's
    config has the switch, off; ORPO's and KTO's do not: their batching is the rows' order)."""
    arguments = {
        **sft.translated(training, plan),
        "max_length": training.max_seq_length,
        "padding_free": False,
    }
    return {name: value for name, value in arguments.items() if name in sft.config_fields(config_class)}


def fixed_arguments(plan: sft.Plan, output_dir: Path) -> dict[str, Any]:
    """kubetune's fixed choices for SFT, less the SFT-only ones. TRL's default of turning dropout
    off stays (each trainer scores its responses with the same network the reference, or the
    other response, is scored with), so ``lora.dropout`` does not apply to them."""
    fixed = sft.fixed_arguments(plan, output_dir)
    return {key: value for key, value in fixed.items() if key not in SFT_ONLY_FIXED}


def build_config(
    config_class: type,
    training: TrainingSpec,
    plan: sft.Plan,
    output_dir: Path,
    *,
    section: Mapping[str, Any],
    not_applicable: Mapping[str, str],
    reference: Mapping[str, Any] | None = None,
) -> Any:
    """The TRL config: same-named ``training`` fields, SFT's translations, the objective's section
    (already mapped to TRL's names) and kubetune's fixed choices; ``reference``: how TRL loads a
    reference copy, when it needs one (``model_init_kwargs``: modeling.reference_init_kwargs)."""
    return config_class(
        **sft.passed_as_is(training, config_class, not_applicable.keys()),
        **translated(training, plan, config_class),
        **section,
        **fixed_arguments(plan, output_dir),
        **({"model_init_kwargs": dict(reference)} if reference else {}),
    )


def pair_lengths(prompts: list[Any], chosen: list[Any], rejected: list[Any]) -> list[int]:
    """Token counts of tokenized pairs: the prompt and the longer response (a pair's chosen and
    rejected rows are padded to the batch's longest)."""
    return [len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected, strict=True)]


def log_reference(objective: str, args: Any, peft_config: Any | None) -> None:
    """Say which reference the trainer scores against: the base with the adapter disabled, or
    (no adapter) the frozen copy TRL loads with ``args.model_init_kwargs``. TRL then warns that
    model_init_kwargs "will be ignored": that is about the policy, which is loaded already."""
    if peft_config is not None:
        log.info("%s reference: the base model with the adapter disabled (no second copy)", objective)
    else:
        kwargs = args.model_init_kwargs or {}
        log.info("%s reference: a frozen copy of the base, loaded by TRL with %s", objective, kwargs)


def reward_metrics(log_history: list[dict[str, Any]], names: Mapping[str, str]) -> dict[str, Any]:
    """metrics.json's figures of a preference run: for each of TRL's logged ``names`` (-> the
    metrics.json name), the last training and evaluation values, and their history by step (TRL's
    own names in the history)."""
    out: dict[str, Any] = {}
    for trl_name, name in names.items():
        out[name] = last(log_history, trl_name)
        out["eval" + name[0].upper() + name[1:]] = last(log_history, f"eval_{trl_name}")
    out["rewardHistory"] = [
        {"step": e["step"], **{k: e[k] for k in names if k in e}}
        for e in log_history
        if any(k in e for k in names)
    ]
    return out


def last(log_history: list[dict[str, Any]], key: str) -> float | None:
    """The latest logged value of ``key`` (None if never logged)."""
    value = next((e[key] for e in reversed(log_history) if key in e), None)
    return None if value is None else float(value)
