"""The one settings tree, read from environment variables (prefix ``AUDIT_``) and ``.env``.

Every process of the platform (Dagster code location, API, command line, tests) builds its
configuration here, so a variable means the same thing everywhere.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from audit_platform.naming import check_identifier
from audit_platform.signing import private_key, public_key

#: Who may read an endpoint that holds no audit data (the API's documents, its metrics).
Exposure = Literal["off", "keyed", "open"]

#: The checkout (or installed package's parent) that holds resources/ and the local stack.
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ElasticsearchConnection(BaseModel):
    """How to reach an Elasticsearch cluster: URL plus optional credentials and CA."""

    url: str
    username: str | None = None
    password: SecretStr | None = None
    api_key: SecretStr | None = None
    ca_certs: Path | None = None
    verify_certs: bool = True


class ApiSettings(BaseSettings):
    """The Audit API (``audit-platform api serve``): ``AUDIT_API_*``."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_API_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = 8000
    default_range_days: int = Field(default=7, ge=1, description="Search range without since.")
    max_range_days: int = Field(default=400, ge=1, description="Longest range one request asks.")
    key_cache_seconds: float = Field(
        default=5.0,
        ge=0,
        description="How long a verified key is trusted before it is looked "
        "up again: a revoked key stops working within this time.",
    )
    es_timeout_seconds: float = Field(default=10.0, gt=0)
    retry_after_seconds: int = Field(
        default=5, ge=1, description="Retry-After sent with a 503 when a server is unavailable."
    )
    trusted_proxies: str = Field(
        default="127.0.0.1",
        description="Addresses (comma-separated IPs or CIDR networks, or *) of the reverse "
        "proxies whose X-Forwarded-Proto and X-Forwarded-For are believed (uvicorn's "
        "forwarded_allow_ips). Behind a TLS ingress it must name the ingress, or the API takes "
        "every request for plain http: the Explorer's cookie is not Secure and its sign-in "
        "fails the Origin check. A header from any other address is ignored.",
    )
    docs: Exposure = Field(
        default="open",
        description="/docs, /redoc and /openapi.json: open (no key, the default for a "
        "developer's machine), keyed (/openapi.json needs a key, for tools; the browser pages, "
        "which cannot send one, are off) or off.",
    )
    metrics: Exposure = Field(
        default="open",
        description="/metrics: open (no key, the default for a developer's machine), keyed "
        "(a scraper sends a key as a bearer token) or off.",
    )


