"""Output policy and usage metering, enforced inside the enclave.

The policy comes from the manifest's `policy` object, which the enclave authenticates through
its own section's associated data: a host that edits it makes decryption fail, so it can neither
switch `label` to `scores` nor raise the budget.

    {"output": "label" | "topk:K" | "scores", "query_budget": int | null, "rate_limit_per_s": float | null,
     "budget_counter": "session" | "sealed" | "tpm"}

- `label` (default): int64 argmax over the last axis of the private part's first output.
- `topk:K`: the K best class indices (int64, best first, ties to the lower index); no scores.
- `scores`: every raw output. This weakens protection sharply: with real-valued outputs a dense
  last layer with d inputs is solved exactly from about 2d queries (equation solving), and the
  whole private part is far easier to distil. Owners must opt in explicitly.

The query budget counts samples (batch rows). `budget_counter` says where that count lives:
`session` (this enclave process only; what a manifest without the field means), `sealed` (state
sealed by the enclave and stored by the host, so restarts and new processes continue the count)
or `tpm` (sealed state anchored in a TPM NV counter, so an old state file is refused); see
budget.py. The rate limit is a token bucket in samples per second with a burst of one second's
worth (at least one sample).
Unknown keys are refused rather than ignored: an owner who writes a rule this enclave cannot
enforce must find out at load time, not after the model has been queried without it.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TOPK = 65535
_TOPK = re.compile(r"topk:([1-9][0-9]{0,4})")
_KEYS = ("output", "query_budget", "rate_limit_per_s", "budget_counter")
BUDGET_COUNTERS = ("session", "sealed", "tpm")


class PolicyError(ValueError):
    """The policy object is malformed or names something this enclave cannot enforce."""


class PolicyRefusal(Exception):
    """A request refused by the policy (the enclave maps subclasses to error codes)."""


class BudgetExhausted(PolicyRefusal):
    pass


class RateLimited(PolicyRefusal):
    pass


@dataclass(frozen=True)
class OutputPolicy:
    output: str = "label"  # "label" | "topk" | "scores"
    k: int | None = None  # for "topk"
    query_budget: int | None = None
    rate_limit_per_s: float | None = None
    # None: not said (a manifest from before the field, or an owner who left it to `protect`,
    # which picks "sealed" for a budgeted split); the enclave treats it as "session".
    budget_counter: str | None = None

    @property
    def spec(self) -> str:
        """The manifest spelling of the output rule: "label", "topk:3" or "scores"."""
        return f"topk:{self.k}" if self.output == "topk" else self.output

    @property
    def persistent(self) -> bool:
        """True when the budget's count outlives the enclave process (sealed state, maybe a TPM)."""
        return self.query_budget is not None and self.budget_counter in ("sealed", "tpm")

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "output": self.spec,
            "query_budget": self.query_budget,
            "rate_limit_per_s": None if self.rate_limit_per_s is None else float(self.rate_limit_per_s),
        }
        if self.budget_counter is not None:  # absent means "session": older enclaves refuse unknown keys
            document["budget_counter"] = self.budget_counter
        return document

    def describe(self) -> str:
        parts = [self.spec]
        if self.query_budget is None:
            parts.append("no query budget")
        else:
            where = {"sealed": "kept across restarts (sealed state)", "tpm": "kept across restarts (TPM counter)"}
            parts.append(f"budget {self.query_budget} samples, " + where.get(self.budget_counter or "", "per session"))
        if self.rate_limit_per_s is not None:
            parts.append(f"at most {self.rate_limit_per_s:g} samples/s")
        return ", ".join(parts)


def parse_policy(document: Mapping[str, Any] | None) -> OutputPolicy:
    """Parse and validate a policy object; None or {} gives the default (label, unlimited)."""
    if document is None:
        return OutputPolicy()
    if not isinstance(document, Mapping):
        raise PolicyError("policy must be a JSON object")
    unknown = sorted(set(document) - set(_KEYS))
    if unknown:
        raise PolicyError(
            f"policy has unknown field(s) {', '.join(map(repr, unknown))}; "
            f"this enclave enforces only {', '.join(_KEYS)}"
        )
    output = document.get("output", "label")
    if output is None:
        output = "label"
    if not isinstance(output, str):
        raise PolicyError("policy output must be a string: 'label', 'topk:K' or 'scores'")
    k: int | None = None
    if output in ("label", "scores"):
        mode = output
    else:
        match = _TOPK.fullmatch(output)
        if match is None or int(match.group(1)) > MAX_TOPK:
            raise PolicyError(f"policy output {output!r} is not 'label', 'topk:K' (1 <= K <= {MAX_TOPK}) or 'scores'")
        mode, k = "topk", int(match.group(1))
    budget = document.get("query_budget")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or not 0 <= budget < 2**63):
        raise PolicyError("policy query_budget must be null or an integer >= 0 (samples)")
    rate = document.get("rate_limit_per_s")
    if rate is not None:
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not math.isfinite(rate) or rate <= 0:
            raise PolicyError("policy rate_limit_per_s must be null or a finite number > 0 (samples per second)")
        rate = float(rate)
    counter = document.get("budget_counter")
    if counter is not None and counter not in BUDGET_COUNTERS:
        raise PolicyError(f"policy budget_counter must be one of {', '.join(BUDGET_COUNTERS)}, got {counter!r}")
    return OutputPolicy(mode, k, budget, rate, counter)


