"""Every file generated from the models, by path relative to the repository root."""

from __future__ import annotations

import yaml

from .crd import CRD_FILE, HEADER, SWEEP_CRD_FILE, SWEEP_HEADER, finetunejob_crd, finetunesweep_crd
from .reference import REFERENCE_FILE, api_reference


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(finetunejob_crd(), sort_keys=False, width=110, allow_unicode=True)


def sweep_crd_yaml() -> str:
    return SWEEP_HEADER + yaml.safe_dump(finetunesweep_crd(), sort_keys=False, width=110, allow_unicode=True)


def generated_files() -> dict[str, str]:
    """(The chart's copies of the CRDs are made by hack/sync-chart-crds.sh, with kopf's CRDs.)"""
    return {CRD_FILE: crd_yaml(), SWEEP_CRD_FILE: sweep_crd_yaml(), REFERENCE_FILE: api_reference() + "\n"}
