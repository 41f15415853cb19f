"""The configuration schema: what an operator writes in YAML, validated by pydantic.

Cross-references between sections (an upstream naming a provider, a model naming an
upstream) are checked in `metergate.config.checks`, so that every problem can be
reported with its own location instead of one opaque validator error.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import math
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from metergate.config.observe import RequestLogConfig, TagsConfig, TracingConfig
from metergate.config.presets import DEFAULT_PRICE_LISTS, PRESETS, PresetName
from metergate.mcp.config import McpConfig

ProviderType = Literal["openai", "anthropic", "gemini", "simulated", "azure", "bedrock", "vertex"]
KeyLabel = Literal["name", "team", "none"]  # what the metrics' `key` label holds
ErrorKind = Literal["server_error", "rate_limited", "bad_request", "timeout", "connection_error"]
NativeApi = Literal["responses", "completions"]


def _webhook_url(value: str) -> str:
    """Checked when the config loads: a URL that cannot be posted to would otherwise be
    found out only by the first alert, which it would then lose. Empty means none (what
    `${VAR}` gives with VAR set empty)."""
    if not value:
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


WebhookUrl = Annotated[str, AfterValidator(_webhook_url)]


class Strict(BaseModel):
    """Unknown keys are typos in a config file, so they are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TokenPrice(Strict):
    """USD per million tokens. `cached_input` defaults to `input` when omitted; prompt
    cache writes (reported by Anthropic, and by OpenAI from GPT-5.6 on) default to the
    published multipliers of the input price: 1.25 for writes (Anthropic's 5-minute ones,
    OpenAI's of either retention), 2 for Anthropic's 1-hour writes."""

    input: Decimal = Field(default=Decimal(0), ge=0)
    cached_input: Decimal | None = Field(default=None, ge=0)
    output: Decimal = Field(default=Decimal(0), ge=0)
    cache_write: Decimal | None = Field(default=None, ge=0)
    cache_write_1h: Decimal | None = Field(default=None, ge=0)

    @property
    def cached(self) -> Decimal:
        return self.input if self.cached_input is None else self.cached_input

    @property
    def write(self) -> Decimal:
        return self.input * Decimal("1.25") if self.cache_write is None else self.cache_write

    @property
    def write_1h(self) -> Decimal:
        return self.input * 2 if self.cache_write_1h is None else self.cache_write_1h


# The processing tiers an upstream may report having served a request on (OpenAI's
# `service_tier`, also OpenRouter's), priced apart from the standard one.
SERVICE_TIERS = ("flex", "priority")


class Price(TokenPrice):
    """A deployment's prices: the standard tier's tokens (see `TokenPrice`), its web
    searches, and those of the processing tiers it may serve on (`flex`, `priority`),
    which OpenAI prices apart and says in each answer (`service_tier`) which it used."""

    web_search: Decimal = Field(
        default=Decimal(10),
        ge=0,
        description="USD per 1,000 calls of a provider's server-side web search tool "
        "(Anthropic's web_search, OpenAI's web_search_call items; the default is their "
        "common published price)",
    )
    flex: TokenPrice | None = Field(
        default=None,
        description="tokens served on the flex tier (OpenAI: about half the standard "
        "price); without it they are billed at the standard price",
    )
    priority: TokenPrice | None = Field(
        default=None,
        description="tokens served on the priority tier (OpenAI: about twice the "
        "standard price); without it they are billed at the standard price, and "
        "budgets hold a request's worst case at it when it is set",
    )


class SimulatedSettings(Strict):
    """Behaviour of the built-in `simulated` provider: deterministic for demos and drills."""

    latency_ms: float = Field(default=0, ge=0, description="delay before the first token")
    tokens_per_second: float = Field(default=0, ge=0, description="0 means instant")
    output_tokens: int = Field(default=16, ge=1, le=100_000)
    error_rate: float = Field(default=0, ge=0, le=1)
    error_kind: ErrorKind = "server_error"
    seed: int = 0


