"""One trace per run (OpenTelemetry): a root span when the run is created, whose W3C
`traceparent` is kept on the run's record (`Run.traceparent`), and under it a span per
stage attempt, per command and per cache restore/save.

Every attempt reads its parent from the record, not from the request that started it, so
a retry (a timer's invocation), a hand-off its guard invoked again or a result a new
process recovered from the spool all land in the run's one trace. Invocations through
`faasci.invoke.Gateway` carry the current `traceparent` header (sync, and async through
the gateway's queue and NATS); the template's server continues it (`request`).

A tracer provider is always set (so JSON log lines carry trace and span ids:
faasci.jsonlog); spans leave the process only when OTEL_EXPORTER_OTLP_ENDPOINT is set
(OTLP over HTTP, batched in a background thread). FAASCI_TRACING=off turns all of it off:
no provider, `span` is a shared no-op, no header is sent, no traceparent recorded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

SCOPE = "faasci"
_propagator = TraceContextTextMapPropagator()
_setup_lock = threading.Lock()
_tracer: trace.Tracer | None = None
_provider = None  # the SDK's TracerProvider, once set up here
_service = "faasci"  # its service.name
_OFF = ("off", "0", "false", "no")
_masks = None  # faasci.masking.SecretsFilter, for command texts


def enabled() -> bool:
    """FAASCI_TRACING unset or anything but off/0/false/no."""
    return os.environ.get("FAASCI_TRACING", "on").strip().lower() not in _OFF


def service_name() -> str:
    """This process's service.name: the function's own name (FAASCI_FUNCTION, which the
    platform sets per function), else OTEL_SERVICE_NAME, else faasci."""
    return os.environ.get("FAASCI_FUNCTION") or os.environ.get("OTEL_SERVICE_NAME") or "faasci"


def setup(service: str | None = None) -> None:
    """Set this process's tracer provider once (the template's server calls it at start;
    anything else on first use). Idempotent; nothing when tracing is off."""
    global _tracer, _provider, _service
    if _tracer is not None or not enabled():
        return
    with _setup_lock:
        if _tracer is not None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider

        _service = service or service_name()
        provider = TracerProvider(resource=Resource.create({"service.name": _service}))
        if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        ):
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            # A short delay by default: a stage's spans are in the viewer about a second
            # after it ends, not five (the SDK's default); still one request per batch.
            delay = float(os.environ.get("OTEL_BSP_SCHEDULE_DELAY", "1000"))
            batch = BatchSpanProcessor(OTLPSpanExporter(), schedule_delay_millis=delay)
            provider.add_span_processor(batch)
        # The global provider too: a library instrumented with OpenTelemetry joins in.
        with contextlib.suppress(Exception):
            trace.set_tracer_provider(provider)
        _provider, _tracer = provider, provider.get_tracer(SCOPE)


def flush(timeout_s: float = 5) -> None:
    """Export what is batched (a process about to exit)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


def tracer() -> trace.Tracer | None:
    if _tracer is None:
        setup()
    return _tracer


def _attributes(values: Mapping[str, object]) -> dict:
    """OpenTelemetry attributes: None dropped, names without a dot under `faasci.`."""
    return {(k if "." in k else f"faasci.{k}"): v for k, v in values.items() if v is not None}


@contextlib.contextmanager
def span(name: str, *, context: otel_context.Context | None = None,
         **attributes) -> Iterator[trace.Span]:  # fmt: skip
    """A span around the block, a child of `context` (else of the current span); an
    exception leaving the block is recorded on it. A no-op span when tracing is off."""
    t = tracer()
    if t is None:
        yield trace.INVALID_SPAN
        return
    with t.start_as_current_span(name, context=context,
                                 attributes=_attributes(attributes)) as current:  # fmt: skip
        yield current


def annotate(target: trace.Span | None = None, **attributes) -> None:
    """Add attributes to `target` (the current span by default)."""
    target = target or trace.get_current_span()
    if target.is_recording():
        target.set_attributes(_attributes(attributes))


def traced(name: str) -> Callable:
    """A decorator: the function's calls each in a span `name`."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            with span(name):
                return fn(*args, **kwargs)

        return call

    return wrap


def in_context(fn: Callable) -> Callable:
    """`fn` to run in another thread within this one's context (its current span, and
    faasci.jsonlog's bound fields): a thread starts in an empty context otherwise."""
    return functools.partial(contextvars.copy_context().run, fn)


# The W3C traceparent: on the run record, and as a request header.


