"""Typed settings from the environment (prefix ACTMAP_), built once at an entry point."""

from __future__ import annotations

from pydantic import SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Read once by each process at its entry point and passed in; never a global."""

    model_config = SettingsConfigDict(env_prefix="ACTMAP_", frozen=True, extra="ignore")

    store: str = "./actmap-store"
    broker_url: SecretStr | None = None
    api_url: str | None = None
    token: SecretStr | None = None
    auth_file: str | None = None
    device: str = "cpu"
    decode_threads: int = 4