class Timeouts(Strict):
    """Seconds. `total` bounds a whole attempt that is not streamed; `stream_idle` the gap
    between chunks; `stream_total`, when set, a whole stream (an upstream that keeps a
    stream open with keep-alive comments or pings alone is bounded by nothing else);
    `pool` the wait for a free connection when all `max_connections` are busy."""

    connect: float = Field(default=5, gt=0)
    first_byte: float = Field(default=60, gt=0)
    total: float = Field(default=600, gt=0)
    stream_idle: float = Field(default=60, gt=0)
    stream_total: float | None = Field(default=None, gt=0)
    pool: float = Field(default=10, gt=0)

    def under(self, override: Timeouts | None) -> Timeouts:
        """These timeouts with the keys `override` sets (a deployment's over its
        provider's): a key it leaves out keeps this value, not the default."""
        if override is None or not override.model_fields_set:
            return self
        return self.model_copy(
            update={key: getattr(override, key) for key in override.model_fields_set}
        )


# --- cloud provider settings (Azure OpenAI, AWS Bedrock, Google Vertex AI) -----------


class AzureSettings(Strict):
    """Azure OpenAI: `base_url` is the resource endpoint (https://NAME.openai.azure.com).
    Authenticate with the provider's `api_key` (the `api-key` header) or with a Microsoft
    Entra app (client credentials: tenant_id, client_id, client_secret)."""

    api: Literal["deployments", "v1"] = Field(
        default="deployments",
        description="deployments: /openai/deployments/{name}/...?api-version=; v1: /openai/v1/...",
    )
    api_version: str = "2024-10-21"
    deployments: dict[str, str] = Field(
        default_factory=dict,
        description="upstream model id (what prices are looked up by) -> deployment name",
    )
    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: SecretStr | None = None
    authority: str = "https://login.microsoftonline.com"
    scope: str = "https://cognitiveservices.azure.com/.default"

    @field_validator("api_version", mode="before")
    @classmethod
    def _date_as_written(cls, value: Any) -> Any:
        """YAML reads an unquoted 2024-10-21 as a date; Azure wants the text."""
        return value.isoformat() if isinstance(value, datetime.date) else value


class BedrockSettings(Strict):
    """AWS Bedrock: SigV4 with credentials from the standard AWS chain (environment,
    shared profile, web identity, container and instance roles), a named `profile`, or
    explicit keys; or a Bedrock API key as the provider's `api_key` (bearer)."""

    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None


class VertexSettings(Strict):
    """Google Vertex AI: credentials through google-auth (a service-account or external
    account key file, else Application Default Credentials: workload identity, metadata
    server, gcloud)."""

    project: str | None = None
    location: str | None = None
    credentials_file: str | None = None


