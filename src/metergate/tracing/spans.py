"""A finished request's spans, built after the fact from its `RequestLog`.

One SERVER span for the request and one CLIENT span per upstream attempt (retries and
fallbacks each get theirs), with the ids already sent upstream in `traceparent`, and
the times the request recorded. Names and attributes follow the OpenTelemetry GenAI
semantic conventions (`{operation} {model}`, `gen_ai.*`), plus `metergate.*` for cost,
key, team, tags, upstream and outcome. Prompts and completions go in only with
`tracing.capture_content`. Building spans this way (rather than through a live tracer
around each await) keeps the request's own path free of span objects and context
switches, and lets one record feed the metrics, the ledger and the trace alike.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from metergate.config.model import ProviderConfig
from metergate.metering.meter import AttemptRecord, RequestLog
from metergate.providers.base import Adapter
from metergate.tracing import answers, content
from metergate.tracing.context import TraceContext
from metergate.tracing.pipeline import SCOPE

# gen_ai.provider.name: the GenAI conventions' well-known value of each provider type,
# and of the presets that have one (any other preset is named as it is: groq, deepseek).
PROVIDER_NAMES = {
    "openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gcp.gemini",
    "vertex": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "simulated": "metergate.simulated",
}
PRESET_NAMES = {"mistral": "mistral_ai", "xai": "x_ai"}
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_MAX_STATUS_TEXT = 300


class SpanBuilder:
    def __init__(self, resource: Resource, capture_content: bool, max_content_bytes: int) -> None:
        self.resource = resource
        self.capture_content = capture_content
        self.max_content_bytes = max_content_bytes

    def build(
        self, log: RequestLog, ts: float, duration: float, tags: dict[str, str]
    ) -> list[ReadableSpan]:
        trace = log.trace
        assert trace is not None
        end_perf = log.started + duration

        def epoch_ns(perf: float) -> int:
            return int((ts - (end_perf - perf)) * 1e9)

        server = SpanContext(trace.trace_id, trace.span_id, False, _SAMPLED)
        captured = self.capture_content and log.capture
        answer = answers.read_answer(log.response, self.max_content_bytes if captured else None)
        steps = log.steps or []
        spans = [
            self._attempt(log, step, number, server, trace, epoch_ns)
            for number, step in enumerate(steps, 1)
        ]
        attributes = self._server_attributes(log, tags, answer, steps)
        events = []
        if log.ttft is not None:
            events.append(
                Event(
                    "metergate.first_token",
                    {"gen_ai.response.time_to_first_chunk": log.ttft},
                    epoch_ns(log.started + log.ttft),
                )
            )
        parent = (
            SpanContext(trace.trace_id, trace.parent_id, True, _flags(trace))
            if trace.parent_id is not None
            else None
        )
        spans.append(
            ReadableSpan(
                name=f"{_operation(log)} {log.model}",
                context=server,
                parent=parent,
                resource=self.resource,
                attributes=attributes,
                events=events,
                kind=SpanKind.SERVER,
                status=_server_status(log),
                start_time=epoch_ns(log.started),
                end_time=epoch_ns(end_perf),
                instrumentation_scope=SCOPE,
            )
        )
        return spans

    def _server_attributes(
        self,
        log: RequestLog,
        tags: dict[str, str],
        answer: answers.Answer,
        steps: list[AttemptRecord],
    ) -> dict[str, Any]:
        usage = log.usage
        body = log.prompt or log.body or {}  # in chat terms, whatever the door
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": _operation(log),
            "gen_ai.request.model": log.model,
            "metergate.request_id": log.request_id,
            "metergate.key": log.key,
            "metergate.upstream": log.upstream,
            "metergate.outcome": log.outcome,
            "metergate.cost_usd": log.cost_nano / 1e9,
            "metergate.attempts": log.attempts,
            "http.response.status_code": log.status,
        }
        if steps:
            attributes["gen_ai.provider.name"] = _provider(steps[-1])
        if log.team is not None:
            attributes["metergate.team"] = log.team
        for name, value in tags.items():
            attributes[f"metergate.tag.{name}"] = value
        if log.cache_hit:
            attributes["metergate.cache_hit"] = True
        if log.outcome != "success":
            attributes["error.type"] = log.outcome
        if usage is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.input_tokens + usage.cached_input_tokens
            attributes["gen_ai.usage.output_tokens"] = usage.output_tokens
            if usage.cached_input_tokens:
                attributes["gen_ai.usage.cache_read.input_tokens"] = usage.cached_input_tokens
        if log.ttft is not None:
            attributes["gen_ai.response.time_to_first_chunk"] = log.ttft
        for field, attribute in _REQUEST_FIELDS:
            number = body.get(field)
            if isinstance(number, int | float) and not isinstance(number, bool):
                attributes[attribute] = number
        if log.stream:
            attributes["gen_ai.request.stream"] = True
        if answer.model:
            attributes["gen_ai.response.model"] = answer.model
        if answer.id:
            attributes["gen_ai.response.id"] = answer.id
        if answer.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = answer.finish_reasons
        if self.capture_content and log.capture:
            messages = content.input_messages(body, self.max_content_bytes)
            if messages is not None:
                attributes["gen_ai.input.messages"] = messages
            if answer.output is not None:
                attributes["gen_ai.output.messages"] = answer.output
        return attributes

    def _attempt(
        self,
        log: RequestLog,
        step: AttemptRecord,
        number: int,
        server: SpanContext,
        trace: TraceContext,
        epoch_ns: Any,
    ) -> ReadableSpan:
        deployment = step.deployment
        provider = deployment.adapter.config
        operation = _operation(log, deployment.adapter)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": _provider(step),
            "gen_ai.request.model": deployment.model,
            "metergate.upstream": deployment.name,
            "metergate.attempt": number,
            "metergate.outcome": step.outcome,
        }
        if provider.base_url:
            parts = urlsplit(provider.base_url)
            if parts.hostname:
                attributes["server.address"] = parts.hostname
                attributes["server.port"] = parts.port or (443 if parts.scheme == "https" else 80)
        status = Status(StatusCode.UNSET)
        if step.outcome != "success":
            attributes["error.type"] = step.outcome
            status = Status(StatusCode.ERROR, (step.error or step.outcome)[:_MAX_STATUS_TEXT])
        if step.status is not None:
            attributes["http.response.status_code"] = step.status
        return ReadableSpan(
            name=f"{operation} {deployment.model}",
            context=SpanContext(trace.trace_id, step.span_id, False, _SAMPLED),
            parent=server,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.CLIENT,
            status=status,
            start_time=epoch_ns(step.started),
            end_time=epoch_ns(step.ended),
            instrumentation_scope=SCOPE,
        )


_REQUEST_FIELDS = (
    ("max_tokens", "gen_ai.request.max_tokens"),
    ("max_completion_tokens", "gen_ai.request.max_tokens"),
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("seed", "gen_ai.request.seed"),
    ("n", "gen_ai.request.choice.count"),
)


def provider_name(config: ProviderConfig) -> str:
    if config.preset is not None:
        return PRESET_NAMES.get(config.preset, config.preset)
    return PROVIDER_NAMES.get(config.type, config.type)


def _operation(log: RequestLog, adapter: Adapter | None = None) -> str:
    """The conventions' operation: a legacy completions request is a `text_completion`,
    at the gateway and upstream when it is sent on as one (`adapter` serves it natively);
    translated for a chat upstream, its attempt is a `chat`."""
    if (
        log.api == "completions"
        and log.operation == "chat"
        and (adapter is None or "completions" in adapter.native_protocols)
    ):
        return "text_completion"
    return log.operation


def _provider(step: AttemptRecord) -> str:
    return provider_name(step.deployment.adapter.config)


def _flags(trace: TraceContext) -> TraceFlags:
    return _SAMPLED if trace.sampled else TraceFlags(TraceFlags.DEFAULT)


def _server_status(log: RequestLog) -> Status:
    """An error on the gateway's side or upstream (5xx); a refused request (4xx) is the
    caller's business, as HTTP server spans have it."""
    if log.status < 500:
        return Status(StatusCode.UNSET)
    text = log.failure.message if log.failure is not None else log.outcome
    return Status(StatusCode.ERROR, text[:_MAX_STATUS_TEXT])
