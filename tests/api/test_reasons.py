"""The reasons enum: one member per reason, with a meaning, the phases it occurs in and a warning flag."""

from __future__ import annotations

from kubetune_api.exitcodes import NON_RETRYABLE, ExitCode
from kubetune_api.reasons import EXIT_CODE_REASONS, PHASE_MEANINGS, TERMINAL_PHASES, Phase, Reason, is_warning
from kubetune_api.status import CONDITION_REASON_PATTERN


def test_every_reason_is_documented_and_fits_a_condition() -> None:
    import re

    for reason in Reason:
        assert reason.meaning, reason
        assert re.fullmatch(CONDITION_REASON_PATTERN, reason), reason
    assert len({r.value for r in Reason}) == len(Reason)


def test_every_phase_has_reasons_and_a_meaning() -> None:
    for phase in Phase:
        assert PHASE_MEANINGS[phase]
        assert any(phase in reason.phases for reason in Reason), phase
    assert {Phase.SUCCEEDED, Phase.FAILED, Phase.CANCELLED} == TERMINAL_PHASES


def test_every_failure_is_a_warning_and_nothing_else_is_by_default() -> None:
    for reason in Reason:
        if Phase.FAILED in reason.phases:
            assert reason.warning, reason
    assert is_warning(Phase.FAILED, "SomethingTheKubeletSaid")
    assert is_warning(Phase.PENDING, Reason.IMAGE_PULL_BACK_OFF)
    assert not is_warning(Phase.PENDING, Reason.RETRYING)
    assert not is_warning(Phase.RUNNING, Reason.TRAINING)


def test_every_exit_code_has_a_failure_reason() -> None:
    assert set(EXIT_CODE_REASONS) == set(ExitCode)
    assert NON_RETRYABLE == (42, 43, 44, 45)  # 46-48: the user can fix the cause, so the Job retries
    for code, reason in EXIT_CODE_REASONS.items():
        assert reason.phases == (Phase.FAILED,)
        assert f"exit {int(code)}" in reason.meaning
