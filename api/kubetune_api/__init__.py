"""kubetune's API contract: the FineTuneJob types, shared by the operator, the trainer and the SDK.

Import-light on purpose (pydantic only): the operator and the trainer both import it, it imports
neither, and the CRD (``make crds``) and docs/api.md are generated from it.
"""

from .coordinates import API_VERSION, GROUP, KIND, PLURAL, VERSION
from .exitcodes import ExitCode
from .reasons import ConditionType, Phase, Reason
from .resource import FineTuneJob, ObjectMeta
from .spec import FineTuneJobSpec
from .status import Condition, FineTuneJobStatus, Progress
from .trainer import ReportingSpec, TrainerConfig

__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "Condition",
    "ConditionType",
    "ExitCode",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "ObjectMeta",
    "Phase",
    "Progress",
    "Reason",
    "ReportingSpec",
    "TrainerConfig",
]
