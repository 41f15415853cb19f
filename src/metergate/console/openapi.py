"""The admin API's OpenAPI 3.1 document, written by hand next to the code it describes.

A test validates it and checks that every admin route is in it, so it cannot drift.
Money is integer nano-USD (1e-9 USD), times are epoch seconds, as in the ledger.
"""

from __future__ import annotations

import functools
from typing import Any

from metergate import teams
from metergate.auth.rules import CAP_MAX, LAST_EXPIRY
from metergate.config.observe import TAG_NAME
from metergate.console import attribution
from metergate.console import keys as console_keys
from metergate.console.request_detail import SINCE
from metergate.console.requests_log import KEY_CHOICES_MAX
from metergate.metering.metrics import OUTCOMES
from metergate.metering.report import FIXED_GROUPS

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _object(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_USD_LIMIT = {  # a budget's limit as `teams.check_usd` takes it
    "anyOf": [
        {
            "type": "string",
            "pattern": f"^{teams.USD.pattern}$",
            "not": {"pattern": f"^{teams.USD_ZERO.pattern}$"},
        },
        {
            "type": "number",
            # rounded to nano-USD, half to even: 5e-10 is 0
            "exclusiveMinimum": 5e-10,
            "exclusiveMaximum": teams.USD_MAX,
        },
    ],
    "description": "USD, above 0 and below 10^9: a decimal string "
    '(exact, at most 9 decimals: "12.50") or a number (rounded to 9 '
    "decimals, half to even; one that rounds to 0 is refused)",
}
_NANO = {"type": "integer", "description": "nano-USD (1e-9 USD)"}
_COUNTS = {"type": "object", "additionalProperties": _NUM}
_SERIES = {"type": "array", "items": _nullable(_NUM)}
_TAGS = {"type": "object", "additionalProperties": _STR, "description": "tag name: value"}
_TEAM_NAME = {"type": "string", "pattern": f"^{teams.NAME.pattern}$"}
_TAG_NAME = TAG_NAME.pattern.removeprefix("^").removesuffix("$")

_ERRORS = {
    "400": "Invalid parameter or body",
    "401": "Missing or wrong admin key",
    "403": "A caller key (mgk_...) was sent: only the admin key is accepted",
    "404": "Admin API off (no admin.api_key), or no such object",
    "429": "Too many wrong admin keys from this address; see Retry-After",
}
_OTHER_ERRORS = {
    "409": "Conflict: the name is taken, the key is revoked, or the rollout's state does "
    "not allow the action",
    "413": "The request body is larger than 64 KiB",
    "422": "The config file is invalid; the gateway keeps serving the running version",
}


def _responses(
    ok: str,
    schema: dict[str, Any],
    status: str = "200",
    *extra: str,
    means: dict[str, str] | None = None,
) -> Any:
    """`extra`: error statuses beyond the common ones; `means`: what an error status
    means for this operation, where the general text would not say."""
    responses: dict[str, Any] = {status: {"description": ok, "content": {JSON: {"schema": schema}}}}
    for code in _ERRORS:
        responses[code] = {"$ref": f"#/components/responses/E{code}"}
    for code in (*extra, *(means or {})):
        responses[code] = {
            "description": (means or {}).get(code) or _OTHER_ERRORS[code],
            "content": {JSON: {"schema": _ref("Error")}},
        }
    return responses


def _window_param() -> dict[str, Any]:
    return {
        "name": "window",
        "in": "query",
        "required": False,
        "description": "How far back: chart buckets are 1 min, 15 min, 1 h and 4 h wide.",
        "schema": {"type": "string", "enum": ["1h", "24h", "7d", "30d"], "default": "24h"},
    }


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    """An optional query parameter."""
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _filter_params(default: int, most: int) -> list[dict[str, Any]]:
    return [
        _query("key", {"type": "string", "minLength": 1}, "Only requests of this key name"),
        _query("model", {"type": "string", "minLength": 1}, "Only requests for this model"),
        _query("team", {"type": "string", "minLength": 1}, "Only requests of this team"),
        _query("outcome", _ref("Outcome"), "Only requests with this outcome"),
        _query(
            "before",
            {"type": "integer", "minimum": 1},
            "Only rows with a smaller id (the next page: `next_before`)",
        ),
        _query(
            "limit",
            {"type": "integer", "minimum": 1, "maximum": most, "default": default},
            "Rows to return, newest first",
        ),
    ]


def _key_list_params() -> list[dict[str, Any]]:
    text = {"type": "string", "minLength": 1}
    return [
        _query(
            "limit",
            {
                "type": "integer",
                "minimum": 1,
                "maximum": console_keys.PAGE_MAX,
                "default": console_keys.PAGE_DEFAULT,
            },
            "Keys to return",
        ),
        _query(
            "after",
            {"type": "string", "pattern": f"^{console_keys.CURSOR.pattern}$"},
            "Where the page starts: the `next_after` of the page before",
        ),
        _query(
            "search",
            text,
            "Part of a name (any case), or a key's id or hint (last four characters)",
        ),
        _query(
            "state",
            {"type": "string", "enum": list(console_keys.KEY_STATES), "default": "all"},
            "Only active or only revoked keys",
        ),
        _query("team", text, "Only keys of this team"),
    ]


def _schemas() -> dict[str, Any]:
    group = _object(
        {
            "requests": _INT,
            "errors": _INT,
            "refused": _INT,
            "error_rate": _nullable(_NUM),
            "p95_ms": _nullable(_NUM),
            "cost_nano": _NANO,
            "saved_nano": _NANO,
            "input_tokens": _INT,
            "cached_input_tokens": _INT,
            "output_tokens": _INT,
        }
    )
    budget = _object(
        {
            "name": _STR,
            "scope": {"type": "string", "enum": ["global", "key", "model", "team"]},
            "target": _nullable(_STR),
            "period": {"type": "string", "enum": ["day", "month"]},
            "timezone": _STR,
            "period_start": _NUM,
            "period_end": _NUM,
            "hard": _BOOL,
            "limit_nano": _NANO,
            "spent_nano": _NANO,
            "reserved_nano": _NANO,
            "percent": _NUM,
            "soft_percent": {
                **_INT,
                "description": "amber from here: the highest alert threshold below 100%",
            },
            "alert_at_percent": {"type": "array", "items": _INT},
            "state": {"type": "string", "enum": ["ok", "warning", "exceeded"]},
            "each": {
                **_BOOL,
                "description": 'target "*": each key (team, model) has the limit apart; '
                "spent_nano is the one that spent most",
            },
            "top_target": {
                **_nullable(_STR),
                "description": "of a budget for each: the one that spent most",
            },
            "past_soft": {
                **_INT,
                "description": "of a budget for each: how many spent soft_percent or more",
            },
        },
        ["name", "limit_nano", "spent_nano", "state"],
    )
    key = _object(
        {
            "id": _STR,
            "name": _STR,
            "hint": {**_STR, "description": "last 4 characters"},
            "models": _nullable({"type": "array", "items": _STR}),
            "max_tokens_cap": _nullable(_INT),
            "created_at": _NUM,
            "revoked_at": _nullable(_NUM),
            "expires_at": {**_nullable(_NUM), "description": "refused from then on; null: never"},
            "budget_limits": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "its own limits of budgets for each key, USD as decimal strings",
            },
            "rpm": _nullable(_INT),
            "tpm": _nullable(_INT),
            "state": {
                "type": "string",
                "enum": [state for state in console_keys.KEY_STATES if state != "all"],
            },
            "team": _nullable(_STR),
            "tags": _TAGS,
        },
        ["id", "name", "hint", "state"],
    )
    side = _object(
        {"attempts": _NUM, "error_rate": _NUM, "p99_seconds": _NUM, "server_errors": _NUM}
    )
    rollout = _object(
        {
            "name": _STR,
            "model": _STR,
            "state": {
                "type": "string",
                "enum": ["pending", "running", "paused", "completed", "rolled_back"],
            },
            "stage": _INT,
            "stages": {"type": "array", "items": _NUM},
            "stage_percent": _NUM,
            "stage_started_at": _nullable(_NUM),
            "weights": _object(
                {
                    s: _object({"upstreams": {"type": "array", "items": _STR}, "share": _NUM})
                    for s in ("candidate", "baseline")
                }
            ),
            "gates": _object({"max_error_rate": _NUM, "max_p99_seconds": _NUM, "max_5xx": _INT}),
            "min_requests": _INT,
            "interval_seconds": _NUM,
            "failures": _INT,
            "failure_threshold": _INT,
            "source": _STR,
            "next_decision_at": _nullable(_NUM),
            "last_judgment": _nullable(
                {
                    "type": "object",
                    "description": "the deciding process's "
                    "last verdict: gate values against limits",
                }
            ),
            "live": _object({"candidate": side, "baseline": side}),
            "actions": {"type": "array", "items": _ref("RolloutAction")},
            "history": {
                "type": "array",
                "items": _object(
                    {
                        "ts": _NUM,
                        "event": _STR,
                        "stage": _INT,
                        "stage_percent": _NUM,
                        "by": _nullable(_STR),
                        "verdict": _nullable(_STR),
                        "failed_gates": {"type": "array", "items": _STR},
                    }
                ),
            },
        },
        ["name", "model", "state", "stage", "actions"],
    )
    return {
        "Error": _object(
            {
                "error": _object(
                    {
                        "message": _STR,
                        "type": _STR,
                        "code": _nullable(_STR),
                        "param": _nullable(_STR),
                    },
                    ["message", "type"],
                )
            },
            ["error"],
        ),
        "Outcome": {"type": "string", "enum": list(OUTCOMES)},
        "RolloutAction": {
            "type": "string",
            "enum": ["start", "pause", "resume", "promote", "rollback"],
        },
        "UsageGroup": group,
        "Budget": budget,
        "Key": key,
        "KeyWithSpend": {
            "allOf": [
                key,
                _object(
                    {
                        "requests_month": _INT,
                        "spend_today_nano": _NANO,
                        "spend_month_nano": _NANO,
                        "budgets": {"type": "array", "items": _ref("Budget")},
                    }
                ),
            ]
        },
        "Rollout": rollout,
        "Overview": _object(
            {
                "window": _STR,
                "now": _NUM,
                "spend": _object(
                    {
                        "today_nano": _NANO,
                        "month": _STR,
                        "month_nano": _NANO,
                        "forecast_nano": {**_NANO, "description": "projected month-end spend"},
                        "daily_rate_nano": _NANO,
                        "forecast_basis_days": _NUM,
                        "remaining_days": _NUM,
                    }
                ),
                "totals": _ref("UsageGroup"),
                "models": {
                    "type": "array",
                    "items": {"allOf": [_object({"model": _STR}), _ref("UsageGroup")]},
                },
                "series": _object(
                    {
                        "start": _NUM,
                        "step": _INT,
                        "timestamps": {"type": "array", "items": _NUM},
                        "models": {
                            "type": "object",
                            "additionalProperties": _object(
                                {
                                    "requests_per_second": _SERIES,
                                    "error_percent": _SERIES,
                                    "p95_ms": _SERIES,
                                    "ttft_p95_ms": _SERIES,
                                }
                            ),
                        },
                    }
                ),
                "budgets": {"type": "array", "items": _ref("Budget")},
            },
            ["window", "spend", "totals", "series", "budgets"],
        ),
        "Upstream": _object(
            {
                "name": _STR,
                "provider": _STR,
                "provider_type": _STR,
                "model": _STR,
                "weight": _INT,
                "serves": {"type": "array", "items": _STR},
                "circuit": {"type": "string", "enum": ["closed", "half-open", "open"]},
                "circuit_retry_in": _nullable(_NUM),
                "in_flight": _INT,
                "window": {
                    "allOf": [
                        _ref("UsageGroup"),
                        _object({"outcomes": _COUNTS, "retries": _INT, "fallbacks_served": _INT}),
                    ]
                },
                "since_start": _object(
                    {"attempts": _COUNTS, "fallbacks_from": _NUM, "fallbacks_to": _NUM}
                ),
            },
            ["name", "circuit"],
        ),
        "McpServer": _object(
            {
                "name": _STR,
                "up": _BOOL,
                "tool_calls": _NUM,
                "tool_calls_per_second": _NUM,
                "tool_error_rate": _nullable(_NUM),
                "errors_by_type": _COUNTS,
                "requests_by_method": _COUNTS,
                "slow_tools": {
                    "type": "array",
                    "items": _object(
                        {
                            "tool": _STR,
                            "calls": _NUM,
                            "errors": _NUM,
                            "mean_seconds": _nullable(_NUM),
                            "p95_seconds": _nullable(_NUM),
                        }
                    ),
                },
            },
            ["name", "up"],
        ),
        "RequestRow": _object(
            {
                "id": _INT,
                "ts": _NUM,
                "request_id": _STR,
                "key_name": _STR,
                "model": _STR,
                "upstream": _STR,
                "attempts": _INT,
                "input_tokens": _INT,
                "cached_input_tokens": _INT,
                "output_tokens": _INT,
                "cost_nano": _NANO,
                "saved_nano": _NANO,
                "duration_ms": _NUM,
                "ttft_ms": _nullable(_NUM),
                "outcome": _ref("Outcome"),
                "status": _INT,
                "cache_hit": _BOOL,
                "stream": _BOOL,
                "usage_estimated": {
                    **_BOOL,
                    "description": "tokens are the gateway's bound, not the upstream's count: "
                    "a stream that did not complete is billed at least what it relayed",
                },
                "team": _nullable(_STR),
                "tags": _TAGS,
            }
        ),
        **_attribution_schemas(),
        **_input_schemas(),
    }


