"""The workload: a synthetic trace of invocations shaped like the Azure Functions trace, for
``python -m bench.replay``.

Shahrad et al. (USENIX ATC'20, "Serverless in the Wild") found in Azure Functions' production
trace that (1) popularity is extremely skewed: a few functions take most invocations and most
functions are invoked rarely (45% of applications once an hour or less); (2) arrivals are bursty:
the coefficient of variation (CV) of a function's inter-arrival times is often well above 1,
unlike a Poisson process (CV = 1). ServerlessLLM (OSDI'24 §7) replays that trace's arrival pattern
with LLM prompts. This module draws a trace with the same two properties, from a seed, so every
policy of a benchmark sees exactly the same requests.

The model (every parameter is a field of :class:`TraceModel`, defaults in brackets):

- **Popularity**: function ``i`` (0-based, 0 the most popular) takes a share proportional to
  ``1 / (i + 1) ** s``: Zipf with exponent ``s`` [1.0] over ``F >= 8`` functions. With F = 8
  the top function takes 37% of the calls and the last 4.6%; with F = 10,000 the top one 10%, and
  the last 5,000 together 7%.
- **Arrivals**: each function is an independent renewal process at rate
  ``rate_per_s * share_i``, with gamma-distributed inter-arrival times of coefficient of
  variation ``cv`` [3.0] (shape ``k = 1 / cv**2`` < 1, scale ``1 / (rate_i * k)``): long silences
  broken by bursts of calls close together. Each process starts in its stationary state (the
  first arrival is a forward recurrence time: ``U * Gamma(k + 1, scale)``), so there is no
  artificial burst at t = 0. The merged trace has mean rate ``rate_per_s``.
- **Prompt lengths** (words): lognormal with median ``prompt_median_words`` [32] and log-space
  sigma ``prompt_sigma`` [0.8], rounded and clipped to [1, ``prompt_max_words``] [512].
  Prompts are made of the words of a fixed English vocabulary; the simulation counts
  ``TOKENS_PER_WORD`` (1.3) tokens per word.
- **Output lengths** (``max_tokens``): lognormal with median ``output_median_tokens`` [64] and
  sigma ``output_sigma`` [1.0], rounded and clipped to [1, ``output_max_tokens``] [512]
  (ShareGPT-like: most answers short, a long tail).

Draws happen in a fixed order from one ``numpy.random.Generator(PCG64(seed))``: the arrival
times function by function, then the prompt and output lengths in time order; the prompt words
come from a second generator (``PCG64([seed, 1])``). Same arguments, same trace, on every
machine.

Use :func:`generate` for a replay (a list of :class:`Arrival` with prompt text) and
:func:`streams` for a large simulation (numpy arrays; 10,000 functions and 100,000 arrivals take
about 0.1 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOKENS_PER_WORD = 1.3
"""Tokens per prompt word, the usual figure for English with a BPE tokenizer."""

_WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "that", "for", "it", "on", "with", "as", "was",
    "at", "by", "be", "this", "from", "are", "or", "an", "which", "serverless", "function",
    "model", "instance", "token", "stream", "cold", "warm", "start", "load", "checkpoint",
    "memory", "invoker", "cluster", "request", "answer", "question", "capital", "france", "paris",
    "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "scale", "zero", "idle", "keep",
    "alive", "time", "first", "latency", "bandwidth", "disk", "cache", "tier", "place", "what",
    "how", "why", "when", "where", "who", "tell", "me", "story", "about", "write", "explain",
    "summarize", "translate", "list",
)
"""The vocabulary prompts are drawn from."""


@dataclass(frozen=True)
class TraceModel:
    """The trace's distribution parameters (see the module docstring)."""

    zipf_s: float = 1.0
    cv: float = 3.0
    prompt_median_words: float = 32.0
    prompt_sigma: float = 0.8
    prompt_max_words: int = 512
    output_median_tokens: float = 64.0
    output_sigma: float = 1.0
    output_max_tokens: int = 512

    def validate(self) -> None:
        """Raises ValueError naming the field and its allowed range."""
        if not self.zipf_s >= 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if not self.cv > 0:
            raise ValueError(f"cv must be > 0 (> 1 for bursty arrivals), got {self.cv}")
        for name in ("prompt_median_words", "output_median_tokens"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prompt_sigma", "output_sigma"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("prompt_max_words", "output_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Arrival:
    """One invocation of the trace.

    Attributes:
        t: seconds from the trace's start.
        function_index: which function (0 the most popular).
        prompt: the prompt text.
        max_tokens: the output length asked for.
    """

    t: float
    function_index: int
    prompt: str
    max_tokens: int


@dataclass(frozen=True)
class Streams:
    """A trace as arrays, in time order (the simulation's form).

    Attributes:
        t: float64 seconds from the start.
        function: int32 function index.
        prompt_words: int32 prompt length in words.
        max_tokens: int32 output length asked for.
    """

    t: np.ndarray
    function: np.ndarray
    prompt_words: np.ndarray
    max_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.t)