# --------------------------------------------------------------------------------------------
# Applying the output rule


def result_shapes(
    policy: OutputPolicy, output_names: Sequence[str], shapes: Sequence[tuple[int | None, ...]]
) -> list[tuple[str, str | None, tuple[int | None, ...]]]:
    """(name, numpy dtype name or None = as the private output, shape) of what RESULT carries."""
    if policy.output == "scores":
        return [(name, None, tuple(shape)) for name, shape in zip(output_names, shapes)]
    first = tuple(shapes[0])
    if policy.output == "label":
        return [("label", "int64", first[:-1])]
    return [("topk", "int64", first[:-1] + (policy.k,))]


def check_applicable(policy: OutputPolicy, first_output_shape: Sequence[int | None] | None) -> None:
    """Refuse, at load time, a policy that cannot apply to the private part's first output."""
    if policy.output == "scores":
        return
    if first_output_shape is None or len(first_output_shape) == 0:
        raise PolicyError(f"output policy {policy.spec!r} needs a first output with a class axis (rank >= 1)")
    classes = first_output_shape[-1]
    if policy.output == "topk" and classes is not None and policy.k is not None and policy.k > classes:
        raise PolicyError(f"output policy {policy.spec!r} asks for more classes than the model has ({classes})")


def _descending_key(scores: np.ndarray) -> np.ndarray:
    # Sorting `key` ascending sorts `scores` descending. Bitwise NOT is exact and cannot overflow
    # for integers (unlike negation of INT_MIN or of unsigned values).
    if scores.dtype == np.bool_:
        return ~scores.astype(np.uint8)
    if np.issubdtype(scores.dtype, np.integer):
        return ~scores
    return -scores


def apply_output_policy(
    policy: OutputPolicy, names: Sequence[str], outputs: Sequence[np.ndarray]
) -> list[tuple[str, np.ndarray]]:
    """What the host receives for these raw outputs under `policy`."""
    if policy.output == "scores":
        return [(name, np.asarray(value)) for name, value in zip(names, outputs)]
    first = np.asarray(outputs[0])
    if first.ndim == 0:
        raise PolicyError(f"output policy {policy.spec!r} needs a first output with a class axis")
    if policy.output == "label":
        return [("label", first.argmax(axis=-1).astype(np.int64, copy=False))]
    assert policy.k is not None
    if policy.k > first.shape[-1]:
        raise PolicyError(f"output policy {policy.spec!r} asks for more classes than the model has ({first.shape[-1]})")
    # A stable sort keeps ties in index order, so top-1 always equals `label`'s argmax.
    order = np.argsort(_descending_key(first), axis=-1, kind="stable")
    return [("topk", np.ascontiguousarray(order[..., : policy.k]).astype(np.int64))]


# --------------------------------------------------------------------------------------------
# Metering


class Meter:
    """Query budget (samples per session) and token-bucket rate limit, checked before each run.

    `admit(n)` raises a PolicyRefusal or takes `n` rate tokens; `record(n)` counts samples that
    were answered. The server is sequential, so there is no race between the two.
    """

    def __init__(
        self, policy: OutputPolicy, clock: Callable[[], float] = time.monotonic, *, already_served: int = 0
    ) -> None:
        self.budget = policy.query_budget
        self.rate = policy.rate_limit_per_s
        self.capacity = max(self.rate, 1.0) if self.rate is not None else 0.0
        self._tokens = self.capacity
        self._clock = clock
        self._last = clock()
        # With a persistent budget this starts at the count earlier sessions left in the sealed state.
        self.samples_served = already_served
        self.requests_served = 0
        self.requests_refused = 0

    @property
    def budget_left(self) -> int | None:
        return None if self.budget is None else max(0, self.budget - self.samples_served)

    def admit(self, samples: int) -> None:
        try:
            self._check_budget(samples)
            self._take_tokens(samples)
        except PolicyRefusal:
            self.requests_refused += 1
            raise

    def _check_budget(self, samples: int) -> None:
        if self.budget is None:
            return
        left = self.budget - self.samples_served
        if left <= 0:
            raise BudgetExhausted(f"query budget exhausted ({self.samples_served} of {self.budget} samples used)")
        if samples > left:
            raise BudgetExhausted(
                f"query budget too small for this batch ({samples} samples asked, {left} of {self.budget} left)"
            )

    def _take_tokens(self, samples: int) -> None:
        if self.rate is None:
            return
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if samples > self.capacity:
            raise RateLimited(
                f"a batch of {samples} samples exceeds the rate limit's burst of {self.capacity:g} samples "
                f"({self.rate:g} samples/s); send smaller batches"
            )
        if samples > self._tokens:
            wait = (samples - self._tokens) / self.rate
            raise RateLimited(f"rate limit of {self.rate:g} samples/s reached; retry in {wait:.2f} s")
        self._tokens -= samples

    def record(self, samples: int) -> None:
        self.samples_served += samples
        self.requests_served += 1
