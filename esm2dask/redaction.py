"""Secrets never shown: the values masked in every log line, error line and message.

A leaf module (it imports nothing of esm2dask): :mod:`esm2dask.storage` registers the
secret storage options it is given, :mod:`esm2dask.logs` masks them in every sink, the
CLI in every line it prints.
"""

from __future__ import annotations

import os
import re

#: Environment variables that hold secrets, whatever their value looks like.
SECRET_ENV = ("NGC_CLI_API_KEY", "NGC_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY", "AZURE_STORAGE_SAS_TOKEN", "HF_TOKEN")
#: Other variables whose name says they hold a secret (``MY_API_KEY``, ``GITHUB_TOKEN``).
_SECRET_NAME = re.compile(r"(API_?KEY|SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
#: A shorter value is not masked when only its variable's name says it is secret: masking
#: "1" or "yes" everywhere would garble every message and hide nothing.
_MIN_SECRET_CHARS = 6
MASK = "****"
_registered: set[str] = set()


def register_secret(value) -> None:
    """A secret this process knows (a storage option's key, say): masked in every output."""
    if isinstance(value, str) and len(value) >= 4:  # shorter ones would garble messages, hide nothing
        _registered.add(value)


def secret_values(env=None) -> list[str]:
    """Every secret value known now, longest first (so that one inside another goes too)."""
    env = os.environ if env is None else env
    values = set(_registered)
    for name, value in env.items():
        if not value:
            continue
        if name in SECRET_ENV or (_SECRET_NAME.search(name) and len(value) >= _MIN_SECRET_CHARS):
            values.add(value)
    return sorted(values, key=len, reverse=True)


def redact(text: str, env=None) -> str:
    """``text`` with every known secret value replaced by ``****``."""
    for value in secret_values(env):
        if value in text:
            text = text.replace(value, MASK)
    return text
