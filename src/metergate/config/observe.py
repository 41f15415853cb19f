"""Config sections for seeing requests: `tracing:`, `request_log:` and `tags:`.

All three are off (or empty) by default, and then cost nothing per request. They live
apart from `config.model` so that the schema of routing and guards stays readable; like
`mcp.config`, the base is a copy of config.model's `Strict`, since that module imports
this one.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

# A tag name: what `x-metergate-tags: name=value` and `metadata` keys may use. Always
# `fullmatch` it: `$` would let a trailing newline through.
TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The JSON paths redaction understands: $.a.b, $.a[*].b, $.a[0], $..b (any depth), $.a.*
JSON_PATH = re.compile(r"^\$(?:\.\.?(?:[A-Za-z_][A-Za-z0-9_-]*|\*)|\[(?:\*|[0-9]+)\])+$")


class Strict(BaseModel):
    """Unknown keys are typos in a config file, so they are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TracingConfig(Strict):
    """OpenTelemetry traces of every request, exported over OTLP (batched, off the
    request's path; spans are dropped, and counted, when the collector cannot keep up)."""

    enabled: bool = False
    endpoint: str = Field(
        default="http://127.0.0.1:4318/v1/traces",
        description="OTLP endpoint: http/protobuf takes the full /v1/traces URL, "
        "grpc the collector's address (http://host:4317)",
    )
    protocol: Literal["http/protobuf", "grpc"] = "http/protobuf"
    headers: dict[str, SecretStr] = Field(
        default_factory=dict, description="sent with every export, e.g. a collector token"
    )
    service_name: str = Field(default="metergate", min_length=1)
    resource_attributes: dict[str, str] = Field(default_factory=dict)
    sample_rate: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="share of new traces recorded; a caller's "
        "traceparent decides for its own trace",
    )
    capture_content: bool = Field(
        default=False, description="put prompts and completions in spans (off: never)"
    )
    max_content_bytes: int = Field(
        default=64 * 1024,
        ge=256,
        le=1024 * 1024,
        description="with capture_content: text per attribute; longer is cut",
    )
    max_queue_size: int = Field(default=2048, ge=1, le=1_000_000)
    max_export_batch_size: int = Field(default=512, ge=1, le=100_000)
    export_interval_seconds: float = Field(default=1.0, gt=0, le=60)
    export_timeout_seconds: float = Field(default=5.0, gt=0, le=120)

    @field_validator("endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value


class RedactionConfig(Strict):
    """What is masked before a request log record is written."""

    defaults: bool = Field(
        default=True,
        description="mask API keys and tokens, e-mail addresses and card numbers",
    )
    patterns: list[str] = Field(default_factory=list, description="more regexes to mask")
    json_paths: list[str] = Field(
        default_factory=list,
        description="JSON fields to mask in bodies: $.user, $.messages[*].content, $..password",
    )
    headers: list[str] = Field(
        default_factory=list,
        description="more header names to mask (authorization, x-api-key, cookie always are)",
    )

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"pattern {pattern!r} is not a valid regex: {error}") from None
        return value

    @field_validator("json_paths")
    @classmethod
    def _paths(cls, value: list[str]) -> list[str]:
        for path in value:
            if not JSON_PATH.match(path):
                raise ValueError(
                    f"{path!r} is not a supported JSON path; write $.field, $.list[*].field, "
                    "$.list[0], $.object.* or $..field (any depth)"
                )
        return value


class RequestLogConfig(Strict):
    """Keep requests' headers and bodies (redacted) to see what was sent when something
    goes wrong. Records are written off the request's path."""

    enabled: bool = False
    capture: Literal["all", "errors", "sample"] = Field(
        default="all", description="every request, only failed ones, or a sample"
    )
    sample_rate: float = Field(default=0.01, gt=0, le=1, description="with capture: sample")
    max_body_bytes: int = Field(
        default=64 * 1024, ge=256, le=16 * 1024 * 1024, description="per body; longer is cut"
    )
    retention_days: float = Field(default=7, gt=0, le=3650)
    store: Literal["ledger", "jsonl"] = Field(
        default="ledger", description="the ledger database, or rotated JSONL files"
    )
    directory: str = Field(default=".metergate/request-log", description="store: jsonl")
    max_file_bytes: int = Field(default=64 * 1024 * 1024, ge=64 * 1024, description="rotate at")
    max_pending: int = Field(
        default=10_000, ge=10, le=1_000_000, description="records queued; beyond, dropped"
    )
    max_pending_mb: float = Field(
        default=256, gt=0, le=65_536, description="their bodies' bytes; beyond, dropped"
    )
    redact: RedactionConfig = Field(default_factory=RedactionConfig)


class TagsConfig(Strict):
    """Which request tags become Prometheus labels (every tag is kept in the ledger).

    `metric_labels` maps a tag name to the values that may become label values (any
    other value is counted as `other`), or to `"*"`: any value, up to `max_label_values`
    distinct values per process, then `other`. The series are bounded either way.
    """

    metric_labels: dict[str, list[str] | Literal["*"]] = Field(default_factory=dict)
    max_label_values: int = Field(default=50, ge=1, le=10_000)

    @field_validator("metric_labels")
    @classmethod
    def _names(cls, value: dict[str, list[str] | str]) -> dict[str, list[str] | str]:
        for name in value:
            if not TAG_NAME.fullmatch(name):
                raise ValueError(
                    f"tag name {name!r}: 1-64 letters, digits, '.', '_' or '-', starting "
                    "with a letter or digit"
                )
        return value
