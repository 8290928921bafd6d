"""Tenants: bearer tokens, allowed input roots and quotas, read from ACTMAP_AUTH_FILE.

The file is JSON::

    {"tenants": {"acme": {"tokens": ["sha256:<hex of the token>"],
                          "roots": ["/data/acme"],
                          "quotas": {"queued_jobs": 20, "samples_per_job": 100000,
                                     "upload_bytes": 52428800}}}}

Tokens may be given in clear or as `sha256:` digests; they are compared as digests, in
constant time, against every tenant's, so timing reveals nothing about which matched.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from workers.errors import SpecError, UserError
from workers.extraction.inputs import OutsideRoots, opened

__all__ = ["LOCAL", "Quotas", "Tenant", "Tenants", "Unauthorized", "inside_roots"]


class Unauthorized(UserError):
    """Raised when a request carries no bearer token, or one no tenant holds (HTTP 401)."""

    def __init__(self) -> None:
        super().__init__("missing or unknown bearer token; send Authorization: Bearer TOKEN")


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    queued_jobs: int = Field(default=20, ge=1)
    samples_per_job: int = Field(default=1_000_000, ge=1)
    upload_bytes: int = Field(default=64 << 20, ge=1)
    # One-sample screenings of this tenant waiting for a worker at once, per API process.
    screenings_at_once: int = Field(default=8, ge=1)


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    tokens: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()
    quotas: Quotas = Quotas()

    def digests(self) -> list[bytes]:
        out = []
        for token in self.tokens:
            hexed = token.removeprefix("sha256:") if token.startswith("sha256:") else None
            out.append(bytes.fromhex(hexed) if hexed else hashlib.sha256(token.encode()).digest())
        return out


LOCAL = Tenant(name="local", roots=("/",))


class Tenants:
    """Who a bearer token belongs to. Without an auth file there is one tenant, `local`,
    and no token is needed (the server then listens on loopback only)."""

    def __init__(self, tenants: dict[str, Tenant] | None) -> None:
        self.open = tenants is None
        self._tenants = tenants or {"local": LOCAL}
        self._digests = [(d, t) for t in self._tenants.values() for d in t.digests()]

    @classmethod
    def from_file(cls, path: str | None) -> Tenants:
        if path is None:
            return cls(None)
        tenants = {}
        try:
            raw = json.loads(Path(path).read_text())
            for name, spec in raw["tenants"].items():
                where = f"tenants.{name}"
                tenants[name] = Tenant.model_validate({**spec, "name": name})
        except ValidationError as exc:  # say which field, as the file spells it
            bad = exc.errors()[0]
            field = ".".join([where, *map(str, bad["loc"])])
            raise SpecError(f"cannot read the auth file {path}: {field}: {bad['msg']}") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).splitlines()[0]
            raise SpecError(f"cannot read the auth file {path}: {first}") from None
        return cls(tenants)

    def largest_upload(self) -> int:
        """The largest `upload_bytes` quota of any tenant."""
        return max(t.quotas.upload_bytes for t in self._tenants.values())

    def lookup(self, token: str | None) -> Tenant | None:
        if self.open:
            return self._tenants["local"]
        if not token:
            return None
        presented = hashlib.sha256(token.encode()).digest()
        found = None
        for digest, tenant in self._digests:  # no early exit: constant time over all
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def inside_roots(path: str, roots: tuple[str, ...] | None) -> bool:
    """Whether `path` opens beneath one of the roots without following a link below one
    (workers/extraction/beneath.py's rule; the worker and the pictures open it the same
    way). `roots` None is the open server's single local user: any existing path, links
    resolved."""
    if roots is None:
        try:
            Path(path).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):
            return False
        return True
    try:
        with opened(path, roots, os.O_PATH):
            return True
    except (OutsideRoots, OSError, ValueError):
        return False
