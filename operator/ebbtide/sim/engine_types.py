"""What an engine reports (its events and refusals), and the records it keeps per request and
per scheduler step (sim/engine_core.py)."""

from __future__ import annotations

from dataclasses import dataclass

WAITING, PREFILL, DECODE, DONE = range(4)


class EngineSleeping(RuntimeError):
    """A request reached an engine that is asleep."""


class EngineBusy(RuntimeError):
    """Sleep was asked for while requests are in flight."""


@dataclass(slots=True)
class FirstToken:
    request_id: str
    time: float
    ttft: float


@dataclass(slots=True)
class Tokens:
    """`count` more output tokens of a request, the last at `time` (only with emit_tokens=True;
    the first token is reported by FirstToken instead)."""

    request_id: str
    count: int
    time: float


@dataclass(slots=True)
class Finished:
    request_id: str
    reason: str  # "length" (max_tokens reached) or "abort"
    prompt_tokens: int
    output_tokens: int
    arrival: float
    scheduled_at: float | None  # first time the scheduler admitted it
    first_token_at: float | None
    finished_at: float

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def e2e(self) -> float:
        return self.finished_at - self.arrival

    @property
    def queue_time(self) -> float | None:
        return None if self.scheduled_at is None else self.scheduled_at - self.arrival

    @property
    def mean_itl(self) -> float | None:
        """Mean time between output tokens after the first (None below two tokens)."""
        if self.first_token_at is None or self.output_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.output_tokens - 1)


Event = FirstToken | Tokens | Finished


class EngineRequest:
    __slots__ = ("rid", "prompt", "max_out", "arrival", "generated", "scheduled_at", "first_token_at",
                 "prefill_left", "blocks", "base", "g_fin", "state")

    def __init__(self, rid: str, prompt: int, max_out: int, arrival: float) -> None:
        self.rid = rid
        self.prompt = prompt
        self.max_out = max_out
        self.arrival = arrival
        self.generated = 0  # materialized while not decoding; see base
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.prefill_left = 0
        self.blocks = 0  # blocks held while prefilling
        # While decoding, its length is base + G (G: the engine's step counter), so nothing
        # per-sequence changes from step to step.
        self.base = 0
        self.g_fin = 0  # G at which it has generated max_out tokens
        self.state = WAITING


class Step:
    __slots__ = ("end", "duration", "chunks")

    def __init__(self, end: float, duration: float, chunks: list[tuple[EngineRequest, int]]) -> None:
        self.end = end
        self.duration = duration
        self.chunks = chunks
