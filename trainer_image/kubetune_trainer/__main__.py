"""``python -m kubetune_trainer --config PATH`` (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kubetune_api import wellknown
from kubetune_api.base import field_errors
from kubetune_api.trainer import KUBETUNE_VERSION, TrainerConfig

log = logging.getLogger("kubetune_trainer")


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_config(path: str) -> TrainerConfig:
    from .errors import InvalidConfigError

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        return TrainerConfig.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidConfigError(_invalid_config_message(path, _raw_config(text), exc)) from exc


#: The config's sections that are the FineTuneJob spec's own (the operator fills in the rest).
_SPEC_SECTIONS = (
    "model",
    "dataset",
    "method",
    "quantization",
    "lora",
    "training",
    "storage",
    "output",
    "tracking",
)


def _raw_config(text: str) -> dict[str, Any]:
    """The config as plain JSON, to read what an invalid config still says; {} if it is not an object."""
    try:
        raw = json.loads(text)
    except ValueError:
        return {}
    return raw if isinstance(raw, dict) else {}


def _invalid_config_message(path: str, raw: dict[str, Any], exc: ValidationError) -> str:
    """What is wrong; for fields this trainer does not know, also both versions and what to do.

    A config is parsed strictly: a field this trainer does not know may be a newer operator's
    feature (a new objective, say), and training without it would train something other than
    what was asked. The operator writes only fields that differ from their defaults, so such a
    field means the job uses a feature this trainer lacks.
    """
    writer = raw.get("kubetuneVersion")
    writer = writer if isinstance(writer, str) and writer else None
    unknown, others = [], []
    for error, line in zip(exc.errors(), field_errors(exc), strict=True):
        if error["type"] == "extra_forbidden":
            unknown.append(line.removesuffix(f": {error['msg']}"))
        else:
            others.append(line)
    if not unknown:
        message = f"invalid config {path}:\n{exc}"
        if writer is not None and writer != KUBETUNE_VERSION:
            message += (
                f"\n(the config was written by kubetune operator {writer} and this trainer is "
                f"{KUBETUNE_VERSION}: a value a newer operator accepts may be one this trainer does not; "
                "use a trainer image at least as new as the operator)"
            )
        return message
    lines = [f"config {path} has field(s) this trainer does not know: {', '.join(unknown)}."]
    if writer == KUBETUNE_VERSION:
        lines.append(
            f"It was written by kubetune operator {writer}, the same version as this trainer, "
            "so they are not kubetune fields: remove them."
        )
    else:
        lines.append(
            (f"It was written by kubetune operator {writer}" if writer else "It records no operator version")
            + f" and this trainer is version {KUBETUNE_VERSION}."
        )
        remedy = (
            "Use a trainer image at least as new as the operator: unset spec.image (the operator "
            "then runs the trainer of its own version), or pin "
            + (f"a trainer image of version {writer} or later" if writer else "a newer trainer image")
        )
        in_spec = [f"spec.{field}" for field in unknown if field.partition(".")[0] in _SPEC_SECTIONS]
        if in_spec:
            remedy += f"; or unset {', '.join(in_spec)} in the FineTuneJob"
        lines.append(remedy + ".")
    if others:
        lines.append("Also invalid:\n  " + "\n  ".join(others))
    return "\n".join(lines)


def _report(cfg: TrainerConfig | None, summary: dict[str, Any], config_path: str) -> None:
    from .reporting import write_termination_message

    write_termination_message(_termination_path(cfg, config_path), summary)


def _termination_path(cfg: TrainerConfig | None, config_path: str) -> str:
    """The config's terminationMessagePath; for a config that did not parse, what its JSON says."""
    if cfg is not None:
        return cfg.reporting.termination_message_path
    try:
        raw = _raw_config(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        raw = {}
    reporting = raw.get("reporting")
    declared = reporting.get("terminationMessagePath") if isinstance(reporting, dict) else None
    return declared if isinstance(declared, str) and declared else wellknown.TERMINATION_MESSAGE_PATH


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kubetune-trainer", description=__doc__)
    parser.add_argument("--config", required=True, help="path of the trainer config (JSON)")
    args = parser.parse_args(argv)
    _setup_logging()

    from .checkpoints import Terminated
    from .errors import TrainerError

    cfg: TrainerConfig | None = None
    try:
        cfg = _load_config(args.config)
        from .train import run

        summary = run(cfg)
    except TrainerError as exc:
        log.error("%s", exc)
        _report(
            cfg,
            {"phase": "Failed", "reason": type(exc).__name__, "exitCode": exc.exit_code, "error": str(exc)},
            args.config,
        )
        return exc.exit_code
    except Terminated as exc:
        log.warning("%s", exc)
        _report(
            cfg,
            {"phase": "Interrupted", "lastCheckpointStep": exc.step, "exitCode": exc.exit_code},
            args.config,
        )
        return exc.exit_code
    except Exception as exc:  # a crash: summarise it, then let the traceback and exit code 1 through
        _report(
            cfg,
            {"phase": "Failed", "reason": type(exc).__name__, "exitCode": 1, "error": str(exc)[:1000]},
            args.config,
        )
        raise
    log.info("summary: %s", json.dumps(summary, default=str))
    _report(cfg, summary, args.config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
