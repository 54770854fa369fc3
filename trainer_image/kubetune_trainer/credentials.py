"""Object-storage credentials from the files the operator mounts from a Secret.

The files (:data:`kubetune_api.wellknown.STORAGE_CREDENTIALS_DIR`) are read by a botocore
credential provider placed first in boto3's chain, so nothing holds the keys in the process
environment, and a rotated Secret (the kubelet rewrites the files) is picked up mid-run. Without
the files the rest of the chain applies: ``AWS_*`` variables for local runs, a web identity token
(IRSA), an instance profile.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from botocore.credentials import CredentialProvider, RefreshableCredentials
from botocore.session import Session

from kubetune_api import wellknown

#: botocore refreshes credentials 15 minutes before they expire: an expiry this far ahead makes
#: it re-read the files about every five minutes.
_REFRESH_AHEAD = dt.timedelta(minutes=15)
DEFAULT_REREAD = dt.timedelta(minutes=5)


class SecretFilesProvider(CredentialProvider):
    """Access key, secret key and optional session token, one file each, re-read periodically."""

    METHOD = "kubetune-secret-files"
    CANONICAL_NAME = "KubetuneSecretFiles"

    def __init__(
        self, directory: Path = Path(wellknown.STORAGE_CREDENTIALS_DIR), reread: dt.timedelta = DEFAULT_REREAD
    ) -> None:
        super().__init__()
        self.directory = directory
        self.reread = reread

    def load(self) -> RefreshableCredentials | None:
        if not (self.directory / wellknown.ACCESS_KEY_ID_FILE).is_file():
            return None
        return RefreshableCredentials.create_from_metadata(
            metadata=self._read(), refresh_using=self._read, method=self.METHOD
        )

    def _read(self) -> dict[str, Any]:
        def value(name: str) -> str | None:
            path = self.directory / name
            return path.read_text(encoding="utf-8").strip() if path.is_file() else None

        expiry = dt.datetime.now(dt.UTC) + _REFRESH_AHEAD + self.reread
        return {
            "access_key": value(wellknown.ACCESS_KEY_ID_FILE),
            "secret_key": value(wellknown.SECRET_ACCESS_KEY_FILE),
            "token": value(wellknown.SESSION_TOKEN_FILE),
            "expiry_time": expiry.isoformat(),
        }


def session_with_secret_files(provider: SecretFilesProvider | None = None) -> Session:
    """A botocore session whose credential chain starts with the mounted Secret files."""
    session = Session()
    resolver = session.get_component("credential_provider")
    resolver.insert_before("env", provider or SecretFilesProvider())
    return session
