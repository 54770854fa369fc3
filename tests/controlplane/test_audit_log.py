"""The scale benchmark's audit-log reader (hack/kubetune_localenv/scale.py): the API server writes
the log while the benchmark reads it, so a window must end at the last complete line."""

from __future__ import annotations

import json
from pathlib import Path

from kubetune_localenv import scale


def _event(audit_id: str, verb: str, resource: str, agent: str, subresource: str | None = None) -> bytes:
    ref = {"resource": resource} | ({"subresource": subresource} if subresource else {})
    event = {"auditID": audit_id, "verb": verb, "objectRef": ref, "userAgent": agent}
    return (json.dumps(event) + "\n").encode()


def test_a_half_written_last_line_is_left_for_the_next_window(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    first = _event("a", "create", "jobs", "kubetune-operator/0.1.0") + _event(
        "b", "patch", "finetunejobs", "kopf/1.38", subresource="status"
    )
    later = _event("c", "get", "pods", "kopf/1.38")
    log.write_bytes(first + later[:20])
    end = scale.audit_offset(log)
    assert end == len(first)
    counts = scale.audit_counts(log, 0, end)
    assert counts["kubetune-operator"] == {("create", "jobs"): 1}
    assert counts["kopf"] == {("patch", "finetunejobs/status"): 1}

    log.write_bytes(first + later + later)  # the line completed; the same request logged twice
    assert scale.audit_offset(log) == len(first) + 2 * len(later)
    assert scale.audit_counts(log, end, scale.audit_offset(log))["kopf"] == {("get", "pods"): 1}


def test_no_log_or_no_complete_line_is_offset_zero(tmp_path: Path) -> None:
    log = tmp_path / "audit.log"
    assert scale.audit_offset(log) == 0
    log.write_bytes(b'{"auditID": "a", "ve')
    assert scale.audit_offset(log) == 0
    assert scale.audit_counts(log, 0, 0) == {}
