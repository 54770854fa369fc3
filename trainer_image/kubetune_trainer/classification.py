"""Task sequence-classification: ``training`` -> ``TrainingArguments``, the tokenized rows, the
metrics, and transformers' ``Trainer`` (TRL has no classification trainer).

The model is the base with a classification head (``AutoModelForSequenceClassification``, loaded
by :func:`modeling.load_model` with the label set's ``num_labels``/``id2label``/``label2id``); a
LoRA adapter (qlora, lora) is peft's ``SEQ_CLS`` task, whose ``modules_to_save`` holds the head,
so the head trains and is saved with the adapter. full and freeze train the weights themselves.

The arguments come from the same declared map as SFT's (:mod:`.sft`): same-named ``training``
fields pass as they are, SFT's translations apply where TrainingArguments has the argument
(:func:`training_arguments`), and kubetune's fixed choices hold. ``maxSeqLength`` truncates each
text (or text pair) at tokenization; ``batching`` length-grouped is kubetune's sampler, padded
transformers' random order (padding-free does not apply: each row is one text, padded by the
collator). tests/trainer/test_classification.py checks that every field is accounted for.

Metrics (scikit-learn, on the validation data at every evaluation): accuracy, macro-averaged
precision, recall and F1 (over the classes in the validation labels or the predictions), per
class, and the confusion matrix (rows: the true label, columns: the predicted one) over every
class of the label set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kubetune_api.spec import TrainingSpec

from . import batching, sft, throughput

#: ``training`` fields that do not reach TrainingArguments, and why (refused at apply time).
NOT_APPLICABLE: Final = {
    "packing": "a classifier sees one text (or text pair) per row: nothing to pack",
}
#: ``training`` fields read at tokenization rather than by TrainingArguments.
READ_AT_TOKENIZATION: Final = frozenset({"max_seq_length"})
#: The metrics each evaluation logs (``eval_`` + these); metrics.json's names for them.
EVAL_METRICS: Final = {
    "accuracy": "evalAccuracy",
    "precision": "evalPrecision",
    "recall": "evalRecall",
    "f1": "evalF1",
}


def same_named(training: TrainingSpec, cls: type) -> dict[str, Any]:
    """The ``training`` fields ``cls`` takes under their own (snake_case) names."""
    return sft.passed_as_is(training, cls, NOT_APPLICABLE.keys() | READ_AT_TOKENIZATION)


def training_arguments(
    cls: type, training: TrainingSpec, plan: sft.Plan, output_dir: Path, **extra: Any
) -> Any:
    """``cls`` (TrainingArguments or a TRL config) from the declared map: the same-named fields,
    SFT's translations and fixed choices that ``cls`` has (so ``max_length`` reaches a TRL config
    that has one, and nothing reaches one that has not), then ``extra``."""
    names = sft.config_fields(cls)
    translated = {k: v for k, v in sft.translated(training, plan).items() if k in names}
    fixed = {k: v for k, v in sft.fixed_arguments(plan, output_dir).items() if k in names}
    return cls(**same_named(training, cls), **translated, **fixed, **extra)


def arguments(training: TrainingSpec, plan: sft.Plan, output_dir: Path) -> Any:
    from transformers import TrainingArguments

    return training_arguments(TrainingArguments, training, plan, output_dir)


def tokenized(dataset: Any, tokenizer: Any, max_length: int) -> Any:
    """``input_ids``/``attention_mask`` of each text (and its text_pair, if it has one), truncated to
    ``max_length`` tokens, and the label index; the text columns are dropped."""

    def encode(row: dict[str, Any]) -> Any:
        return tokenizer(row["text"], row.get("text_pair"), truncation=True, max_length=max_length)

    texts = [c for c in dataset.column_names if c != "label"]
    return dataset.map(encode, remove_columns=texts)


def classification_report(logits: Any, label_ids: Any, names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class figures and the confusion matrix (rows: true
    label, columns: predicted) of the predictions ``logits.argmax(-1)`` against ``label_ids``."""
    import numpy as np
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    predicted = np.asarray(logits).argmax(axis=-1)
    truth = np.asarray(label_ids)
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="macro", zero_division=0
    )
    every = list(range(len(names)))
    per = precision_recall_fscore_support(truth, predicted, labels=every, average=None, zero_division=0)
    return {
        "accuracy": float(accuracy_score(truth, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "perClass": {
            name: {
                "precision": float(per[0][i]),
                "recall": float(per[1][i]),
                "f1": float(per[2][i]),
                "support": int(per[3][i]),
            }
            for i, name in enumerate(names)
        },
        "confusionMatrix": {
            "labels": list(names),
            "matrix": confusion_matrix(truth, predicted, labels=every).tolist(),
        },
    }


@dataclass
class Metrics:
    """The Trainer's ``compute_metrics``: logs the scalar figures (``eval_accuracy``, ...) and keeps
    the latest full report (with the confusion matrix, which a log line cannot hold)."""

    names: tuple[str, ...]
    latest: dict[str, Any] | None = field(default=None)

    def __call__(self, prediction: Any) -> dict[str, float]:
        logits = (
            prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        )
        self.latest = classification_report(logits, prediction.label_ids, self.names)
        return {name: self.latest[name] for name in EVAL_METRICS}


def trainer_class(speed: throughput.ThroughputPlan) -> type:
    from transformers import Trainer

    if speed.batching == "length-grouped":
        return batching.length_grouped(Trainer, batching.row_lengths)
    trainer: type = Trainer
    return trainer


def prepare_model(model: Any, tokenizer: Any, peft_config: Any | None, gradient_checkpointing: bool) -> Any:
    """The classifier to train: the pad token set (the head reads each row's last non-pad token),
    and for an adapter method peft's model with the head in ``modules_to_save``."""
    model.config.pad_token_id = tokenizer.pad_token_id
    if peft_config is None:
        return model
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config)
    if gradient_checkpointing:  # the frozen embeddings' output must require grad for the adapter's
        peft_model.enable_input_require_grads()
    peft_model.print_trainable_parameters()
    return peft_model


def build_trainer(
    model: Any,
    *,
    tokenizer: Any,
    args: Any,
    datasets: tuple[Any, Any | None],
    peft_config: Any | None,
    callbacks: list[Any],
    speed: throughput.ThroughputPlan,
    max_length: int,
) -> Any:
    """transformers' Trainer over the tokenized rows, padded per batch, with the metrics over the
    label set the model's head was made for (its config's ``id2label``)."""
    from transformers import DataCollatorWithPadding

    labels = tuple(model.config.id2label[i] for i in range(model.config.num_labels))
    train_ds, eval_ds = datasets
    return trainer_class(speed)(
        model=prepare_model(model, tokenizer, peft_config, bool(args.activation_checkpointing)),
        args=args,
        data_collator=DataCollatorWithPadding(tokenizer),
        train_dataset=tokenized(train_ds, tokenizer, max_length),
        eval_dataset=None if eval_ds is None else tokenized(eval_ds, tokenizer, max_length),
        processing_class=tokenizer,
        compute_metrics=Metrics(labels),
        callbacks=callbacks,
    )


def metrics(log_history: list[dict[str, Any]], trainer: Any) -> dict[str, Any]:
    """metrics.json's classification figures: the label set, the last evaluation's accuracy,
    precision, recall and F1 (and per class, and its confusion matrix; None without validation
    data), and their history by step."""
    scorer: Metrics = trainer.compute_metrics
    report = scorer.latest or {}
    return {
        "labels": list(scorer.names),
        **{name: report.get(key) for key, name in EVAL_METRICS.items()},
        "perClass": report.get("perClass"),
        "confusionMatrix": report.get("confusionMatrix"),
        "evalHistory": [
            {"step": e["step"], **{key: e[f"eval_{key}"] for key in EVAL_METRICS}}
            for e in log_history
            if "eval_accuracy" in e
        ],
    }
