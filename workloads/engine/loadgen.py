"""Load generation: length distributions and one seeded request stream, sent open-loop or closed-loop.

The stream is global and deterministic. Request ``j`` draws its lengths and prompt from its own seeded
generator, so every replica derives the same stream and takes its share: in open loop request ``j`` goes
to replica ``j % replicas``; in closed loop client ``c`` sends ids c, c + N, c + 2N, ... (N clients) and
runs on replica ``c % replicas``. Times are seconds since the load started; the engine loop asks what is
due between its steps, so arrival times never depend on how fast the engine runs.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

_FORMS = "expected fixed:N, uniform:A,B or normal:MEAN,STD"
#: How many numbers each length distribution takes.
ARITY = {"fixed": 1, "uniform": 2, "normal": 2}


@dataclass(frozen=True)
class LengthDist:
    """Token counts: ``fixed:n``; ``uniform:a,b`` (integers a..b inclusive); ``normal:m,s`` (rounded,
    clipped to [max(1, m - 3s), m + 3s]). ``low`` and ``high`` bound every sample."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthDist:
        """Parse ``kind:args``; ValueError with a one-line reason otherwise."""
        kind, _, rest = str(text).strip().partition(":")
        try:
            args = [float(x) for x in rest.split(",")] if rest.strip() else []
        except ValueError:
            raise ValueError(f"length distribution {text!r}: arguments are not numbers; {_FORMS}") from None
        want = ARITY.get(kind)
        if want is None or len(args) != want or not all(math.isfinite(x) for x in args):
            raise ValueError(f"length distribution {text!r}: {_FORMS}")
        if kind in ("fixed", "uniform") and not all(x.is_integer() for x in args):
            raise ValueError(f"length distribution {text!r}: {kind} takes whole token counts")
        dist = cls(kind, *args)
        if kind == "fixed" and dist.a < 1:
            raise ValueError(f"length distribution {text!r}: a length must be >= 1")
        if kind == "uniform" and not 1 <= dist.a <= dist.b:
            raise ValueError(f"length distribution {text!r}: uniform:A,B needs 1 <= A <= B")
        if kind == "normal" and (dist.a < 1 or dist.b < 0):
            raise ValueError(f"length distribution {text!r}: normal:MEAN,STD needs MEAN >= 1 and STD >= 0")
        return dist

    @property
    def low(self) -> int:
        if self.kind == "normal":
            return max(1, round(self.a - 3 * self.b))
        return int(self.a)

    @property
    def high(self) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(self.b)
        return max(self.low, round(self.a + 3 * self.b))

    @property
    def mean(self) -> float:
        """The mean before clipping (exact for fixed and uniform)."""
        return self.a if self.kind != "uniform" else (self.a + self.b) / 2

    def sample(self, rng: np.random.Generator) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return int(rng.integers(int(self.a), int(self.b) + 1))
        return int(min(max(round(rng.normal(self.a, self.b)), self.low), self.high))

    def __str__(self) -> str:
        args = f"{self.a:g}" if self.kind == "fixed" else f"{self.a:g},{self.b:g}"
        return f"{self.kind}:{args}"


@dataclass(frozen=True)
class RequestSpec:
    """One request as the client sends it: id, lengths, arrival time, and its client (closed loop)."""

    rid: int
    prompt_len: int
    output_len: int
    arrival: float
    client: int | None = None


def request_lengths(seed: int, rid: int, prompt: LengthDist, output: LengthDist) -> tuple[int, int]:
    """The prompt and output lengths of request ``rid`` (its own generator: independent of partitioning)."""
    rng = np.random.default_rng([seed, 0, rid])
    return prompt.sample(rng), output.sample(rng)


def prompt_tokens(seed: int, rid: int, length: int, vocab: int) -> np.ndarray:
    """The prompt token ids of request ``rid`` (uniform over the vocabulary, seeded)."""
    return np.random.default_rng([seed, 1, rid]).integers(0, vocab, length, dtype=np.int64)