def _attribution_schemas() -> dict[str, Any]:
    """Teams, usage by group, and the request log's records."""
    team_budget = _object(
        {
            "period": {"type": "string", "enum": ["day", "month"]},
            "limit_usd": {"type": "string", "description": "USD, a decimal string"},
            "hard": _BOOL,
            "timezone": _STR,
            "alert_at_percent": {"type": "array", "items": _INT},
        },
        ["period", "limit_usd"],
    )
    team = _object(
        {
            "name": _TEAM_NAME,
            "description": _STR,
            "tags": _TAGS,
            "budgets": {"type": "array", "items": team_budget},
            "rpm": _nullable(_INT),
            "tpm": _nullable(_INT),
            "created_at": _NUM,
            "updated_at": _NUM,
        },
        ["name", "budgets"],
    )
    attempt = _object(
        {
            "number": _INT,
            "upstream": _STR,
            "provider": _STR,
            "model": _STR,
            "started_ms": {**_NUM, "description": "after the request arrived"},
            "duration_ms": _NUM,
            "outcome": _ref("Outcome"),
            "upstream_status": _nullable(_INT),
            "error": _nullable(_STR),
            "span_id": _nullable(_STR),
        }
    )
    body = _object(
        {
            "body": _nullable({**_STR, "description": "redacted, cut at max_body_bytes"}),
            "bytes": {**_INT, "description": "size before redaction and cutting"},
            "truncated": _BOOL,
        }
    )
    record = _object(
        {
            "request_id": _STR,
            "ts": _NUM,
            "key": _STR,
            "team": _nullable(_STR),
            "tags": _TAGS,
            "model": _STR,
            "upstream": _STR,
            "operation": _STR,
            "outcome": _ref("Outcome"),
            "status": _INT,
            "stream": _BOOL,
            "cache_hit": _BOOL,
            "duration_ms": _NUM,
            "ttft_ms": _nullable(_NUM),
            "upstream_ms": _NUM,
            "cost_nano": _NANO,
            "saved_nano": {**_NANO, "description": "what a cache hit saved"},
            "usage": _COUNTS,
            "trace_id": _nullable(_STR),
            "request": {
                "allOf": [
                    body,
                    _object({"headers": {"type": "object", "additionalProperties": _STR}}),
                ]
            },
            "response": _nullable(body),
            "error": _nullable(_object({"type": _STR, "code": _nullable(_STR), "message": _STR})),
            "attempts": {"type": "array", "items": attempt},
        }
    )
    return {
        "TeamBudget": team_budget,
        "Team": team,
        "TeamWithSpend": {
            "allOf": [
                team,
                _object(
                    {
                        "keys": {
                            "type": "array",
                            "items": _STR,
                            "description": f"the first {attribution.TEAM_KEYS_SHOWN} "
                            "active keys' names, by name",
                        },
                        "key_count": {**_INT, "description": "active keys in the team"},
                        "requests_month": _INT,
                        "spend_today_nano": _NANO,
                        "spend_month_nano": _NANO,
                        "budget_state": {"type": "array", "items": _ref("Budget")},
                    }
                ),
            ]
        },
        "RequestLogRecord": record,
    }


