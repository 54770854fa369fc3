"""Where the FineTuneJob lives in the Kubernetes API, and the limits its name must respect.

The CRD, the operator's REST paths, the trainer's status patches and the RBAC rules all read
these; nothing else spells them.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "kubetune.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "FineTuneJob"
LIST_KIND: Final = f"{KIND}List"
PLURAL: Final = "finetunejobs"
SINGULAR: Final = "finetunejob"
SHORT_NAMES: Final = ("ftj",)
CATEGORIES: Final = ("kubetune",)
CRD_NAME: Final = f"{PLURAL}.{GROUP}"
#: The label on every child of a FineTuneJob (its name): the operator sets it, the SDK selects by it.
LABEL_FINETUNEJOB: Final = f"{GROUP}/{SINGULAR}"

#: Longest suffix appended to a FineTuneJob name ("-trainer"); names are capped so the result fits 63.
MAX_NAME_LENGTH: Final = 55
#: A DNS-1123 label: the name is also a label value and a prefix of every child's name.
NAME_PATTERN: Final = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
