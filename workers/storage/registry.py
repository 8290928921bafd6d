"""Registered models, per tenant: one JSON record and the model's files under the store's
`registry/{tenant}/` folder, where workers (sharing the store) can load them."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from workers.errors import JobError
from workers.jobs import ModelInfo, now

__all__ = ["ModelRecord", "Registry"]


class ModelRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str
    tenant: str
    name: str
    ref: str  # a .pt2 path or package.module:factory
    weights: str | None = None
    state: Literal["pending", "ready", "failed"] = "pending"
    error: str | None = None
    catalogue: ModelInfo | None = None
    created: str


class Registry:
    """A local-directory registry (the store must be a shared directory for the API)."""

    def __init__(self, store: str) -> None:
        self.root = Path(store.removeprefix("file://")) / "registry"

    def folder(self, tenant: str, model_id: str) -> Path:
        path = self.root / tenant / model_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def keeps_files_of(self, record: ModelRecord) -> bool:
        """Whether every file the record names lies in its own registry folder, written by
        the API alone (a factory reference names no file)."""
        home = (self.root / record.tenant / record.id).resolve()
        files = [record.weights] if record.weights else []
        if ":" not in record.ref:
            files.append(record.ref)
        return all(Path(f).resolve().is_relative_to(home) for f in files)

    def _record(self, tenant: str, model_id: str) -> Path:
        return self.root / tenant / f"{model_id}.json"

    def new_id(self) -> str:
        return f"m-{secrets.token_hex(6)}"

    def create(self, record: ModelRecord) -> ModelRecord:
        self.save(record)
        return record

    def save(self, record: ModelRecord) -> None:
        path = self._record(record.tenant, record.id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(record.model_dump_json())
        tmp.replace(path)  # readers never see half a record

    def get(self, tenant: str, model_id: str) -> ModelRecord:
        path = self._record(tenant, model_id)
        if "/" in model_id or not path.is_file():
            raise JobError(f"no model {model_id!r}; `GET /v1/models` lists yours")
        return ModelRecord.model_validate(json.loads(path.read_text()))

    def list(self, tenant: str) -> list[ModelRecord]:
        folder = self.root / tenant
        if not folder.is_dir():
            return []
        found = [ModelRecord.model_validate_json(p.read_text()) for p in folder.glob("*.json")]
        return sorted(found, key=lambda r: r.created)

    def stamp(self) -> str:
        return now()