@functools.cache
def _printable() -> str:
    """A pattern for what `str.isprintable()` accepts, which the server checks (letters,
    marks, numbers, punctuation, symbols, the space; not controls, format characters,
    other separators, private use, unassigned), listed from this Python's Unicode
    database so that the document and the server agree character for character."""
    accepted: list[tuple[int, int]] = []
    for point in range(0x110000):
        if not chr(point).isprintable():
            continue
        if accepted and accepted[-1][1] == point - 1:
            accepted[-1] = (accepted[-1][0], point)
        else:
            accepted.append((point, point))

    def char(point: int) -> str:  # \uXXXX is read alike by ECMA, Python and Rust
        return f"\\u{point:04X}" if point <= 0xFFFF else chr(point)

    spans = "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in accepted)
    return f"^[{spans}]*$"


def _input_schemas() -> dict[str, Any]:
    """What request bodies take, exactly as the server checks it (`metergate.teams`)."""
    return {
        "DefaultTags": {
            "type": "object",
            "maxProperties": teams.MAX_TAGS,
            "propertyNames": {"pattern": f"^{_TAG_NAME}$"},
            "additionalProperties": {
                "type": "string",
                "minLength": 1,
                "maxLength": teams.MAX_TAG_VALUE,
                "pattern": _printable(),
                "description": "printable: letters, marks, numbers, punctuation, symbols, "
                "the space",
            },
            "description": "Default tags of requests, name: value ({} for none)",
        },
        "TeamBudgetChange": {
            **_object(
                {
                    "period": {"type": "string", "enum": list(teams.PERIODS)},
                    "limit_usd": _USD_LIMIT,
                    "hard": {**_BOOL, "default": True},
                    "timezone": {
                        "type": "string",
                        "enum": sorted(teams.time_zones()) or ["UTC"],
                        "default": "UTC",
                        "description": "IANA name: the day or month starts at midnight there",
                    },
                    "alert_at_percent": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1, "maximum": 1000},
                        "default": [50, 80, 100],
                    },
                },
                ["period", "limit_usd"],
            ),
            "additionalProperties": False,
        },
    }


