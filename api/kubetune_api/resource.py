"""The FineTuneJob resource as a whole: metadata, spec, status, and the CRD's own metadata
(printer columns, name rules) carried on the model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from . import coordinates
from .base import ApiModel, Rule
from .spec import FineTuneJobSpec
from .status import FineTuneJobStatus


@dataclass(frozen=True)
class PrinterColumn:
    """One ``kubectl get`` column (``priority`` 1: only with ``-o wide``)."""

    name: str
    type: Literal["string", "number", "integer", "date", "boolean"]
    json_path: str
    description: str | None = None
    priority: int = 0

    def as_crd(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.priority:
            out["priority"] = self.priority
        if self.description:
            out["description"] = self.description
        out["jsonPath"] = self.json_path
        return out


class ObjectMeta(ApiModel):
    """The parts of metav1.ObjectMeta kubetune reads; the API server owns the rest."""

    model_config = ConfigDict(extra="allow")

    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


def _name_is_a_label(job: FineTuneJob) -> bool:
    name = job.metadata.name  # None with generateName: the API server names it, and checks then
    return name is None or bool(re.fullmatch(coordinates.NAME_PATTERN, name))


def _name_fits(job: FineTuneJob) -> bool:
    return job.metadata.name is None or len(job.metadata.name) <= coordinates.MAX_NAME_LENGTH


class FineTuneJob(ApiModel):
    """FineTuneJob fine-tunes a base language model with QLoRA or LoRA on a dataset held in
    S3-compatible object storage, and writes the resulting adapter back to object storage. The
    kubetune operator runs it as a batch/v1 Job and reports progress in status."""

    cel_rules = (
        Rule(
            cel=f"self.metadata.name.matches('{coordinates.NAME_PATTERN}')",
            message=(
                "metadata.name must be a DNS-1123 label (lower-case letters, digits and '-'), because it "
                "names the Job, ConfigMap and ServiceAccount and is used as a label value"
            ),
            check=_name_is_a_label,
        ),
        Rule(
            cel=f"size(self.metadata.name) <= {coordinates.MAX_NAME_LENGTH}",
            message=(
                f"metadata.name must be at most {coordinates.MAX_NAME_LENGTH} characters, so that the "
                "derived object names (<name>-trainer, <name>-config) fit in 63 characters"
            ),
            check=_name_fits,
        ),
    )
    printer_columns: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn("Phase", "string", ".status.phase", "Lifecycle phase of the job."),
        PrinterColumn(
            "Progress",
            "string",
            ".status.progressSummary",
            "Training steps done out of the total, as reported by the trainer.",
        ),
        PrinterColumn(
            "Loss", "number", ".status.progress.loss", "Latest training loss reported by the trainer."
        ),
        PrinterColumn("Age", "date", ".metadata.creationTimestamp"),
        PrinterColumn(
            "Reason",
            "string",
            ".status.reason",
            "Why the job is in its phase (for Failed, the failure reason).",
            1,
        ),
        PrinterColumn(
            "Output", "string", ".status.outputURI", "Object-storage URI the adapter is written to.", 1
        ),
    )

    api_version: str = Field(
        default=coordinates.API_VERSION, pattern=f"^{re.escape(coordinates.API_VERSION)}$"
    )
    """APIVersion defines the versioned schema of this representation of an object."""
    kind: str = Field(default=coordinates.KIND, pattern=f"^{coordinates.KIND}$")
    """Kind is a string value representing the REST resource this object represents."""
    metadata: ObjectMeta = ObjectMeta()
    spec: FineTuneJobSpec
    status: FineTuneJobStatus | None = None
