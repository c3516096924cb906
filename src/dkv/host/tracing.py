"""The spans of a write's way through Raft at its leader (:mod:`dkv.telemetry.tracing`).

A traced proposal (one whose caller's span is recording) gets a ``raft.propose`` span from
:meth:`Host.propose` until its answer, and three children the loop records as it moves:

- ``raft.log.append``: the group-commit write that made the entry durable on the leader
  (attributes: entries and bytes in the batch, whether it was fsynced, groups in it);
- ``raft.commit``: from that write to the iteration that saw the entry committed, i.e. the
  wait for a quorum of followers to persist it (Raft thesis §3.5);
- ``raft.apply``: applying it to the state machine and writing the batch that carries the
  applied index (thesis §3.5: "applies the entry to its state machine").

The loop stamps times (``time.time_ns``: OpenTelemetry wants the epoch) only for groups with a
traced proposal, so untraced traffic pays one empty-dict test per group and iteration. The
children are created after the fact with explicit start and end times: they describe moments
of the loop's iteration, which serves every proposal at once, not a task of the request.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer

__all__ = ["ProposalTrace", "RaftTracer"]


class ProposalTrace:
    """One traced proposal: its ``raft.propose`` span and when its entry was written."""

    __slots__ = ("appended_ns", "context", "span")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.context = trace.set_span_in_context(span)
        self.appended_ns = 0


class RaftTracer:
    """Makes the spans of the module docstring with the process's tracer."""

    def __init__(self, tracer: Tracer) -> None:
        self.tracer = tracer

    def start_proposal(self, group_id: int, term: int, index: int) -> ProposalTrace | None:
        """A trace for a proposal made in the current context, or None when the request is
        not being recorded (unsampled, or no span at all: a membership driver's write)."""
        if not trace.get_current_span().is_recording():
            return None
        span = self.tracer.start_span(
            "raft.propose",
            attributes={"dkv.shard": group_id, "raft.term": term, "raft.index": index},
        )
        return ProposalTrace(span)

    def end_proposal(self, t: ProposalTrace, error: BaseException | None) -> None:
        if error is not None:
            t.span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        t.span.end()

    def appended(self, t: ProposalTrace, start_ns: int, end_ns: int, batch: dict[str, Any]) -> None:
        """``t``'s entry was in the group-commit write from ``start_ns`` to ``end_ns``."""
        t.appended_ns = end_ns
        span = self.tracer.start_span(
            "raft.log.append", context=t.context, start_time=start_ns, attributes=batch
        )
        span.end(end_time=end_ns)

    def committed(self, t: ProposalTrace, committed_ns: int, applied_ns: int) -> None:
        """``t``'s entry was seen committed at ``committed_ns`` and applied (its batch
        written) at ``applied_ns``."""
        since = t.appended_ns or committed_ns
        span = self.tracer.start_span("raft.commit", context=t.context, start_time=since)
        span.end(end_time=max(since, committed_ns))
        span = self.tracer.start_span("raft.apply", context=t.context, start_time=committed_ns)
        span.end(end_time=applied_ns)