def _key_body(
    models: list[str] | None, required: list[str], key_budgets: list[str]
) -> dict[str, Any]:
    """A key's writable fields; nothing else is accepted. `key_budgets`: the config's
    budgets for each key, whose limit a key may set for itself."""
    model = {"type": "string", "enum": models} if models else _STR
    creating = "name" in required
    kept = "" if creating else " (or the key's own that have left the config since)"
    properties: dict[str, Any] = {
        "models": {
            **_nullable({"type": "array", "items": model, "minItems": 1}),
            "description": f"configured model names{kept}; null means every model (an "
            "empty list is refused)",
        },
        "max_tokens_cap": _nullable({"type": "integer", "minimum": 1, "maximum": CAP_MAX}),
        "expires_at": {
            **_nullable({"type": "number", "minimum": 0, "maximum": LAST_EXPIRY}),
            "description": "epoch seconds from which the key is refused (a past time: at "
            "once; it can be given a later one); null: never",
        },
        "team": {**_nullable(_TEAM_NAME), "description": "an existing team's name, or null"},
        "tags": _ref("DefaultTags"),
        "budget_limits": {
            **_nullable(
                {
                    "type": "object",
                    "properties": {name: _USD_LIMIT for name in key_budgets},
                    "additionalProperties": False,
                }
            ),
            "description": 'this key\'s own limit of budgets for each key (target "*"), '
            "replacing the config's for it; null or {} for none",
        },
        **{
            field: {
                **_nullable({"type": "integer", "minimum": 1, "maximum": teams.LIMIT_MAX}),
                "description": f"this key's own {what} per minute, replacing "
                '`rate_limits.keys."*"` for it (a named entry there still wins); null: none',
            }
            for field, what in (("rpm", "requests"), ("tpm", "tokens"))
        },
    }
    if "name" in required:
        properties = {
            "name": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
            **properties,
        }
    return {**_object(properties, required), "additionalProperties": False}