def arrival_times(rate: float, burstiness: float, seed: int) -> Iterator[float]:
    """0, then gaps drawn from a gamma distribution of shape ``burstiness`` and mean 1/rate (shape 1:
    Poisson arrivals; below 1 burstier, above 1 more regular). An infinite rate sends everything at 0."""
    if not rate > 0:
        raise ValueError(f"request rate must be > 0, got {rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    rng = np.random.default_rng([seed, 2])
    t = 0.0
    while True:
        yield t
        if math.isfinite(rate):
            t += float(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


class OpenLoop:
    """Requests arrive at scheduled times whatever the engine does (``--request-rate``)."""

    def __init__(self, rate: float, burstiness: float, prompt: LengthDist, output: LengthDist, seed: int,
                 num_requests: int = 0, duration: float = 0.0, replica: int = 0, replicas: int = 1) -> None:
        self.prompt, self.output, self.seed = prompt, output, seed
        self.num_requests, self.duration = num_requests, duration
        self.replica, self.replicas = replica, replicas
        self._times = arrival_times(rate, burstiness, seed)
        self._next_id = 0
        self._upcoming: RequestSpec | None = None
        self._advance()

    def _advance(self) -> None:
        while True:
            rid = self._next_id
            if self.num_requests and rid >= self.num_requests:
                self._upcoming = None
                return
            t = next(self._times)
            self._next_id += 1
            if self.duration and t >= self.duration:
                self._upcoming = None
                return
            if rid % self.replicas == self.replica:
                p, o = request_lengths(self.seed, rid, self.prompt, self.output)
                self._upcoming = RequestSpec(rid, p, o, t)
                return

    def due(self, now: float) -> list[RequestSpec]:
        """Requests whose arrival time is at or before ``now``, in arrival order."""
        out = []
        while self._upcoming is not None and self._upcoming.arrival <= now:
            out.append(self._upcoming)
            self._advance()
        return out

    def next_arrival(self) -> float | None:
        return self._upcoming.arrival if self._upcoming is not None else None

    def issuing_over(self, now: float) -> bool:
        """Whether no request will arrive after ``now``."""
        return self._upcoming is None

    def on_finish(self, spec: RequestSpec, now: float) -> None:
        """Open loop ignores completions."""


class ClosedLoop:
    """``concurrency`` clients; each sends its next request the moment its previous one finishes."""

    def __init__(self, concurrency: int, prompt: LengthDist, output: LengthDist, seed: int,
                 num_requests: int = 0, duration: float = 0.0, replica: int = 0, replicas: int = 1) -> None:
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency, self.prompt, self.output, self.seed = concurrency, prompt, output, seed
        self.num_requests, self.duration = num_requests, duration
        self.clients = [c for c in range(concurrency) if c % replicas == replica]
        self._pending: list[tuple[float, int, RequestSpec]] = []
        self._next_rid: dict[int, int] = {}
        self._stopped: set[int] = set()
        for c in self.clients:
            self._issue(c, c, 0.0)

    def _issue(self, client: int, rid: int, t: float) -> None:
        if (self.num_requests and rid >= self.num_requests) or (self.duration and t >= self.duration):
            self._stopped.add(client)
            return
        p, o = request_lengths(self.seed, rid, self.prompt, self.output)
        heapq.heappush(self._pending, (t, rid, RequestSpec(rid, p, o, t, client)))
        self._next_rid[client] = rid + self.concurrency

    def due(self, now: float) -> list[RequestSpec]:
        out = []
        while self._pending and self._pending[0][0] <= now:
            out.append(heapq.heappop(self._pending)[2])
        return out

    def next_arrival(self) -> float | None:
        return self._pending[0][0] if self._pending else None

    def issuing_over(self, now: float) -> bool:
        if self._pending:
            return False
        return len(self._stopped) == len(self.clients) or bool(self.duration and now >= self.duration)

    def on_finish(self, spec: RequestSpec, now: float) -> None:
        """The client of a finished request sends its next one, arriving ``now``."""
        if spec.client is not None and spec.client not in self._stopped:
            self._issue(spec.client, self._next_rid[spec.client], now)


LoadGenerator = OpenLoop | ClosedLoop


def from_load(load: dict[str, Any], replica: int = 0, replicas: int = 1) -> LoadGenerator:
    """The generator a plan's ``load`` block describes (workloads.serve's and --endpoint's), ``replica``'s share.
    ValueError on a bad shape (a length form, a concurrency below 1)."""
    prompt, output = LengthDist.parse(load["prompt_len"]), LengthDist.parse(load["output_len"])
    common = {"num_requests": load["num_requests"], "duration": load["duration_s"], "replica": replica,
              "replicas": replicas}
    if load["mode"] == "open":
        return OpenLoop(float(load["request_rate"]), load["burstiness"], prompt, output, load["seed"], **common)
    return ClosedLoop(load["concurrency"], prompt, output, load["seed"], **common)
