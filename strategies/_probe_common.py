"""What the built-in probes share: which steps they read, which rows, which tokens, and
per-step accumulation that keeps nothing of a step but its result.

Probes read the main pass (the run the user gets) and only its conditional rows: the
unconditional half of classifier-free guidance attends to the empty prompt, and PAG's
perturbed rows to an identity map. Results are per image (``BatchLayout.images``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Iterator, Sequence

from attnctl.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from attnctl.call import AttentionCall
    from attnctl.interfaces import RunView

_SPREAD = re.compile(r"^spread:(\d+)$")
STEPS_HELP = ("which denoising steps to read: 'all', 'spread:N' (N steps evenly spread from the first to the "
              "last) or a list of 0-based step indices (negative: from the end, -1 = last)")
TOKENS_HELP = "'prompt' (the prompt's own tokens) or a list of text positions 1..76 (0 is the start token)"


@dataclass(frozen=True)
class StepChoice:
    """The steps a probe reads: ``all``, ``spread:N`` or explicit indices (negative from the end)."""

    kind: str
    count: int = 0
    indices: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any, where: str = "steps") -> StepChoice:
        """``"all"``, ``"spread:5"`` or ``[0, 10, -1]``; ``ConfigError`` naming ``where`` otherwise."""
        if isinstance(value, str):
            if value == "all":
                return cls("all")
            match = _SPREAD.match(value)
            if match and int(match.group(1)) >= 1:
                return cls("spread", count=int(match.group(1)))
            raise ConfigError(f"{where}: expected 'all', 'spread:N' (N >= 1) or a list of step indices, got '{value}'")
        if isinstance(value, (list, tuple)) and value and all(isinstance(i, int) and not isinstance(i, bool)
                                                                 for i in value):
            return cls("list", indices=tuple(value))
        raise ConfigError(f"{where}: expected 'all', 'spread:N' or a non-empty list of step indices, got {value!r}")

    def resolve(self, num_steps: int | None) -> frozenset[int] | None:
        """The chosen 0-based indices for a run of ``num_steps`` steps (None: every step)."""
        if self.kind == "all":
            return None
        if num_steps is None:
            return frozenset()
        if self.kind == "spread":
            n = min(self.count, num_steps)
            if n == 1:
                return frozenset({0})
            return frozenset(round(i * (num_steps - 1) / (n - 1)) for i in range(n))
        return frozenset(i % num_steps for i in self.indices if -num_steps <= i < num_steps)

    def __str__(self) -> str:
        if self.kind == "list":
            return "steps " + ",".join(map(str, self.indices))
        return "every step" if self.kind == "all" else f"steps spread:{self.count}"


@dataclass(frozen=True)
class AtSteps:
    """Gate: the run's current step is one of ``choice``'s (readable ``str`` for messages)."""

    choice: StepChoice

    def __call__(self, state: RunView) -> bool:
        chosen = self.choice.resolve(state.num_inference_steps)
        return chosen is None or state.step_index in chosen

    def __str__(self) -> str:
        return str(self.choice)


def check_tokens(tokens: Any, where: str = "tokens") -> None:
    """``'prompt'`` or a list of positions >= 1; ``ConfigError`` otherwise."""
    if isinstance(tokens, str):
        if tokens != "prompt":
            raise ConfigError(f"{where}: expected 'prompt' or a list of positions, got '{tokens}'")
    elif not tokens or any(i < 1 for i in tokens):
        raise ConfigError(f"{where}: positions start at 1 (0 is the start token), got {list(tokens)}")


def token_positions(state: RunView, tokens: str | Sequence[int], prompt: int, length: int, instance: str) -> list[int]:
    """Text positions a probe reads for ``prompt`` (``tokens: prompt`` needs the run's token indices)."""
    if tokens == "prompt":
        if prompt >= len(state.token_indices):
            raise InputError(
                f"probes.{instance} (tokens: prompt) needs the positions of prompt {prompt}'s tokens: pass "
                "token_indices=[[1, ..., n], ...] to Controller.run (the recipe runner does), or list positions"
            )
        positions = list(state.token_indices[prompt])
    else:
        positions = list(tokens)
    bad = [p for p in positions if not 1 <= p < length]
    if bad:
        raise InputError(f"probes.{instance}: token positions {bad} are outside 1..{length - 1}")
    return positions


def cond_rows(call: AttentionCall) -> tuple[list[int], list[int]]:
    """(indices into the call's batch, image of each) of the call's conditional rows."""
    layout = call.layout
    picked = [i for i, branch in enumerate(layout.branches) if branch == "cond"]
    return picked, [layout.images[i] for i in picked]


def step_label(state: RunView) -> tuple[int, float]:
    """(step index, timestep) of the current step; steps the scheduler does not list count on from -1."""
    index = state.step_index if state.step_index is not None else -1
    return index, float(state.timestep if state.timestep is not None else float("nan"))


class StepSums:
    """Running sums of one step at a time, per key; the step's result is made when the next begins.

    ``add(step, key, value)`` adds ``value`` (a tensor) under ``key``; when ``step`` differs
    from the one being summed, ``finish(step, {key: (sum, count)})`` is called for the
    previous step first and its sums are dropped, so memory holds one step whatever the
    number of steps. ``flush()`` finishes the last step (at the end of the run).
    """

    def __init__(self, finish: Callable[[tuple[int, float], dict[Hashable, tuple[torch.Tensor, int]]], None]):
        self._finish = finish
        self._step: tuple[int, float] | None = None
        self._sums: dict[Hashable, tuple[torch.Tensor, int]] = {}

    def add(self, step: tuple[int, float], key: Hashable, value: torch.Tensor) -> None:
        if step != self._step:
            self.flush()
            self._step = step
        total, count = self._sums.get(key, (None, 0))
        self._sums[key] = (value if total is None else total + value, count + 1)

    def flush(self) -> None:
        if self._step is not None and self._sums:
            self._finish(self._step, self._sums)
        self._step, self._sums = None, {}


def run_collector(call: AttentionCall, instance: str, make: Callable[[], Any]) -> Any:
    """The instance's per-run collector (made on first use) in its run scratch."""
    scratch = call.state.scratch_for(instance)
    if "collector" not in scratch:
        scratch["collector"] = make()
    return scratch["collector"]


def note_site(result: Any, call: AttentionCall) -> None:
    """Record the call's grid under its level and its site key (once) in a map result
    (one with ``grids`` and ``sites`` dicts keyed by level)."""
    level = call.site.level
    result.grids[level] = call.grid
    keys = result.sites.setdefault(level, [])
    if call.site.key not in keys:
        keys.append(call.site.key)


def finished_collectors(state: RunView, plan: Any, name: str) -> Iterator[tuple[str, Any]]:
    """(instance, collector) of every instance of the probe kind ``name`` that collected in this run."""
    for instance, (spec, _) in plan.instances.items():
        collector = state.scratch.get(instance, {}).get("collector") if spec.name == name else None
        if collector is not None:
            yield instance, collector