class ProviderConfig(Strict):
    type: ProviderType
    preset: PresetName | None = Field(
        default=None, description="type openai only: fills base_url, price_list and quirks"
    )
    azure: AzureSettings | None = None
    bedrock: BedrockSettings | None = None
    vertex: VertexSettings | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    max_connections: int = Field(default=256, ge=1)
    max_response_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="largest answer body accepted"
    )
    proxy: str | None = Field(
        default=None,
        description="http://[user:pass@]host:port, or `direct`; default: HTTPS_PROXY etc.",
    )
    price_list: str = "official"
    timeouts: Timeouts = Field(default_factory=Timeouts)
    simulated: SimulatedSettings = Field(default_factory=SimulatedSettings)
    chat_via: Literal["chat", "responses"] | None = Field(
        default=None,
        description="openai type: `responses` sends chat requests to the upstream's "
        "Responses API, translated (for upstreams or models that serve no chat "
        "completions: Perplexity's Agent API, OpenAI's Responses-only models); default: "
        "the preset's, else `chat`",
    )
    apis: list[NativeApi] | None = Field(
        default=None,
        description="openai type: the OpenAI APIs besides chat this upstream serves, which "
        "the doors of the same name pass through; default: both for api.openai.com, none "
        "for other OpenAI-compatible servers (their requests are translated to chat)",
    )

    @model_validator(mode="after")
    def _apis_of_openai(self) -> ProviderConfig:
        if self.apis is not None and self.type != "openai":
            raise ValueError("`apis` applies to openai-type providers only")
        if self.chat_via is not None and self.type != "openai":
            raise ValueError("`chat_via` applies to openai-type providers only")
        return self

    @property
    def chat_via_responses(self) -> bool:
        """Chat requests go to the Responses API, translated (`chat_via`)."""
        if self.chat_via is not None:
            return self.chat_via == "responses"
        preset = PRESETS.get(self.preset or "")
        return self.type == "openai" and preset is not None and preset.chat_via == "responses"

    @property
    def native_apis(self) -> frozenset[str]:
        if self.type != "openai":
            return frozenset()
        if self.apis is not None:
            return frozenset(self.apis)
        if self.chat_via_responses:  # it speaks Responses: that door passes through
            return frozenset(("responses",))
        official = urlsplit(self.base_url or "").hostname == "api.openai.com"
        return frozenset(("responses", "completions")) if official else frozenset()

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        """A preset (or a cloud type) supplies base_url and price_list when not written."""
        if not isinstance(data, dict):
            return data
        name = data.get("preset")
        preset = PRESETS.get(name) if isinstance(name, str) else None
        defaults: dict[str, Any] = {}
        if preset is not None and data.get("type") == "openai":
            defaults = {"base_url": preset.base_url, "price_list": preset.price_list}
        elif data.get("type") in DEFAULT_PRICE_LISTS:
            defaults = {"price_list": DEFAULT_PRICE_LISTS[data["type"]]}
        return {**defaults, **{k: v for k, v in data.items() if v is not None or k not in defaults}}

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        parts = urlsplit(value)
        if "@" in parts.netloc:  # it would travel in the Host header and error messages
            raise ValueError(
                "must not carry user:password@: put the credential in `api_key` or in "
                "`headers:` (e.g. Authorization: Basic ...), written as ${VAR}"
            )
        if parts.query or parts.fragment or value.endswith(("?", "#")):
            raise ValueError(
                "must not carry a query (?...) or fragment (#...): the API path "
                "(/chat/completions, ...) is appended to it"
            )
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _check_proxy(cls, value: str | None) -> str | None:
        if value is None or value == "direct":
            return value
        parts = urlsplit(value)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(
                "must be `direct` or an http:// proxy URL (http://[user:pass@]host:port); "
                "TLS to the upstream is tunnelled through it with CONNECT"
            )
        return value


class CircuitConfig(Strict):
    """When an upstream is taken out of rotation, and how it is let back in."""

    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures")
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    window_seconds: float = Field(default=30, gt=0)
    min_requests: int = Field(default=10, ge=1, description="before the ratio is judged")
    open_seconds: float = Field(default=30, gt=0)
    half_open_probes: int = Field(default=2, ge=1)


RetryableOutcome = Literal["connection_error", "timeout", "rate_limited", "upstream_error"]
_DEFAULT_RETRY_ON: tuple[RetryableOutcome, ...] = (
    "connection_error",
    "timeout",
    "rate_limited",
    "upstream_error",
)


class RetryConfig(Strict):
    """Retries of one model's deployments, with exponential backoff and full jitter."""

    max_retries: int = Field(default=2, ge=0, le=10)
    retry_on: list[RetryableOutcome] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    backoff_base: float = Field(default=0.25, ge=0)
    backoff_max: float = Field(default=8, ge=0)
    max_retry_after: float = Field(
        default=30, ge=0, description="longer Retry-After: move on instead of waiting"
    )


class RetryBudgetConfig(Strict):
    """Retries may add at most `ratio` of live traffic (plus a small floor per second)."""

    ratio: float = Field(default=0.2, ge=0)
    min_per_second: float = Field(default=5, ge=0)


class UpstreamConfig(Strict):
    """One deployment: a provider plus the model id that provider knows it by."""

    provider: str
    model: str
    price: Price | None = None
    weight: int = Field(default=1, ge=0, description="0 takes it out of rotation")
    timeouts: Timeouts | None = None  # overrides the provider's, key by key
    circuit: CircuitConfig = Field(default_factory=CircuitConfig)


