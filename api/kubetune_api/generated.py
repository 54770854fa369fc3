"""Every file generated from the models, by path relative to the repository root."""

from __future__ import annotations

import yaml

from .crd import CHART_CRD_FILE, CRD_FILE, HEADER, finetunejob_crd
from .reference import REFERENCE_FILE, api_reference


def crd_yaml() -> str:
    return HEADER + yaml.safe_dump(finetunejob_crd(), sort_keys=False, width=110, allow_unicode=True)


def generated_files() -> dict[str, str]:
    crd = crd_yaml()
    return {CRD_FILE: crd, CHART_CRD_FILE: crd, REFERENCE_FILE: api_reference() + "\n"}
