"""kubetune's Python SDK: submit, follow and collect FineTuneJobs from a notebook or a script.

    from kubetune_api.spec import FineTuneJobSpec
    from kubetune_client import Client

    client = Client()                       # $KUBECONFIG or ~/.kube/config, its namespace
    job = client.submit(FineTuneJobSpec(...), name="support-chat")
    job.wait()                              # raises JobFailedError with the reason on Failed
    job.cancel()                            # for good: phase Cancelled, checkpoints kept
    job.metrics(); job.checkpoints(); job.download("./adapter")

Specs are the API's own typed models (:mod:`kubetune_api`), so they are validated and defaulted
as the CRD does it before they are sent. The ``kubetune`` command line is built on this package.
"""

from .client import Client, load_manifest
from .errors import (
    AlreadyExistsError,
    ChecksumMismatchError,
    CrdNotInstalledError,
    Exit,
    InvalidDatasetError,
    InvalidSpecError,
    JobCancelledError,
    JobFailedError,
    KubetuneError,
    LogsUnavailableError,
    NoClusterError,
    NotFoundError,
    NotReadyError,
    PermissionDeniedError,
    StorageError,
    WaitTimeoutError,
)
from .job import Download, Job
from .results import Checkpoint, Manifest, ManifestFile
from .storage import StorageOptions
from .validate import ValidationReport, validate_files

__all__ = [
    "AlreadyExistsError",
    "Checkpoint",
    "ChecksumMismatchError",
    "Client",
    "CrdNotInstalledError",
    "Download",
    "Exit",
    "InvalidDatasetError",
    "InvalidSpecError",
    "Job",
    "JobCancelledError",
    "JobFailedError",
    "KubetuneError",
    "LogsUnavailableError",
    "Manifest",
    "ManifestFile",
    "NoClusterError",
    "NotFoundError",
    "NotReadyError",
    "PermissionDeniedError",
    "StorageError",
    "StorageOptions",
    "ValidationReport",
    "WaitTimeoutError",
    "load_manifest",
    "validate_files",
]