class ModelConfig(Strict):
    """A model name callers use, served by one or more upstream deployments."""

    upstreams: list[str] = Field(min_length=1)
    description: str = ""
    max_tokens_cap: int | None = Field(default=None, ge=1)
    over_cap: Literal["clamp", "reject"] = "clamp"
    fallbacks: list[str] = Field(
        default_factory=list, description="other models tried in order when this one fails"
    )
    retry: RetryConfig = Field(default_factory=RetryConfig)
    budget_max_tokens: int = Field(
        default=4096,
        ge=1,
        description="max_tokens sent upstream when a hard budget applies and the caller "
        "set none, so a request's worst-case cost is bounded",
    )
    budget_max_web_searches: int = Field(
        default=5,
        ge=1,
        description="max_uses set on an Anthropic web search tool (max_tool_calls on an "
        "OpenAI Responses request with one) that has none when a hard budget applies, so "
        "the searches it may run (priced per search) are bounded",
    )
    budget_attachment_tokens: int = Field(
        default=4000,
        ge=0,
        description="prompt tokens a hard budget holds for each image or file part, whose "
        "request bytes (a URL, a file id) say nothing of its size: 4000 bounds one image "
        "at Anthropic (~1,600), GPT-4o (1,445) and GPT-4.1 mini or nano (2,488, 3,779); "
        "raise it for models that count an image in more tokens (gpt-4o-mini) or for "
        "multi-page documents",
    )
    cache: bool = True


class CorsConfig(Strict):
    """Calls from browser apps on other origins; off while `allowed_origins` is empty."""

    allowed_origins: list[str] = Field(
        default_factory=list, description='exact origins (https://app.example.com) or "*"'
    )
    allowed_headers: list[str] = Field(
        default_factory=lambda: ["*"], description='"*": the headers the browser asks for'
    )
    allowed_methods: list[str] = Field(default_factory=lambda: ["GET", "POST", "DELETE"])
    expose_headers: list[str] = Field(
        default_factory=lambda: [
            "x-request-id",
            "x-metergate-upstream",
            "x-metergate-attempts",
            "x-metergate-cost-usd",
            "x-metergate-cache",
            "retry-after",
        ]
    )
    max_age_seconds: int = Field(default=600, ge=0, le=86400)

    @field_validator("allowed_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            parts = urlsplit(origin)
            if origin != "*" and (
                parts.scheme not in ("http", "https")
                or not parts.netloc
                or parts.path
                or parts.query
            ):
                raise ValueError(
                    f"{origin!r} is not an origin: write scheme://host[:port] "
                    '(no path, no trailing slash), or "*" for any'
                )
        return value


class ServerConfig(Strict):
    host: str = "127.0.0.1"
    # Not 0 (any free port): callers could not find the gateway, nor could the banner
    # say where it listens, since uvicorn binds after it is printed.
    port: int = Field(default=4000, ge=1, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_json_depth: int = Field(
        default=100,
        ge=8,
        le=200,  # orjson encodes 254 levels; adapters wrap a few around the caller's JSON
        description="deepest nesting of objects and arrays a request body may have",
    )
    cors: CorsConfig = Field(default_factory=CorsConfig)
    metrics_token: SecretStr | None = Field(
        default=None,
        description="bearer token GET /metrics requires, e.g. ${METERGATE_METRICS_TOKEN}; "
        "none (or empty): /metrics is open, as Prometheus exporters usually are",
    )
    metrics_key_label: KeyLabel = Field(
        default="name",
        description="what the `key` label of the request, token and cost metrics holds: "
        "the key's name, its team (`-` for a key in none), or `-` for every key. A "
        "series per key and model is fine for dozens of keys; with thousands, `team` or "
        "`none` keeps /metrics small (the ledger and console keep each key's spend)",
    )
    # Slow and oversized clients (applied by `metergate serve`, per connection).
    max_header_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="request line and headers above this get a 431",
    )
    header_timeout_seconds: float = Field(
        default=10, gt=0, description="a request's headers must arrive within this (else 408)"
    )
    body_timeout_seconds: float = Field(
        default=60, gt=0, description="its body within this after the headers (else 408)"
    )
    idle_timeout_seconds: float = Field(
        default=75, gt=0, description="a kept-alive connection idle this long is closed"
    )
    send_timeout_seconds: float = Field(
        default=60,
        gt=0,
        description="a client that takes none of its answer for this long is cut off",
    )
    shutdown_grace_seconds: float = Field(
        default=30,
        ge=0,
        le=3600,
        description="on SIGTERM, requests in flight may finish within this; then 503 "
        "`shutting_down` (a stream: its last event), and a worker still running is killed",
    )
    trusted_proxies: list[str] = Field(
        default_factory=list,
        description="addresses or CIDRs whose X-Forwarded-For is believed; default none",
    )

    @field_validator("metrics_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        if len(value.get_secret_value()) < 16:
            raise ValueError(
                "use at least 16 characters (e.g. `openssl rand -hex 24`): wrong tokens "
                "are not rate limited"
            )
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"{item!r} is not an IP address or CIDR (e.g. 10.0.0.5, 10.0.0.0/8)"
                ) from None
        return value


class LedgerConfig(Strict):
    url: str = "sqlite:///.metergate/metergate.db"
    # PostgreSQL: a connection attempt or statement unanswered this long fails (a hung
    # server or a network dropping packets counts as unreachable, not as slow).
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    # Rows that wait spool_after_seconds while commits fail or hang, and those held at a
    # stop while the database is unreachable, wait here on local disk until it is back
    # (metering.spool).
    spool_directory: str = ".metergate/ledger-spool"
    spool_after_seconds: float = Field(default=5.0, gt=0, le=3600)

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError("must be sqlite:///PATH or postgresql://USER@HOST/DB")
        return value


EACH = "*"  # a budget's target meaning "each key (team, model) apart", each with the limit


class BudgetConfig(Strict):
    """Spend allowed per day or calendar month, for everything, one key, one model or one
    team (a team's keys together; teams are managed with `metergate teams`), or with
    `target: "*"` for each key (team, model) apart."""

    scope: Literal["global", "key", "model", "team"] = "global"
    target: str | None = None
    period: Literal["day", "month"] = "month"
    timezone: str = "UTC"
    limit_usd: Decimal = Field(gt=0)
    hard: bool = True
    alert_at_percent: list[int] = Field(default_factory=lambda: [50, 80, 100])
    webhook_url: WebhookUrl | None = None

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}; use an IANA name") from None
        return value

    @field_validator("alert_at_percent")
    @classmethod
    def _percentages(cls, value: list[int]) -> list[int]:
        if any(p <= 0 or p > 1000 for p in value):
            raise ValueError("percentages must be between 1 and 1000")
        return sorted(set(value))

    @field_validator("limit_usd")
    @classmethod
    def _at_least_a_nano(cls, value: Decimal) -> Decimal:
        # the budget book counts whole nano-USD: less would be a limit of 0, refusing all
        if value * 1_000_000_000 < 1:
            raise ValueError("limit_usd must be at least 0.000000001 (one nano-USD)")
        return value


