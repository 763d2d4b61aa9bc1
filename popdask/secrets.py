"""What counts as a credential in a run configuration, so that none is ever accepted there.

A run's configuration is written into the store's attributes and travels in every task
graph, so credentials must come from the environment of the processes that read and write
(or the platform's credential chain: an instance role, a workload identity), never from the
YAML or ``--set``. :func:`refuse_storage_secrets` checks fsspec ``storage_options``;
:func:`is_secret_gdal_option` names the GDAL configuration options that hold one, for every
cloud storage GDAL reads (``/vsis3``, ``/vsigs``, ``/vsiaz``, ``/vsiadls``, ``/vsioss``,
``/vsiswift``, ``/vsicurl`` with headers or a user and password).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: fsspec ``storage_options`` keys that hold a credential, and where it should come from.
STORAGE_SECRETS: dict[str, str] = {
    "key": "AWS_ACCESS_KEY_ID (or a profile / an instance role)",
    "secret": "AWS_SECRET_ACCESS_KEY (or a profile / an instance role)",
    "token": "AWS_SESSION_TOKEN, or GOOGLE_APPLICATION_CREDENTIALS for gcsfs",
    "password": "the filesystem's own environment variable or credentials file",
    "account_key": "AZURE_STORAGE_ACCOUNT_KEY (or a managed identity)",
    "connection_string": "AZURE_STORAGE_CONNECTION_STRING",
    "sas_token": "AZURE_STORAGE_SAS_TOKEN",
    "client_secret": "AZURE_CLIENT_SECRET (or a managed identity)",
    "aws_access_key_id": "AWS_ACCESS_KEY_ID",
    "aws_secret_access_key": "AWS_SECRET_ACCESS_KEY",
    "aws_session_token": "AWS_SESSION_TOKEN",
    "credentials": "GOOGLE_APPLICATION_CREDENTIALS",
    "private_key": "the provider's credentials file",
}
#: gcsfs ``token`` values that name a way to find credentials rather than hold one.
TOKEN_MODES = frozenset({"anon", "google_default", "cloud", "cache", "browser"})

_GDAL_SECRET = re.compile(
    r"SECRET|TOKEN|PASSWORD|USERPWD|ACCESS_KEY|ACCOUNT_KEY|CONNECTION_STRING|_SAS\b|SAS_|"
    r"BEARER|PRIVATE_KEY|_AUTH$|^GDAL_HTTP_AUTH|HEADERS$|^SWIFT_KEY$"
)


class SecretInConfigError(ValueError):
    """A credential was given in the configuration; the message names it and the fix."""


def find_storage_secrets(options: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    """``(dotted key, where to set it instead)`` of each credential in ``options``, looking
    into nested mappings (``client_kwargs`` …)."""
    found = []
    for name, value in options.items():
        dotted = f"{where}.{name}"
        if isinstance(value, Mapping):
            found += find_storage_secrets(value, dotted)
            continue
        hint = STORAGE_SECRETS.get(str(name).lower())
        if hint is None or value in (None, "", False):
            continue
        if str(name).lower() == "token" and value in TOKEN_MODES:
            continue
        found.append((dotted, hint))
    return found


def refuse_storage_secrets(options: Mapping[str, Any], where: str) -> None:
    """Raise :class:`SecretInConfigError` naming every credential in ``options`` and the
    environment variable to set instead; the values themselves are never shown."""
    found = find_storage_secrets(options, where)
    if found:
        lines = "; ".join(f"{k}: set {hint} in the environment instead" for k, hint in found)
        raise SecretInConfigError(
            f"credentials are not accepted in the configuration (it is stored with the output "
            f"and sent to every worker): {lines}"
        )


def is_secret_gdal_option(name: str) -> bool:
    """Whether the GDAL configuration option ``name`` holds a credential."""
    return bool(_GDAL_SECRET.search(name.upper()))