def _paths(models: list[str] | None, key_budgets: list[str]) -> dict[str, Any]:
    key_id = {"name": "id", "in": "path", "required": True, "schema": _STR}
    return {
        "/admin/api/session": {
            "get": {
                "summary": "Check the admin key (the console's sign-in)",
                "operationId": "session",
                "responses": _responses(
                    "The key is the admin key",
                    _object(
                        {
                            "gateway_version": _STR,
                            "config_version": _STR,
                            "models": {"type": "array", "items": _STR},
                            "upstreams": {"type": "array", "items": _STR},
                            "rollouts": {"type": "array", "items": _STR},
                        }
                    ),
                ),
            }
        },
        "/admin/api/overview": {
            "get": {
                "summary": "Spend, month-end forecast, per-model series and budgets",
                "operationId": "overview",
                "parameters": [_window_param()],
                "responses": _responses("Overview", _ref("Overview")),
            }
        },
        "/admin/api/upstreams": {
            "get": {
                "summary": "Health of each deployment: circuit, errors, retries, fallbacks",
                "operationId": "upstreams",
                "parameters": [_window_param()],
                "responses": _responses(
                    "Upstreams",
                    _object(
                        {
                            "window": _STR,
                            "now": _NUM,
                            "upstreams": {"type": "array", "items": _ref("Upstream")},
                        }
                    ),
                ),
            }
        },
        "/admin/api/keys": {
            "get": {
                "summary": "A page of keys with their spend and key-scoped budgets",
                "description": "Active keys first, then by name. Pass `next_after` as "
                "`after` for the next page; `matched` counts the keys of all pages.",
                "operationId": "listKeys",
                "parameters": _key_list_params(),
                "responses": _responses(
                    "Keys",
                    _object(
                        {
                            "keys": {"type": "array", "items": _ref("KeyWithSpend")},
                            "next_after": _nullable(_STR),
                            "matched": _INT,
                            "models": {"type": "array", "items": _STR},
                        }
                    ),
                ),
            },
            "post": {
                "summary": "Create a key; the secret is in this response only",
                "operationId": "createKey",
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _key_body(models, ["name"], key_budgets)}},
                },
                "responses": _responses(
                    "Created",
                    _object(
                        {
                            "key": _ref("Key"),
                            "secret": {"type": "string", "description": "mgk_...; shown once"},
                        },
                        ["key", "secret"],
                    ),
                    "201",
                    "409",
                    "413",
                    means={
                        "409": "An active key has this name (`key_name_taken`), or `team` "
                        "names no team (`team_not_found`)"
                    },
                ),
            },
        },
        "/admin/api/keys/{id}": {
            "patch": {
                "summary": "Set an active key's allowed models, max_tokens cap, team and tags",
                "description": "Fields left out stay; null clears (all models / no cap / no "
                "team); `tags` replaces the key's tags ({} for none); an empty object changes "
                "nothing.",
                "operationId": "updateKey",
                "parameters": [key_id],
                "requestBody": {
                    "required": True,
                    "content": {JSON: {"schema": _key_body(models, [], key_budgets)}},
                },
                "responses": _responses(
                    "Updated",
                    _object({"key": _ref("Key")}),
                    "200",
                    "409",
                    "413",
                    means={
                        "409": "The key is revoked (`key_revoked`), or `team` names no team "
                        "(`team_not_found`)"
                    },
                ),
            }
        },
        "/admin/api/keys/{id}/revoke": {
            "post": {
                "summary": "Revoke a key (refused here at once, fleet-wide within 2 s)",
                "description": "Revoking a revoked key changes nothing.",
                "operationId": "revokeKey",
                "parameters": [key_id],
                "responses": _responses("Revoked", _object({"key": _ref("Key")})),
            }
        },
        "/admin/api/rollouts": {
            "get": {
                "summary": "Rollouts: stage, weights, gates, last judgment, history",
                "operationId": "listRollouts",
                "responses": _responses(
                    "Rollouts",
                    _object({"now": _NUM, "rollouts": {"type": "array", "items": _ref("Rollout")}}),
                ),
            }
        },
        "/admin/api/rollouts/{name}/{action}": {
            "post": {
                "summary": "Start, pause, resume, promote or roll back a rollout",
                "operationId": "rolloutAction",
                "parameters": [
                    {"name": "name", "in": "path", "required": True, "schema": _STR},
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": _ref("RolloutAction"),
                    },
                ],
                "responses": _responses(
                    "Done", _object({"rollout": _ref("Rollout")}), "200", "409"
                ),
            }
        },
        "/admin/api/mcp": {
            "get": {
                "summary": "MCP servers behind the gateway: up, tool call rate, errors, slow tools",
                "operationId": "mcpServers",
                "responses": _responses(
                    "MCP servers (empty when none are configured)",
                    _object(
                        {
                            "now": _NUM,
                            "rate_window_seconds": _NUM,
                            "servers": {"type": "array", "items": _ref("McpServer")},
                        }
                    ),
                ),
            }
        },
        "/admin/api/requests": {
            "get": {
                "summary": "Latest ledger rows, newest first",
                "operationId": "listRequests",
                "parameters": _filter_params(100, 1000),
                "responses": _responses(
                    "Rows",
                    _object(
                        {
                            "requests": {"type": "array", "items": _ref("RequestRow")},
                            "next_before": _nullable(_INT),
                            "filters": _object(
                                {
                                    **{
                                        k: {"type": "array", "items": _STR}
                                        for k in ("keys", "models", "outcomes")
                                    },
                                    "keys_complete": {
                                        **_BOOL,
                                        "description": "false: `keys` are the first "
                                        f"{KEY_CHOICES_MAX} names of more",
                                    },
                                }
                            ),
                        }
                    ),
                ),
            }
        },
        "/admin/api/requests.csv": {
            "get": {
                "summary": "The same rows as CSV (a download)",
                "operationId": "exportRequests",
                "parameters": _filter_params(10_000, 100_000),
                "responses": {
                    "200": {
                        "description": "CSV, header line first",
                        "content": {"text/csv": {"schema": _STR}},
                    },
                    **{code: {"$ref": f"#/components/responses/E{code}"} for code in _ERRORS},
                },
            }
        },
        **_attribution_paths(),
        "/admin/reload": {
            "post": {
                "summary": "Re-read the config file and apply it if valid",
                "operationId": "reload",
                "responses": _responses(
                    "Applied (or already running)",
                    _object(
                        {
                            "applied": _BOOL,
                            "version": _STR,
                            "restart_required": {"type": "array", "items": _STR},
                        }
                    ),
                    "200",
                    "422",
                ),
            }
        },
        "/admin/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "security": [],
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {JSON: {"schema": {"type": "object"}}},
                    }
                },
            }
        },
    }


