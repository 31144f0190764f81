"""What a replica serves at its limit for the mix it is given: separate costs for prompt
(prefill) and generated (decode) tokens, fitted online from the limits the service has shown.

    observe_mix(model, now, mix) -> Model            every tick: the mix now (smoothed)
    observe_limit(model, mix) -> Model               at a breach: what one replica carried
    rescale(model, capacity, old, new) -> capacity   tokens/s learned at mix `old`, at mix `new`

A replica's time goes to prefill, at a cost per prompt token, and to decode, at a cost per
generated token that grows with the context each decode step reads (vLLM streams every running
sequence's KV cache each step). Per second of one replica, at its limit:

    1 = c_p a + c_d b + c_x b ctx        a, b: prompt and generated tokens/s per replica
                                         ctx = (a + b / 2) / X: a request's mean context while it
                                         decodes (X: requests/s), i.e. prompt + half its output

so the tokens/s it serves at its limit, (a + b) / (c_p a + c_d b + c_x b ctx), depends on the
mix: on the simulator's H100 preset 16k tokens/s for 1,000-token prompts and 300-token outputs,
12.7k for 800 / 800. A limit learned in plain tokens/s is right at the mix it was learned at.

The costs start at PRIOR_COSTS, of which only the ratios matter. Each limit reading
(signal_rules.learn_capacity) is one equation; a least-squares fit over them, forgotten over
READINGS_REMEMBERED, moves the three costs apart only as far as the readings' mixes differ
(ridge toward the prior's shape, MIX_TRUST); with one mix the fit is the prior's shape at the
readings' scale. The learned limit stays in tokens/s at the mix now (Memory.capacity, as
before) and is carried to each new mix by the model's ratio: a mix that does not move changes
nothing.

Pure; a few numbers, kept in Memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

# Seconds per prompt token, per generated token, per generated token per context token, from
# the simulator's H100 preset for Llama-3.1-8B (sim/capacity.py: 20k prompt tokens/s of
# prefill; 6.5 ms a step over 256 sequences + 20 us each; 52 ns of KV read per context token).
# Only the ratios are used: the scale is what the readings say.
PRIOR_COSTS = (50e-6, 45e-6, 52e-9)
# Ridge weight of the prior's shape, in squared shares of a replica's time: mixes whose parts
# differ by about 3 % of that time (0.03^2) count as much as the prior.
MIX_TRUST = 1e-3
READINGS_REMEMBERED = 200.0  # a breach gives one reading per tick
MIX_SECONDS = 600.0  # the mix is smoothed this long: a minute's odd requests do not move the limit


class Mix(NamedTuple):
    prompt_share: float  # prompt tokens / all tokens
    context: float  # mean context of a decoding request, tokens

    def features(self) -> tuple[float, float, float]:
        """Time per token served, per unit of each cost."""
        generated = 1.0 - self.prompt_share
        return self.prompt_share, generated, generated * self.context


def read_mix(prompt: float | None, tokens: float | None, requests: float | None) -> Mix | None:
    """The mix in one reading of the token and request rates (any scale), when they make sense."""
    if prompt is None or tokens is None or requests is None:
        return None
    if not (0.0 < tokens < math.inf and 0.0 <= prompt <= tokens and 0.0 < requests < math.inf):
        return None
    generated = tokens - prompt
    return Mix(prompt / tokens, (prompt + generated / 2.0) / requests)


@dataclass(frozen=True, slots=True)
class Model:
    """The smoothed mix now, and the limit readings' least-squares statistics."""

    mix: Mix | None = None
    updated_at: float | None = None
    weight: float = 0.0  # readings, discounted
    # Weighted means of g g^T (upper triangle: 00 01 02 11 12 22) and of g, where g is a
    # reading's time per token per unit cost (Mix.features x PRIOR_COSTS) times its tokens/s.
    gram: tuple[float, ...] = (0.0,) * 6
    moment: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def costs(self) -> tuple[float, float, float]:
        """(c_p, c_d, c_x) up to one common factor: the prior until the readings' mixes differ."""
        if self.weight <= 0:
            return PRIOR_COSTS
        g = _full(self.gram)
        h = self.moment
        # The prior's shape at the readings' scale: theta = s (1, 1, 1), s the least-squares fit.
        total = sum(sum(row) for row in g)
        if not total > 0:
            return PRIOR_COSTS
        s = sum(h) / total
        theta = _solve([[g[i][j] + (MIX_TRUST if i == j else 0.0) for j in range(3)] for i in range(3)],
                       [h[i] + MIX_TRUST * s for i in range(3)])
        if theta is None or not all(t > 0 for t in theta):
            return PRIOR_COSTS
        return tuple(c * t for c, t in zip(PRIOR_COSTS, theta, strict=True))  # type: ignore[return-value]

    def to_json(self) -> dict:
        return {"mix": None if self.mix is None else list(self.mix), "updatedAt": self.updated_at,
                "weight": self.weight, "gram": list(self.gram), "moment": list(self.moment)}

    @classmethod
    def from_json(cls, data: object) -> Model:
        """The inverse of to_json; anything unreadable is nothing learned (the prior)."""
        if not isinstance(data, dict):
            return cls()
        try:
            mix = None if data.get("mix") is None else Mix(*(float(x) for x in data["mix"]))
            updated = None if data.get("updatedAt") is None else float(data["updatedAt"])
            weight = float(data.get("weight", 0.0))
            gram = tuple(float(x) for x in data.get("gram", (0.0,) * 6))
            moment = tuple(float(x) for x in data.get("moment", (0.0,) * 3))
        except (TypeError, ValueError):
            return cls()
        numbers = (weight, *gram, *moment, *(mix or ()))
        if len(gram) != 6 or len(moment) != 3 or not all(math.isfinite(x) for x in numbers) or weight < 0:
            return cls()
        return cls(mix, updated, weight, gram, moment)  # type: ignore[arg-type]