class ExplorerSettings(BaseSettings):
    """The Audit Explorer (``/ui``), whose sessions are opened by signing in: ``AUDIT_UI_*``."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_UI_", env_file=".env", extra="ignore")

    session_hours: float = Field(
        default=8, gt=0, description="A session ends this long after sign-in, used or not."
    )
    idle_minutes: float = Field(
        default=60, gt=0, description="A session not used for this long ends too."
    )


class GroupGrant(BaseModel):
    """What membership of an identity provider's group gives in the Explorer: a role, and the
    same limits an API key can have. ``envs``: the environments it applies to (all if unset)."""

    model_config = ConfigDict(extra="forbid")

    group: str = Field(min_length=1)
    role: Literal["reader", "auditor", "admin"] = "reader"
    # A limit is a non-empty list: an empty one would read as no limit at all.
    envs: list[str] | None = Field(default=None, min_length=1)
    sources: list[str] | None = Field(default=None, min_length=1)
    tables: list[str] | None = Field(default=None, min_length=1)
    organizations: list[str] | None = Field(default=None, min_length=1)


class SsoSettings(BaseSettings):
    """Single sign-on for the Explorer with an OpenID provider: ``AUDIT_UI_SSO_*``. Off unless
    ``issuer`` is set; API keys stay for machines either way."""

    model_config = SettingsConfigDict(env_prefix="AUDIT_UI_SSO_", env_file=".env", extra="ignore")

    issuer: str | None = Field(
        default=None,
        description="The provider's issuer URL; its /.well-known/openid-configuration is read.",
    )
    client_id: str = "audit-explorer"
    client_secret: SecretStr | None = None
    scopes: str = "openid profile email groups"
    groups_claim: str = Field(
        default="groups", description="The ID token's claim that lists the person's groups."
    )
    grants: list[GroupGrant] = Field(
        default_factory=list,
        description="JSON list, tried in order: the first grant whose group the person has (and "
        "that applies to this environment) decides their role and limits; none, no access.",
    )
    state_secret: SecretStr | None = Field(
        default=None,
        description="Signs the short-lived cookie that carries a sign-in's state, nonce and "
        "PKCE verifier to the callback; the same in every API process. Derived from the "
        "client secret when unset.",
    )

    @field_validator("issuer")
    @classmethod
    def _issuer_over_https(cls, value: str | None) -> str | None:
        """Discovery, the provider's keys and the token exchange all go to the issuer: over
        plain HTTP, whoever is on the path could serve keys of their own and sign any token.
        Only a provider on this machine (tests, the demo) may be reached without TLS."""
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme == "https" or (
            parts.scheme == "http" and parts.hostname in {"localhost", "127.0.0.1", "::1"}
        ):
            return value
        raise ValueError(
            f"AUDIT_UI_SSO_ISSUER {value!r}: give the provider's https:// URL (plain http:// "
            "only to a provider on this machine)"
        )

    @property
    def enabled(self) -> bool:
        return self.issuer is not None

    def state_key(self) -> str:
        """The key of the sign-in state cookie: ``state_secret``, else derived from the client
        secret (both are the same in every process of the deployment)."""
        if self.state_secret is not None:
            return self.state_secret.get_secret_value()
        if self.client_secret is not None:
            key = self.client_secret.get_secret_value().encode()
            return hmac.new(key, b"audit-platform sso state", hashlib.sha256).hexdigest()
        raise ValueError(
            "single sign-on needs AUDIT_UI_SSO_STATE_SECRET (the same in every API process) "
            "when the client has no secret"
        )


class Settings(BaseSettings):
    """Configuration of one environment's deployment.

    ``AUDIT_ENV`` names the environment; it becomes part of every slot, index, path and key
    scope, so it is restricted to a short lowercase identifier that is valid in all of them.
    """

    model_config = SettingsConfigDict(env_prefix="AUDIT_", env_file=".env", extra="ignore")

    env: str = "dev"
    pg_url: SecretStr | None = Field(
        default=None,
        description="libpq URL of the platform's PostgreSQL (any libpq form); secret, for the "
        "password it may hold.",
    )
    es_url: str | None = Field(default=None, description="Elasticsearch URL, http or https.")
    es_username: str | None = None
    es_password: SecretStr | None = None
    es_api_key: SecretStr | None = None
    es_ca_certs: Path | None = None
    es_verify_certs: bool = True
    es_file_realm: Path | None = Field(
        default=None,
        description="Home of the local stack's Elasticsearch, set by the stack: `es setup` keeps "
        "accounts in its file realm (that distribution's native realm cannot store users).",
    )

    resources_dir: Path = PROJECT_ROOT / "resources"
    staging_root: str = Field(
        default=str(PROJECT_ROOT / ".staging"),
        description="Folder or s3:// URL under which staged batches are written.",
    )
    s3_url: str | None = Field(
        default=None,
        description="An s3:// URL (bucket and optional prefix) where the tests and the demo's "
        "object-storage mode stage; credentials and endpoint come from the standard AWS_* "
        "variables. The local stack sets it to its S3Proxy's bucket.",
    )
    mask_key: SecretStr | None = Field(
        default=None, description="Secret key of this environment for masked columns."
    )
    signing_key: SecretStr | None = Field(
        default=None,
        description="Ed25519 private key (base64 of its 32-byte seed) that signs the trail's "
        "checkpoints; only the deployment that writes the trail holds it "
        "(`audit-platform trust keygen` makes one).",
    )
    verify_key: str | None = Field(
        default=None,
        description="The signing key's public half (base64), for verifiers and the API; "
        "derived from signing_key when that is set.",
    )

    api: ApiSettings = Field(default_factory=lambda: ApiSettings())
    ui: ExplorerSettings = Field(default_factory=lambda: ExplorerSettings())
    sso: SsoSettings = Field(default_factory=lambda: SsoSettings())

    @field_validator("env")
    @classmethod
    def _env_is_identifier(cls, value: str) -> str:
        return check_identifier("AUDIT_ENV: environment", value)

    def with_exports(self, exports: dict[str, str]) -> Settings:
        """These settings with ``AUDIT_*`` exports (as `stack env` prints them) applied on top."""
        # Any, not str: text that pydantic converts to each field's type, as it does the
        # environment's variables.
        fields: dict[str, Any] = {
            key.removeprefix("AUDIT_").lower(): value for key, value in exports.items()
        }
        return self.model_copy(update=Settings(**fields).model_dump(include=set(fields)))

    @property
    def elasticsearch(self) -> ElasticsearchConnection | None:
        # A plain property, not a cached one: a cache would be copied by ``with_exports`` and
        # answer None for a URL the exports just set (`stack status` right after `stack up`).
        if not self.es_url:
            return None
        return ElasticsearchConnection(
            url=self.es_url,
            username=self.es_username,
            password=self.es_password,
            api_key=self.es_api_key,
            ca_certs=self.es_ca_certs,
            verify_certs=self.es_verify_certs,
        )

    def signer(self) -> Ed25519PrivateKey | None:
        """The key that signs checkpoints, if this process holds it."""
        return private_key(self.signing_key.get_secret_value()) if self.signing_key else None

    def verifier(self) -> Ed25519PublicKey | None:
        """The key that checks checkpoints: the configured public key, or the signer's."""
        if self.verify_key:
            return public_key(self.verify_key)
        signer = self.signer()
        return signer.public_key() if signer else None