class CacheConfig(Strict):
    """Exact-match response cache for non-streamed requests (in memory, LRU with TTL)."""

    enabled: bool = False
    ttl_seconds: float = Field(default=300, gt=0)
    max_entries: int = Field(default=10_000, ge=1)
    max_mb: float = Field(
        default=256, gt=0, description="bytes the in-memory cache may hold (its answers)"
    )
    max_entry_kb: float = Field(
        default=2048, gt=0, description="a bigger answer is served but not stored"
    )
    shared_across_keys: bool = False


class RedisConfig(Strict):
    """Shared state for a fleet: budgets, rate limits and the cache live in one Redis."""

    url: str
    on_failure: Literal["open", "closed"] = Field(
        default="open",
        description="Redis unreachable: open = serve on this process's own counters, "
        "closed = refuse (503) requests that need budgets or rate limits",
    )
    key_prefix: str = "mg:"
    timeout_seconds: float = Field(
        default=0.25, gt=0, le=10, description="socket timeout of each Redis call (hot path)"
    )

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be redis://HOST:PORT/DB, rediss://... or unix:///PATH")
        return value


class RateLimit(Strict):
    """Requests and tokens per minute. In a named entry, a field left out is taken from
    the `*` entry and `null` lifts it."""

    rpm: int | None = Field(default=None, ge=1, description="requests per minute")
    tpm: int | None = Field(default=None, ge=1, description="tokens per minute (in + out)")


class RateLimitsConfig(Strict):
    """`keys`: per gateway key (`*` = every key, each on its own); `models`: per model
    name, across all keys (`*` = every model, each on its own); `teams`: per team, across
    its keys, on top of each key's own (`*` = every team, each on its own)."""

    keys: dict[str, RateLimit] = Field(default_factory=dict)
    models: dict[str, RateLimit] = Field(default_factory=dict)
    teams: dict[str, RateLimit] = Field(default_factory=dict)