def current_traceparent() -> str | None:
    """The current span's traceparent (`00-<trace id>-<span id>-<flags>`), None if none."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent")


def inject(headers: dict | None = None) -> dict:
    """`headers` (a new dict when None) with the current span's traceparent (and
    tracestate) added; unchanged when there is no current span, tracing is off or
    `headers` has a traceparent already."""
    headers = {} if headers is None else headers
    if _tracer is None or any(k.lower() == "traceparent" for k in headers):
        return headers  # off, or the caller names its own
    if trace.get_current_span().get_span_context().is_valid:
        _propagator.inject(headers)
    return headers


def extract(headers: Mapping[str, str]) -> otel_context.Context:
    """The context a request's traceparent header names (an empty one without it).
    Header names are matched case-insensitively."""
    return _propagator.extract(_trace_headers(headers), context=otel_context.Context())


def _trace_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """traceparent and tracestate, by their lower-case names, of a dict or of a request's
    headers (werkzeug's, which iterate as pairs)."""
    return {name: value for k, value in headers.items()
            if (name := k.lower()) in ("traceparent", "tracestate")}  # fmt: skip


def context_of(traceparent: str | None) -> otel_context.Context:
    """The context of a stored traceparent (an empty one when None or malformed)."""
    return extract({"traceparent": traceparent} if traceparent else {})


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id (32 hex digits) of a traceparent, None when it names none."""
    found = trace.get_current_span(context_of(traceparent)).get_span_context()
    return format(found.trace_id, "032x") if found.is_valid else None


def stage_context(run) -> otel_context.Context:
    """The context a stage attempt's span is a child of: the run's root span (from its
    record), else the current one (a run recorded before it had a traceparent)."""
    if run.traceparent:
        return context_of(run.traceparent)
    return otel_context.get_current()


# The run's root span.


def begin_run(run) -> str | None:
    """Make the run's root span (a new trace, linked to whatever request created it: a
    run started by another run's stage is a trace of its own) and return its traceparent,
    to be stored as `run.traceparent`. The span ends at once: no process lives as long as
    the run; the stage attempts' spans are its children."""
    t = tracer()
    if t is None:
        return None
    caller = trace.get_current_span().get_span_context()
    links = [trace.Link(caller)] if caller.is_valid else None
    root = t.start_span(f"run {run.service}", context=otel_context.Context(), links=links,
                        attributes=_attributes({"run_id": run.id, "service": run.service,
                                                "ref": run.ref, "commit": run.commit,
                                                "trigger": run.trigger}))  # fmt: skip
    root.end()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(root))
    return carrier.get("traceparent")


# A stage attempt's span: begun in faasci.stage.execute once the attempt is claimed, ended
# when execute returns (`attempt_scope`), so the hand-off to what follows is inside it.

_scope: contextvars.ContextVar[contextlib.ExitStack | None] = contextvars.ContextVar(
    "faasci_attempt_scope", default=None
)


def attempt_scope(fn: Callable) -> Callable:
    """Decorates faasci.stage.execute: ends the span (and the JSON log fields) that
    `begin_attempt` began inside the call, recording an exception that escapes."""

    @functools.wraps(fn)
    def call(*args, **kwargs):
        stack = contextlib.ExitStack()
        token = _scope.set(stack)
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:
            stack.__exit__(type(e), e, e.__traceback__)
            raise
        else:
            if isinstance(result, dict):
                annotate(status=result.get("status"), reason=result.get("reason"),
                         next=result.get("next"))  # fmt: skip
            stack.close()
            return result
        finally:
            _scope.reset(token)

    return call


def begin_attempt(run, stage: str, number: int) -> None:
    """Inside `attempt_scope`: a span for attempt `number` of `stage`, a child of the
    run's root span, current until the call ends; and the JSON log fields of the attempt
    (run_id, stage, attempt, service: the pipeline's) bound as long."""
    from . import jsonlog

    stack = _scope.get()
    if stack is None:  # not under attempt_scope: nothing would end what is begun here
        return
    stack.enter_context(jsonlog.bind(run_id=run.id, stage=stage, attempt=number,
                                     service=run.service))  # fmt: skip
    stack.enter_context(span(f"{stage} attempt {number}", context=stage_context(run),
                             run_id=run.id, service=run.service, stage=stage,
                             attempt=number))  # fmt: skip


# The template's server: a request carrying a traceparent continues its trace.


@contextlib.contextmanager
def request(headers: Mapping[str, str], method: str, path: str) -> Iterator[None]:
    """Around a function's handling of one request: a server span, a child of the caller's
    when the request has a traceparent. A request without one (a person's, a health probe,
    a timer's tick) makes no span: no trace is started for it."""
    found = _trace_headers(headers) if _tracer is not None else {}
    if "traceparent" not in found:
        yield
        return
    parent = _propagator.extract(found, context=otel_context.Context())
    if not trace.get_current_span(parent).get_span_context().is_valid:
        yield
        return
    with _tracer.start_as_current_span(f"{method} {_service}", context=parent,
                                       kind=trace.SpanKind.SERVER,
                                       attributes={"http.request.method": method,
                                                   "url.path": path}):  # fmt: skip
        yield


@contextlib.contextmanager
def within(run) -> Iterator[None]:
    """The run's root span current within the block (what it invokes carries its
    traceparent)."""
    if _tracer is None or not run.traceparent:
        yield
        return
    token = otel_context.attach(context_of(run.traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


def command_span(command: str):
    """A span around one of a stage's commands, named by its text (its first 200
    characters, with the secrets in use masked, as in the stage's log)."""
    if _tracer is None:
        return span("command")
    global _masks
    from .masking import SecretsFilter

    try:  # the log filter's masker: rebuilt when the secrets in use change, cached else
        _masks = _masks or SecretsFilter()
        text = _masks._current().text(command[:200])
    except Exception:  # never a secret in a span: leave the text out instead
        text = None
    return span("command", command=text)
