"""``python -m kubetune_operator``: run the operator with the KUBETUNE_* environment."""

from __future__ import annotations

import kopf

from . import handlers  # registers the handlers
from .settings import from_env, kopf_run_kwargs


def main() -> None:
    config = from_env()
    kopf.configure(verbose=False)
    kopf.run(memo=kopf.Memo(config=config), **kopf_run_kwargs(config))


assert handlers.FTJ  # the import above is for its side effect: registering the handlers

if __name__ == "__main__":
    main()
