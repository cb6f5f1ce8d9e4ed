"""``reference_only``: ControlNet's reference-only mode (attention part), as its diffusers port computes it.

A reference image is encoded by the VAE and, every step, noised to the step's timestep with
fresh noise (``scheduler.add_noise``); its rows (one per CFG branch, with the main rows' text)
run beside the main ones. At every selected self-attention site each row attends to its own
tokens and to the reference row's of the same branch::

    with_ref = softmax(Q [K ; K_ref]^T / sqrt(d)) [V ; V_ref]
    out      = with_ref                                                  (conditional rows)
    out      = style_fidelity * plain + (1 - style_fidelity) * with_ref  (unconditional rows)

with ``plain`` the site's own attention. The reference rows attend to themselves only: they
append their own keys, which leaves their attention as it was (duplicated keys, halved weights).
The port's ``reference_adain`` (GroupNorm statistics of the resnet features) is not
reproduced: it acts on non-attention modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import attnctl
from attnctl.errors import ConfigError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import MAIN, Branch, BranchOp, KeyValueOp
from attnctl.params import StrategySpec
from attnctl.rows import RowOp, RowSpec
from attnctl.sites import SiteTable
from strategies._attention_sites import self_attention_sites
from strategies._images import open_image

if TYPE_CHECKING:
    from attnctl.call import AttentionCall

NAME = "reference_only"
UNCOND = (MAIN_ROLE, "uncond")  # the rows that blend in their plain attention


@dataclass(frozen=True)
class ReferenceOnlyParams:
    """Parameters of ``reference_only`` (defaults: the diffusers port's)."""

    image: str = field(default="", metadata={"help": "path of the reference image (required)"})
    style_fidelity: float = field(default=0.5, metadata={"help": "weight of the plain attention on the uncond rows"})
    sites: str = field(default="self", metadata={"help": "self-attention sites that read the reference (selector)"})
    noise_seed: int = field(default=0, metadata={"help": "seed of the noise the reference is re-noised with"})

    def __post_init__(self) -> None:
        if not str(self.image).strip():
            raise ConfigError("image is empty: give the path of the reference image")
        if not 0.0 <= self.style_fidelity <= 1.0:
            raise ConfigError(f"style_fidelity must be in [0, 1], got {self.style_fidelity}")


SPEC = StrategySpec(NAME, "reference-only: attend to a re-noised reference image's self-attention tokens",
                    ReferenceOnlyParams)


@dataclass(eq=False)
class ReferenceKeys(KeyValueOp):
    """Appends the reference row's own keys and values (same branch) to every row."""

    passes: frozenset[str] = field(default=frozenset({MAIN}), kw_only=True)

    def extend(self, call: AttentionCall) -> None:
        role = self.strategy
        call.append_keys(call.take(call.own_key, role), call.take(call.own_value, role))


@dataclass(eq=False)
class StyleFidelity(BranchOp):
    """On the main unconditional rows: ``fidelity * plain + (1 - fidelity) * with_ref``."""

    fidelity: float = field(default=0.5, kw_only=True)

    def main_weight(self, call):
        if not call.rows_of(*UNCOND):  # no classifier-free guidance: nothing to blend
            return None
        return 1 - self.fidelity * call.on_rows(*UNCOND).to(call.value.dtype)

    def branches(self, call):
        rows = tuple(call.rows_of(*UNCOND))
        if not rows:
            return []
        on = call.on_rows(*UNCOND).to(call.value.dtype)
        return [Branch(self.fidelity * on, key=call.own_key, value=call.own_value, rows=rows)]


@attnctl.hookimpl
def attnctl_add_strategies() -> list[StrategySpec]:
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: ReferenceOnlyParams, sites: SiteTable):
    if spec.name != NAME:
        return None
    image = open_image(params.image, f"strategies.{instance}.image")
    row = RowSpec(role=instance, driver="noised", image=image, fresh_noise=True, noise_seed=params.noise_seed,
                  per_image=False)
    ops: list = [RowOp(instance, row=row)]
    for site in self_attention_sites(params.sites, sites, f"strategies.{instance}"):
        ops.append(ReferenceKeys(instance, site=site))
        if params.style_fidelity > 0:
            ops.append(StyleFidelity(instance, site=site, fidelity=params.style_fidelity))
    return ops