def popularity(functions: int, s: float = 1.0) -> np.ndarray:
    """Each function's share of the calls: Zipf with exponent ``s``, summing to 1."""
    w = 1.0 / np.arange(1, functions + 1, dtype=np.float64) ** s
    return w / w.sum()


def _check(functions: int, duration_s: float, rate_per_s: float) -> None:
    if functions < 8:
        raise ValueError(f"functions must be >= 8, got {functions}")
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if not rate_per_s > 0:
        raise ValueError(f"rate_per_s must be > 0, got {rate_per_s}")


def _arrival_times(rng: np.random.Generator, functions: int, duration_s: float,
                   rate_per_s: float, model: TraceModel) -> tuple[np.ndarray, np.ndarray]:
    """Merged per-function gamma renewal processes: (times, function indices), time-sorted."""
    k = 1.0 / model.cv ** 2
    rates = rate_per_s * popularity(functions, model.zipf_s)
    times: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for f, rate in enumerate(rates):
        scale = 1.0 / (rate * k)
        first = rng.uniform() * rng.gamma(k + 1.0, scale)
        expected = (duration_s - first) * rate
        parts = [np.array([first])]
        end = first
        while end < duration_s:  # draw in batches until the stream passes the end
            gaps = rng.gamma(k, scale, size=max(8, int(expected * 1.25) + 8))
            part = end + np.cumsum(gaps)
            parts.append(part)
            end = float(part[-1])
        ts = np.concatenate(parts)
        ts = ts[ts < duration_s]
        if len(ts):
            times.append(ts)
            owners.append(np.full(len(ts), f, dtype=np.int32))
    if not times:
        return np.empty(0), np.empty(0, dtype=np.int32)
    t = np.concatenate(times)
    fn = np.concatenate(owners)
    order = np.argsort(t, kind="stable")
    return t[order], fn[order]


def _lognormal_int(rng: np.random.Generator, n: int, median: float, sigma: float,
                   hi: int) -> np.ndarray:
    x = rng.lognormal(np.log(median), sigma, size=n)
    return np.clip(np.rint(x), 1, hi).astype(np.int32)


def streams(functions: int, duration_s: float, rate_per_s: float, seed: int,
            model: TraceModel | None = None) -> Streams:
    """The trace as arrays (no prompt text), for simulations at large scale.

    Args:
        functions: how many functions (F >= 8).
        duration_s: the trace's length (seconds).
        rate_per_s: mean invocations per second, all functions together.
        seed: the random seed.
        model: distribution parameters (default :class:`TraceModel`'s).

    Raises:
        ValueError: an argument out of range.
    """
    model = model or TraceModel()
    model.validate()
    _check(functions, duration_s, rate_per_s)
    rng = np.random.Generator(np.random.PCG64(seed))
    t, fn = _arrival_times(rng, functions, duration_s, rate_per_s, model)
    words = _lognormal_int(rng, len(t), model.prompt_median_words, model.prompt_sigma,
                           model.prompt_max_words)
    out = _lognormal_int(rng, len(t), model.output_median_tokens, model.output_sigma,
                         model.output_max_tokens)
    return Streams(t=t, function=fn, prompt_words=words, max_tokens=out)


def generate(functions: int, duration_s: float, rate_per_s: float, seed: int,
             model: TraceModel | None = None) -> list[Arrival]:
    """The trace as arrivals with prompt text, in time order (see :func:`streams` for the
    arguments). The prompts are random words; :func:`streams` with the same arguments gives the
    same times, functions and lengths."""
    s = streams(functions, duration_s, rate_per_s, seed, model)
    rng = np.random.Generator(np.random.PCG64([seed, 1]))
    vocab = np.array(_WORDS)
    return [
        Arrival(t=float(t), function_index=int(f),
                prompt=" ".join(vocab[rng.integers(0, len(vocab), size=int(w))]),
                max_tokens=int(m))
        for t, f, w, m in zip(s.t, s.function, s.prompt_words, s.max_tokens, strict=True)
    ]


def describe(s: Streams, functions: int, duration_s: float) -> dict[str, float]:
    """Summary figures of a trace: rate, share of the top function, functions invoked, CV of
    the top function's inter-arrival times, median prompt words and max_tokens."""
    counts = np.bincount(s.function, minlength=functions)
    top = s.t[s.function == 0]
    gaps = np.diff(top)
    return {
        "arrivals": float(len(s)),
        "rate_per_s": len(s) / duration_s,
        "top_share": float(counts[0] / max(1, len(s))),
        "functions_invoked": float((counts > 0).sum()),
        "top_cv": float(gaps.std() / gaps.mean()) if len(gaps) > 1 else float("nan"),
        "prompt_words_median": float(np.median(s.prompt_words)) if len(s) else float("nan"),
        "max_tokens_median": float(np.median(s.max_tokens)) if len(s) else float("nan"),
    }