def observe_mix(m: Model, now: float, mix: Mix | None) -> Model:
    """The model with the mix read now (smoothed over MIX_SECONDS)."""
    if mix is None or (m.updated_at is not None and now <= m.updated_at):
        return m
    if m.mix is None or m.updated_at is None:
        smoothed = mix
    else:
        keep = math.exp(-(now - m.updated_at) / MIX_SECONDS)
        smoothed = Mix(*(old * keep + new * (1.0 - keep) for old, new in zip(m.mix, mix, strict=True)))
    return Model(smoothed, now, m.weight, m.gram, m.moment)


def observe_limit(m: Model, mix: Mix | None, tokens_per_replica: float) -> Model:
    """The model with one limit reading: `tokens_per_replica` carried at `mix`."""
    if mix is None or not 0.0 < tokens_per_replica < math.inf:
        return m
    g = tuple(f * c * tokens_per_replica for f, c in zip(mix.features(), PRIOR_COSTS, strict=True))
    weight = m.weight * (1.0 - 1.0 / READINGS_REMEMBERED) + 1.0
    step = 1.0 / weight
    pairs = [(i, j) for i in range(3) for j in range(i, 3)]
    gram = tuple(old + step * (g[i] * g[j] - old) for old, (i, j) in zip(m.gram, pairs, strict=True))
    moment = tuple(old + step * (x - old) for old, x in zip(m.moment, g, strict=True))
    return Model(m.mix, m.updated_at, weight, gram, moment)  # type: ignore[arg-type]


def limit_ratio(m: Model, old: Mix, new: Mix) -> float:
    """Tokens/s at the limit at mix `new` over the same at mix `old`."""
    costs = m.costs()
    per_token = [sum(f * c for f, c in zip(mix.features(), costs, strict=True)) for mix in (old, new)]
    return per_token[0] / per_token[1] if per_token[1] > 0 and per_token[0] > 0 else 1.0


def rescale(m: Model, capacity: float | None, old: Mix | None, new: Mix | None) -> float | None:
    """A limit in tokens/s learned at mix `old`, at mix `new`."""
    if capacity is None or old is None or new is None or old == new:
        return capacity
    return capacity * limit_ratio(m, old, new)


def _full(upper: tuple[float, ...]) -> list[list[float]]:
    a, b, c, d, e, f = upper
    return [[a, b, c], [b, d, e], [c, e, f]]


def _solve(a: list[list[float]], y: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting for a 3 x 3 system; None if singular."""
    rows = [row[:] + [v] for row, v in zip(a, y, strict=True)]
    n = len(rows)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(rows[r][col]))
        if abs(rows[pivot][col]) < 1e-300:
            return None
        rows[col], rows[pivot] = rows[pivot], rows[col]
        for r in range(col + 1, n):
            factor = rows[r][col] / rows[col][col]
            rows[r] = [x - factor * p for x, p in zip(rows[r], rows[col], strict=True)]
    out = [0.0] * n
    for r in range(n - 1, -1, -1):
        out[r] = (rows[r][n] - sum(rows[r][c] * out[c] for c in range(r + 1, n))) / rows[r][r]
    return out
