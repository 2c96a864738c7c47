"""Traces (OpenTelemetry): a span for each ingest request, and one for each delivery attempt.

Off unless an OTLP endpoint is set (`settings.OTEL_TRACES`, as the OpenTelemetry conventions
say: `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, and not
`OTEL_SDK_DISABLED=true`). Off, nothing of OpenTelemetry is imported and ingestion pays one
function call per request: the SDK's modules are imported here, inside the functions that run
only when traces are on (not to dodge an import cycle: importing them costs every process
tens of milliseconds and memory that a service without a collector would pay for nothing).

On, each process builds its own TracerProvider the first time a span is wanted: after gunicorn
and RQ have forked, so the exporter's background thread belongs to the process that fills it.
The provider is ours, not OpenTelemetry's global one, so that nothing else in the process
exports through it and the tests can put an in-memory exporter in its place (`use_exporter`).
The exporter and sampler read the rest of the `OTEL_*` variables themselves (headers, timeout,
`OTEL_TRACES_SAMPLER`); `OTEL_SERVICE_NAME` names the service, `postback-delivery` if unset.

A trace's context travels with the postback as a W3C traceparent string: from the ingest span
into the inbox entry (its `tp` field), from the entry into each Try, and from a Try into its
attempts' spans, each a child of the ingest span and linked to it, so that a backend shows
them either way. With `send_traceparent` on, the receiver gets the attempt span's traceparent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from django.http import HttpRequest

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

SERVICE_NAME = "postback-delivery"
SCOPE = "postbackproject"


@dataclass
class _State:
    configured: bool = False
    provider: TracerProvider | None = None
    tracer: Tracer | None = None


_state = _State()


def tracer() -> Tracer | None:
    """This process's tracer; None while traces are off."""
    if not _state.configured:
        _configure()
    return _state.tracer


def _configure() -> None:
    _state.configured = True
    if not settings.OTEL_TRACES:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    _install(BatchSpanProcessor(OTLPSpanExporter()))


def _install(processor: SpanProcessor) -> None:
    """A provider of our own, sending every span through `processor`, named after the service
    (OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, else ours rather than `unknown_service`)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    _state.provider = provider
    _state.tracer = provider.get_tracer(SCOPE)


def use_exporter(exporter: SpanExporter) -> None:
    """Export every span of this process to `exporter` at once, whatever the settings say (the
    tests give the SDK's InMemorySpanExporter)."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    reset()
    _state.configured = True
    _install(SimpleSpanProcessor(exporter))


def reset() -> None:
    """Forget this process's provider (flushing it); the next span reads the settings again."""
    if _state.provider is not None:
        _state.provider.shutdown()
    _state.configured, _state.provider, _state.tracer = False, None, None


def provider() -> TracerProvider | None:
    """This process's provider; None while traces are off or not yet wanted."""
    return _state.provider


# --- the ingest request ------------------------------------------------------------------


def start_ingest(request: HttpRequest) -> Span | None:
    """A SERVER span for an ingest request, continuing the sender's trace when it sends a
    traceparent; None while traces are off."""
    found = tracer()
    if found is None:
        return None
    from opentelemetry.trace import SpanKind

    path = request.path
    sent = request.META.get("HTTP_TRACEPARENT")
    return found.start_span(
        f"{request.method} {path}",
        context=_context_of(sent) if sent else None,
        kind=SpanKind.SERVER,
        attributes={"http.request.method": request.method or "", "http.route": path, "url.path": path},
    )


def end_ingest(
    span: Span, status: int, request_id: str, postbacks: int, sender: str, exc: Exception | None = None
) -> None:
    """The answer on the ingest span, which ends. An answer of 500 or above is an error (a
    refusal of the sender's request is not: that is the server doing its job), with the
    exception that caused it if there was one."""
    from opentelemetry.trace import StatusCode

    if exc is not None:
        span.record_exception(exc)

    span.set_attribute("http.response.status_code", status)
    span.set_attribute("postback.count", postbacks)
    if request_id:
        span.set_attribute("postback.request_id", request_id)
    if sender:
        span.set_attribute("postback.sender", sender)
    if status >= 500:
        span.set_status(StatusCode.ERROR)
    span.end()


# --- delivery attempts -------------------------------------------------------------------


def start_attempt(traceparent: str, method: str, host: str, attempt: int, postback_id: str) -> Span | None:
    """A CLIENT span for one try of a postback, from now: a child of the ingest request's span
    (`traceparent`) and linked to it. None while traces are off."""
    found = tracer()
    if found is None:
        return None
    return _attempt_span(found, traceparent, method, host, attempt, postback_id, time.time_ns())


def _attempt_span(
    found: Tracer, traceparent: str, method: str, host: str, attempt: int, postback_id: str, start_ns: int
) -> Span:
    from opentelemetry.trace import Link, SpanKind, get_current_span

    parent = _context_of(traceparent) if traceparent else None
    links = []
    if parent is not None:
        context = get_current_span(parent).get_span_context()
        if context.is_valid:
            links.append(Link(context))
    name, port = _split_host(host)
    attributes: dict[str, str | int] = {
        "http.request.method": method,
        "server.address": name,
        "postback.id": postback_id,
        "postback.attempt": attempt,
    }
    if port:
        attributes["server.port"] = port
    return found.start_span(
        f"deliver {method}",
        context=parent,
        kind=SpanKind.CLIENT,
        attributes=attributes,
        links=links,
        start_time=start_ns,
    )


def end_attempt(
    span: Span | None,
    item: AttemptFacts,
    outcome: str,
    status: int | None,
    elapsed_ms: float | None,
    error: str,
) -> None:
    """The attempt's result on its span, which ends `elapsed_ms` after it started (the time the
    transport measured). A try that had no span (not sent: deferred by its host's circuit, or
    refused) gets one here, from now. An attempt that will be retried or has failed is an error."""
    if span is None:
        found = tracer()
        if found is None:
            return
        span = _attempt_span(found, *item, time.time_ns())
    from opentelemetry.trace import StatusCode

    span.set_attribute("postback.outcome", outcome)
    if status is not None:
        span.set_attribute("http.response.status_code", status)
    end_ns = None
    if elapsed_ms is not None:
        span.set_attribute("postback.latency_ms", elapsed_ms)
        start_ns = getattr(span, "start_time", None)
        end_ns = start_ns + round(elapsed_ms * 1_000_000) if isinstance(start_ns, int) else None
    if outcome in ("retry", "failed"):
        span.set_attribute("error.type", str(status) if status is not None else "no response")
        span.set_status(StatusCode.ERROR, error or f"HTTP {status}")
    span.end(end_time=end_ns)


def _split_host(host: str) -> tuple[str, int]:
    """`host[:port]` as delivery counts hosts (`[v6]:port` for IPv6): the name, and the port
    (0 when the URL gave none)."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        name, port = name + "]", rest.removeprefix(":")
    else:
        name, _, port = host.partition(":")
    return name, int(port) if port.isdigit() else 0


# What an attempt span is started from: (traceparent, method, host, try number, postback id).
AttemptFacts = tuple[str, str, str, int, str]


# --- W3C trace context -------------------------------------------------------------------


def traceparent(span: Span | None) -> str:
    """The W3C traceparent naming `span`; empty for no span."""
    if span is None:
        return ""
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _context_of(traceparent: str) -> Context:
    """The OpenTelemetry context a traceparent names (an invalid one names none)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})
