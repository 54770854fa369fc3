"""``python -m kubetune_trainer --config PATH`` (also under ``accelerate launch``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from pydantic import ValidationError

from kubetune_api import wellknown
from kubetune_api.trainer import TrainerConfig

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
        return TrainerConfig.from_file(path)
    except OSError as exc:
        raise InvalidConfigError(f"cannot read config {path}: {exc}") from exc
    except ValidationError as exc:
        raise InvalidConfigError(f"invalid config {path}:\n{exc}") from exc


def _report(cfg: TrainerConfig | None, summary: dict[str, Any]) -> None:
    from .reporting import write_termination_message

    path = cfg.reporting.termination_message_path if cfg else wellknown.TERMINATION_MESSAGE_PATH
    write_termination_message(path, summary)


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
        )
        return exc.exit_code
    except Terminated as exc:
        log.warning("%s", exc)
        _report(cfg, {"phase": "Interrupted", "lastCheckpointStep": exc.step, "exitCode": exc.exit_code})
        return exc.exit_code
    except Exception as exc:  # a crash: summarise it, then let the traceback and exit code 1 through
        _report(
            cfg, {"phase": "Failed", "reason": type(exc).__name__, "exitCode": 1, "error": str(exc)[:1000]}
        )
        raise
    log.info("summary: %s", json.dumps(summary, default=str))
    _report(cfg, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
