"""The attention call ops act on: one site's head-split queries, keys and values in one run.

This is the interface every op sees (``KeyValueOp.extend``, ``ReweightOp.factors``,
``ObserveOp.observe``); the computation that applies the ops is ``attnctl.attention.compute``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Hashable

if TYPE_CHECKING:
    import torch

    from attnctl.interfaces import RunView
    from attnctl.layout import BatchLayout
    from attnctl.sites import Site


@dataclass
class AttentionCall:
    """One attention call at a controlled site, head-split, as ops see it.

    The contract every op relies on:

    - ``query`` [B, h, Nq, d]; ``key`` [B, h, Nk, d]; ``value`` [B, h, Nk, d_v], in the
      model's dtype. ``B == len(rows)``: row ``i`` of every tensor is row ``rows[i]`` of
      the run's ``BatchLayout`` (``layout`` gives its branch, image and prompt). Rows are
      not always the whole UNet batch: in the guidance pass they are the conditional rows,
      and a processor such as PAG's runs attention on a subset of its batch.
    - The first ``num_own_keys`` keys are the module's own (image tokens for self-attention,
      text tokens for cross-attention); keys after them were appended by key/value ops.
      During stage 1 (key/value ops) ``key``/``value`` grow; from stage 2 on they are final.
    - ``bias``: an additive float bias broadcastable to [B, h, Nq, Nk] (the module's own
      attention mask, then the biases of appended keys), or None. Boolean masks are turned
      into 0 / -inf on creation.
    - Ops never write into these tensors in place; key/value ops extend them only through
      ``append_keys``.
    - ``mask()`` and ``memo()`` are keyed by this call's site level, rows and device, so an
      op's memo key only needs what else its value depends on (its own parameters).

    Attributes:
        site: the site being called.
        state: the run state.
        query, key, value: projected, head-split tensors.
        bias: additive float bias, or None.
        scale: softmax scale (1/sqrt(d) for standard modules).
        rows: rows of the run's layout this call's batch is made of (default: the state's).
        num_own_keys: how many keys came from the module's own input (before any appending).
    """

    site: Site
    state: RunView
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    bias: torch.Tensor | None
    scale: float
    rows: tuple[int, ...] | None = None
    num_own_keys: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_own_keys = self.key.shape[-2]
        if self.rows is None:
            self.rows = self.state.rows
        if self.bias is not None and not self.bias.dtype.is_floating_point:
            # SDPA's boolean form (True = attend) as an additive bias
            self.bias = self.query.new_zeros(self.bias.shape).masked_fill(~self.bias, -math.inf)

    # ------------------------------------------------------------------ what ops read
    @property
    def layout(self) -> BatchLayout:
        """Branch, image and prompt of each row of this call."""
        return self.state.layout.subset(self.rows)

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (H, W) of the site in this run."""
        return self.state.grid(self.site)

    @property
    def own_key(self) -> torch.Tensor:
        """The module's own keys [B, h, num_own_keys, d]."""
        return self.key[..., : self.num_own_keys, :]

    @property
    def own_value(self) -> torch.Tensor:
        """The module's own values [B, h, num_own_keys, d_v]."""
        return self.value[..., : self.num_own_keys, :]

    def mask(self) -> torch.Tensor:
        """Binary inpainting masks ``[B, H*W]`` (fp32, 1 = inpaint) of this call's rows at the site's grid."""
        return self.state.masks_for_rows(self.site.level, self.rows, self.query.device)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run for ``key`` at this site's level, rows and device; then the cached value."""
        return self.state.memo(("call", key, self.site.level, self.rows, self.query.device), compute)

    # ------------------------------------------------------------------ what key/value ops do
    def append_keys(self, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Append ``key``/``value`` [B, h|1, n, d] with optional additive ``bias`` [B|1, h|1, 1|Nq, n]."""
        import torch

        b, h, nq, _ = self.query.shape
        n_old, n_new = self.key.shape[-2], key.shape[-2]
        key = key.expand(b, h, n_new, key.shape[-1]).to(self.key.dtype)
        value = value.expand(b, h, n_new, value.shape[-1]).to(self.value.dtype)
        if bias is not None or self.bias is not None:
            dtype = self.query.dtype
            old = self.bias if self.bias is not None else self.query.new_zeros(1, 1, 1, n_old)
            new = bias if bias is not None else self.query.new_zeros(1, 1, 1, n_new)
            shape = torch.broadcast_shapes(old.shape[:-1], new.shape[:-1])
            self.bias = torch.cat([old.to(dtype).expand(*shape, n_old), new.to(dtype).expand(*shape, n_new)], dim=-1)
        self.key = torch.cat([self.key, key], dim=-2)
        self.value = torch.cat([self.value, value], dim=-2)