def _attribution_paths() -> dict[str, Any]:
    """Teams, usage by team or tag, one request in detail, the request log export."""
    name = {"name": "name", "in": "path", "required": True, "schema": _STR}
    limit = _nullable({"type": "integer", "minimum": 1, "maximum": teams.LIMIT_MAX})
    change = {
        "description": {
            "type": "string",
            "maxLength": teams.MAX_DESCRIPTION,
            "pattern": _printable(),
            "description": "printable, as a tag value ('' for none)",
        },
        "tags": _ref("DefaultTags"),
        "budgets": {
            "type": "array",
            "items": _ref("TeamBudgetChange"),
            # at most one budget per period
            "allOf": [
                {
                    "contains": _object({"period": {"const": period}}, ["period"]),
                    "minContains": 0,
                    "maxContains": 1,
                }
                for period in teams.PERIODS
            ],
            "description": "at most one per period; [] removes them",
        },
        "rpm": {**limit, "description": "requests per minute; null: no team limit"},
        "tpm": {**limit, "description": "tokens per minute; null: no team limit"},
    }

    def body(schema: dict[str, Any]) -> dict[str, Any]:
        return {
            "required": True,
            "content": {JSON: {"schema": {**schema, "additionalProperties": False}}},
        }

    return {
        "/admin/api/teams": {
            "get": {
                "summary": "Teams with their keys, spend, budgets and limits",
                "operationId": "listTeams",
                "responses": _responses(
                    "Teams",
                    _object(
                        {"now": _NUM, "teams": {"type": "array", "items": _ref("TeamWithSpend")}}
                    ),
                ),
            },
            "post": {
                "summary": "Create a team (live on every gateway process within 2 s)",
                "operationId": "createTeam",
                "requestBody": body(_object({"name": _TEAM_NAME, **change}, ["name"])),
                "responses": _responses("Created", _object({"team": _ref("Team")}), "201", "409"),
            },
        },
        "/admin/api/teams/{name}": {
            "patch": {
                "summary": "Change a team: fields sent replace its own (budgets, tags whole)",
                "operationId": "updateTeam",
                "parameters": [name],
                "description": "Fields left out stay; an empty object changes nothing.",
                "requestBody": body(_object(change)),
                "responses": _responses("Updated", _object({"team": _ref("Team")})),
            },
            "delete": {
                "summary": "Delete a team no active key belongs to",
                "operationId": "deleteTeam",
                "parameters": [name],
                "responses": _responses("Deleted", _object({"deleted": _STR}), "200", "409"),
            },
        },
        "/admin/api/usage": {
            "get": {
                "summary": "Usage grouped by model, key, upstream, team or a request tag",
                "operationId": "usage",
                "parameters": [
                    _window_param(),
                    _query(
                        "by",
                        {
                            "type": "string",
                            "pattern": f"^(?:{'|'.join(FIXED_GROUPS)}|tag:{_TAG_NAME})$",
                            "default": "team",
                        },
                        "model, key, upstream, team, or tag:NAME; `(none)` groups requests "
                        "without a team or the tag",
                    ),
                    _query("team", {"type": "string", "minLength": 1}, "Only this team's requests"),
                    _query(
                        "tag",
                        # the value after the first colon: anything, at least one character
                        {"type": "string", "pattern": f"^{_TAG_NAME}:[\\s\\S]"},
                        "Only requests with this tag, as NAME:VALUE",
                    ),
                    _query(
                        "limit",
                        {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": attribution.GROUPS_MAX,
                            "default": attribution.GROUPS_DEFAULT,
                        },
                        "The costliest groups to return",
                    ),
                    _query(
                        "p95",
                        {"type": "boolean", "default": True},
                        "false: leave out `p95_ms` (null), which ranks every request of "
                        "the window; the sums read the ledger's sums by hour",
                    ),
                ],
                "responses": _responses(
                    "The costliest groups first, and the total of all",
                    _object(
                        {
                            "window": _STR,
                            "now": _NUM,
                            "by": _STR,
                            "groups": {
                                "type": "array",
                                "items": {"allOf": [_object({"name": _STR}), _ref("UsageGroup")]},
                            },
                            "group_count": {
                                **_INT,
                                "description": "groups in all; `groups` holds the costliest",
                            },
                            "total": _ref("UsageGroup"),
                        }
                    ),
                ),
            }
        },
        "/admin/api/requests/{id}": {
            "get": {
                "summary": "One request: its ledger row and, when kept, its request log record",
                "operationId": "requestDetail",
                "parameters": [
                    {
                        "name": "id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "integer", "minimum": 1},
                        "description": "the ledger row id (`id` in the request list)",
                    }
                ],
                "responses": _responses(
                    "The request",
                    _object(
                        {
                            "request": _ref("RequestRow"),
                            "log": _nullable(_ref("RequestLogRecord")),
                            "request_log": _object(
                                {"enabled": _BOOL, "capture": _STR, "store": _STR}
                            ),
                        }
                    ),
                    means={
                        "404": "Admin API off, or no ledger row has this id, or the id is not "
                        "a row id at all (`request_not_found`)"
                    },
                ),
            }
        },
        "/admin/api/request-log.jsonl": {
            "get": {
                "summary": "The request log's records of a period, as JSON Lines (a download)",
                "operationId": "exportRequestLog",
                "parameters": [
                    _query(
                        "since",
                        {"type": "string", "pattern": f"^{SINCE.pattern}$", "default": "24h"},
                        "How far back: a whole number of minutes, hours or days (30m, 24h, 7d)",
                    )
                ],
                "responses": {
                    "200": {
                        "description": "One RequestLogRecord per line, oldest first",
                        "content": {"application/x-ndjson": {"schema": _STR}},
                    },
                    **{code: {"$ref": f"#/components/responses/E{code}"} for code in _ERRORS},
                },
            }
        },
    }


def openapi_document(
    version: str, models: list[str] | None = None, key_budgets: list[str] | None = None
) -> dict[str, Any]:
    """The document; `models`, the configured model names, are what a key may allow,
    `key_budgets`, the budgets for each key, those whose limit it may set."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "metergate admin API",
            "version": version,
            "description": "What the console shows and does, for scripts too. Send the "
            "admin key (admin.api_key) as `Authorization: Bearer ...`; caller keys (mgk_...) "
            "are refused. Five wrong keys a minute from one address get 429 for a while. "
            "Unknown query parameters and body fields, a parameter given twice or empty, "
            "are refused with 400.",
        },
        "servers": [{"url": "/"}],
        "security": [{"adminKey": []}],
        "paths": _paths(models, key_budgets or []),
        "components": {
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
            "responses": {
                f"E{code}": {"description": text, "content": {JSON: {"schema": _ref("Error")}}}
                for code, text in _ERRORS.items()
            },
        },
    }