class RolloutGates(Strict):
    """A stage passes when the candidate stays within every gate (the write-up's
    rollback triggers are the defaults: error rate over 10%, p99 over 30 s, 5xx)."""

    max_error_rate: float = Field(default=0.10, ge=0, le=1)
    max_p99_seconds: float = Field(default=30, gt=0)
    max_5xx: int = Field(default=10, ge=0, description="5xx answers per judged interval")


class RolloutConfig(Strict):
    """Move a model's traffic from baseline upstreams to candidate upstreams in stages."""

    model: str
    baseline: list[str] = Field(min_length=1)
    candidate: list[str] = Field(min_length=1)
    stages: list[float] = Field(default_factory=lambda: [1.0, 10.0, 50.0, 100.0])
    interval_seconds: float = Field(default=300, gt=0, description="judge every interval")
    failure_threshold: int = Field(default=2, ge=1, description="failed judgments to roll back")
    min_requests: int = Field(default=50, ge=1, description="candidate attempts per judgment")
    gates: RolloutGates = Field(default_factory=RolloutGates)
    sticky: str = Field(default="none", pattern=r"^(none|key|header:[A-Za-z0-9-]+)$")
    source: Literal["local", "prometheus"] = "local"
    prometheus_url: str | None = None
    webhook_url: WebhookUrl | None = None

    @field_validator("stages")
    @classmethod
    def _increasing(cls, value: list[float]) -> list[float]:
        # NaN fails every comparison below, so it would pass them all (`.nan` in YAML)
        if not all(math.isfinite(stage) for stage in value):
            raise ValueError("stages must be finite percentages (not .nan or .inf)")
        if not value or any(b <= a for a, b in itertools.pairwise(value)):
            raise ValueError("stages must be increasing percentages")
        if value[0] <= 0 or value[-1] != 100:
            raise ValueError("stages must be above 0 and end at 100")
        return value

    @model_validator(mode="after")
    def _sides_apart(self) -> RolloutConfig:
        """An upstream on both sides would have each of its attempts judged as the
        candidate's and its failures retried on itself as the baseline."""
        shared = [name for name in self.candidate if name in self.baseline]
        if shared:
            raise ValueError(
                f"an upstream cannot be on both sides: {', '.join(shared)}; the candidate "
                "is what the baseline's traffic moves to"
            )
        return self


class ResponsesConfig(Strict):
    """Responses API answers kept (`store`, default true) in the ledger database, so
    `previous_response_id`, retrieval and input items work through any upstream."""

    retention_hours: float = Field(
        default=720, gt=0, description="deleted after this long (OpenAI keeps 30 days)"
    )
    max_stored_mb: float = Field(
        default=1024, gt=0, description="total size kept; beyond it the oldest go first"
    )


class AdminConfig(Strict):
    """The admin API (config reload, and the console later). Off without a key."""

    api_key: SecretStr | None = None

    @field_validator("api_key")
    @classmethod
    def _usable_key(cls, value: SecretStr | None) -> SecretStr | None:
        """A key that can be guessed, or that no client can send as written, would leave
        the admin API open or its operator locked out after a reload."""
        key = value.get_secret_value() if value is not None else ""
        if not key:
            return None  # off, as when the key is left out
        if len(key) < 16:
            raise ValueError("use at least 16 characters (e.g. `openssl rand -base64 32`)")
        if not (key.isascii() and key.isprintable()) or " " in key:
            raise ValueError("use printable ASCII without spaces: it is sent in an HTTP header")
        if key.startswith("mgk_"):
            raise ValueError("must not start with mgk_, the prefix of caller keys")
        return value


class GatewayConfig(Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    budgets: dict[str, BudgetConfig] = Field(default_factory=dict)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    redis: RedisConfig | None = None
    retry_budget: RetryBudgetConfig = Field(default_factory=RetryBudgetConfig)
    rollouts: dict[str, RolloutConfig] = Field(default_factory=dict)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    mcp: McpConfig | None = None
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    request_log: RequestLogConfig = Field(default_factory=RequestLogConfig)
    tags: TagsConfig = Field(default_factory=TagsConfig)


def each_key_budgets(budgets: dict[str, BudgetConfig]) -> list[str]:
    """The budgets for each key apart, whose limit a key may set for itself."""
    return [name for name, b in budgets.items() if b.scope == "key" and b.target == EACH]
