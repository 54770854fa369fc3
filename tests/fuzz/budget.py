"""The fuzz suite's fixed Hypothesis profile, and how many examples each property gets.

Derandomized (the same examples on every run and machine), no example database (nothing written
to the working tree), no deadline (a 2-core CI machine is slow on the first examples). The
default sizes keep the whole suite within about a minute and a half on 2 cores;
``KUBETUNE_FUZZ_EXAMPLES=N`` runs N examples of every property instead (the big run in
docs/reliability.md).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, Phase, settings

PROFILE = "kubetune-fuzz"
#: Examples per property, overriding each property's default; 0 keeps the defaults.
OVERRIDE = int(os.environ.get("KUBETUNE_FUZZ_EXAMPLES", "0") or 0)


def examples(default: int) -> int:
    """``default`` examples, or KUBETUNE_FUZZ_EXAMPLES when set."""
    return OVERRIDE or default


def register() -> None:
    settings.register_profile(
        PROFILE,
        derandomize=True,
        database=None,
        deadline=None,
        max_examples=examples(100),
        print_blob=True,
        # No explain phase: on a failure it reruns the example hundreds of times (minutes here).
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile(PROFILE)
