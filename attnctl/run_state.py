"""Run state: everything strategies may read during one pipeline call.

One ``RunState`` is created when a run starts and dropped when it ends. It carries the
step and timestep, the CFG batch layout (explicit, never guessed from ``batch // 2``),
the inpainting mask at every site grid, prompt token indices, per-instance scratch
space and the results strategies hand back to the caller (``results``: what probes
measured). There are no module globals and no call counters.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from attnctl.errors import InputError, RunError
from attnctl.block_context import block_name, blocks_needed
from attnctl.layout import BatchLayout
from attnctl.ops import GUIDANCE, MAIN, RECORD, ActiveOps, LatentOp, Op
from attnctl.run_store import RunStore
from attnctl.sites import Site, grid_at

if TYPE_CHECKING:
    from attnctl.plan import Plan


class RunState:
    """State of one pipeline run.

    Args:
        plan: the compiled plan (which ops exist, with their gates).
        layout: batch layout of the pipeline's UNet calls.
        mask: inpainting mask(s), 1 = region to inpaint, at any resolution: a tensor or array
            ``[H, W]``, ``[K, H, W]`` or ``[K, 1, H, W]`` (float in [0, 1], uint8, bool), a PIL
            image (white = inpaint) or a list of them. It is binarized at 0.5, brought to the
            latent size by nearest interpolation (as the pipeline does) and from there to each
            site's grid.
            Image ``i`` uses mask ``i % K`` (diffusers repeats masks the same way).
        token_indices: per prompt, the positions of the prompt's own tokens.
        num_train_timesteps: T_train, to normalize timesteps.
        timesteps: the scheduler's timesteps of this run, to find the step index.
    """

    def __init__(
        self,
        plan: Plan,
        layout: BatchLayout,
        mask: Any = None,
        token_indices: Sequence[Sequence[int]] = (),
        num_train_timesteps: int = 1000,
        timesteps: Sequence[float] | torch.Tensor | None = None,
    ):
        self.plan = plan
        self.layout = layout
        self.token_indices = [list(t) for t in token_indices]
        self.num_train_timesteps = int(num_train_timesteps)
        self._timesteps = timesteps
        self._mask_input = _as_mask_batch(mask) if mask is not None else None
        self.scratch: dict[str, dict[str, Any]] = {}
        #: instance name -> what the instance hands back after the run (e.g. a probe's measurements)
        self.results: dict[str, Any] = {}
        self.step_index: int | None = None
        self.timestep: float | None = None
        self.pass_kind: str = MAIN
        self.latent_hw: tuple[int, int] | None = None
        #: (text, image) tokens of the current transformer call (``attnctl.backbones``); (0, 0) on a UNet
        self.tokens: tuple[int, int] = (0, 0)
        #: whether the network's text starts with a start token (False for FLUX's T5 text)
        self.text_start_token = True
        #: the current transformer call's rotary embedding ``(cos, sin)`` [S, d] in attention order, kept
        #: only while an op needs it (``SiteOp.needs_rotary``)
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self.active: dict[str, ActiveOps] = {}
        self.active_latent_ops: tuple[LatentOp, ...] = ()
        self.active_step_ops: tuple[Op, ...] = ()
        #: feature ops active in the current step and pass (``attnctl.feature_ops``)
        self.active_features: tuple[Op, ...] = ()
        self._features_by_pass: dict[str, tuple[Op, ...]] = {}
        self.pending_latents: torch.Tensor | None = None
        #: scheduler steps taken so far (counted where attnctl wraps ``scheduler.step``; None elsewhere):
        #: a UNet call after a step is a new step even when the timestep repeats
        self.steps_done: int | None = None
        self._steps_seen: int | None = None
        #: role -> final latents of rows added with ``output=True`` (see ``attnctl.rows``)
        self.row_outputs: dict[str, torch.Tensor] = {}
        #: role -> the UNet calls an ``inverted`` row's inversion made (the run report's ``inversions``)
        self.inversions: dict[str, dict[str, int]] = {}
        #: every instance's store exists from the start: creating one inside a compiled forward
        #: would change what dynamo guards on between the first step and the next
        self._stores: dict[str, RunStore] = {name: RunStore(name) for name in plan.instances}
        #: prompt texts by prompt index (what the caller gave ``Controller.run``, then the added rows')
        self.prompts: list[str] = []
        #: the pipeline's tokenizer (None for a bare UNet), for strategies that map words to tokens
        self.tokenizer: Any = None
        #: (site key, pass kind) -> (query chunk, bytes of one chunk's map) once that site computed an
        #: explicit map in that kind of pass; every slot exists from the start (None), so that
        #: noting one is a plain store which torch.compile does not guard on
        self._explicit: dict[tuple[str, str], tuple[int, int] | None] = {
            (plan.sites.by_name(name).key, kind): None for name in plan.site_ops for kind in (MAIN, GUIDANCE)
        }
        self._active_by_pass: dict[str, dict[str, ActiveOps]] = {}
        self._rows: tuple[int, ...] = tuple(range(len(layout)))
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._preparing = plan.preparing
        #: block name -> what the block holding a site got in its latest call (``attnctl.block_context``);
        #: every slot exists from the start, so recording one is a plain store torch.compile does not guard on
        self.blocks: dict[str, Any] = dict.fromkeys(blocks_needed(plan.site_ops, plan.sites))
        #: sites whose ops were active in some main-pass step / that applied ops (run report); the
        #: latter has every planned site as a key from the start, so that marking one is a plain
        #: store (a growing set would make torch.compile guard on its contents, step by step)
        self.sites_due: set[str] = set()
        self.sites_run: dict[str, bool] = dict.fromkeys(plan.site_ops, False)

    # ---------------------------------------------------------------- time
    @property
    def t_norm(self) -> float | None:
        """t / T_train of the current step."""
        return None if self.timestep is None else self.timestep / self.num_train_timesteps

    @property
    def num_inference_steps(self) -> int | None:
        """How many timesteps the scheduler has in this run (None if unknown), for step-size schedules."""
        if self._timesteps is None:
            return None
        return len(list(self._timesteps)) or None

    def begin_step(self, timestep: float, latent_hw: tuple[int, int] | None = None, prepare: bool = True,
                   step_index: int | None = None) -> None:
        """Enter the step with timestep value ``timestep``; compute which ops are active and, with
        ``prepare``, let the ops get ready for it (``Op.prepare``; off for states that only
        preview which ops act when). ``step_index``: the step's index when the caller knows it
        from the scheduler (then timesteps are never matched by value: a transformer may get
        them rounded to bf16); otherwise it is found in the schedule by value."""
        if latent_hw is not None and latent_hw != self.latent_hw:
            self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
            self._mask_cache.clear()
        stepped = self.steps_done is not None and self.steps_done != self._steps_seen
        same = step_index == self.step_index if step_index is not None else timestep == self.timestep
        if same and self._active_by_pass and not stepped:
            return  # another call of the network within the same step
        self._steps_seen = self.steps_done
        self.timestep = float(timestep)
        self.step_index = step_index if step_index is not None else self._find_step_index(self.timestep)
        self._active_by_pass = {}
        for kind in (MAIN, GUIDANCE):
            self.pass_kind = kind
            self._active_by_pass[kind] = self.plan.active_site_ops(self)
            self._features_by_pass[kind] = self.plan.active_feature_ops(self)
        self.pass_kind = MAIN
        self.active = self._active_by_pass[MAIN]
        self.active_features = self._features_by_pass[MAIN]
        self.active_latent_ops = self.plan.active_latent_ops(self)
        self.active_step_ops = self.plan.active_step_ops(self)
        self.sites_due.update(self.active)
        for op in self._preparing if prepare else ():
            op.prepare(self)
        for store in self._stores.values():
            store.count()

    def active_in(self, pass_kind: str) -> dict[str, ActiveOps]:
        """Site name -> ops active at it in this step's ``pass_kind`` pass (``MAIN`` or ``GUIDANCE``)."""
        return self._active_by_pass.get(pass_kind, {})

    def _schedule(self) -> list[float]:
        """The run's timesteps as floats (empty when unknown)."""
        return [] if self._timesteps is None else [float(v) for v in self._timesteps]

    def _find_step_index(self, t: float) -> int | None:
        """The index of ``t`` in the schedule: the one after the previous step's if it holds ``t``
        (schedules may repeat a timestep, as PNDM's does), else its first occurrence."""
        if self._timesteps is None:
            return None
        schedule = self._schedule()
        prev = self.step_index
        if prev is not None and prev + 1 < len(schedule) and schedule[prev + 1] == t:
            return prev + 1
        hits = [i for i, v in enumerate(schedule) if v == t]
        return hits[0] if hits else None

    @contextmanager
    def guidance_pass(self, rows: Sequence[int]) -> Iterator[None]:
        """Within this block, UNet calls are the guidance pass over batch ``rows``."""
        saved = (self.pass_kind, self.active, self.active_features, self._rows)
        self.pass_kind, self._rows = GUIDANCE, tuple(rows)
        self.active = self._active_by_pass.get(GUIDANCE, {})
        self.active_features = self._features_by_pass.get(GUIDANCE, ())
        try:
            yield
        finally:
            self.pass_kind, self.active, self.active_features, self._rows = saved

    @property
    def in_guidance(self) -> bool:
        return self.pass_kind == GUIDANCE

    @contextmanager
    def record_pass(self, timestep: float | None = None) -> Iterator[None]:
        """Within this block, UNet calls are a record pass (an inversion at ``timestep``): only ops
        whose ``passes`` name ``"record"`` act, and they see the step index of ``timestep`` in the
        run's schedule (so what they keep can be replayed by step in the main pass)."""
        saved = (self.pass_kind, self.active, self.active_features, self.timestep, self.step_index)
        self.pass_kind = RECORD
        if timestep is not None:
            self.timestep = float(timestep)
            schedule = self._schedule()
            self.step_index = schedule.index(self.timestep) if self.timestep in schedule else None
        self.active, self.active_features = self.plan.active_site_ops(self), self.plan.active_feature_ops(self)
        try:
            yield
        finally:
            self.pass_kind, self.active, self.active_features, self.timestep, self.step_index = saved

    @property
    def in_side_pass(self) -> bool:
        """A UNet call that is not the pipeline's own (a guidance or record pass)."""
        return self.pass_kind != MAIN

    def block_input(self, site: Site) -> Any:
        """The ``BlockInput`` of the block holding ``site`` in the current UNet call (ops with ``needs_block``)."""
        found = self.blocks.get(block_name(site))
        if found is None:
            raise RunError(f"{site.key} ({site.name}): no input of its block was recorded; only ops that set "
                           "needs_block = True read it (attnctl then records the block's input)")
        return found

    def input_mask(self, image: int = 0) -> torch.Tensor:
        """Image ``image``'s binarized inpainting mask ``[H, W]`` at the resolution it was given (1 = inpaint)."""
        if self._mask_input is None:
            raise InputError("this run has no mask; give one to Controller.run(layout, mask=...)")
        return self._mask_input[image % self._mask_input.shape[0], 0]

    # ---------------------------------------------------------------- rows
    @property
    def rows(self) -> tuple[int, ...]:
        """Rows (of the main layout) that the current UNet call's batch is made of."""
        return self._rows

    @property
    def row_layout(self) -> BatchLayout:
        """Layout of the current UNet call's batch."""
        return self.layout.subset(self._rows)

    # ---------------------------------------------------------------- masks
    def grid(self, site: Site) -> tuple[int, int]:
        """Token grid (H, W) of ``site`` in this run."""
        if self.latent_hw is None:
            raise RunError("the run has not seen a UNet call yet, so the latent size is unknown")
        return grid_at(site.level, self.latent_hw)

    def mask(self, level: int) -> torch.Tensor:
        """Binary masks ``[K, H*W]`` (float32, row-major) at the grid of ``level``."""
        if self._mask_input is None:
            raise InputError("a strategy needs the inpainting mask, but the run was started without one")
        if self.latent_hw is None:
            raise RunError("the latent size is not known yet")

        def compute() -> torch.Tensor:
            latent = F.interpolate(self._mask_input, size=self.latent_hw, mode="nearest")
            grid = grid_at(level, self.latent_hw)
            m = latent if grid == self.latent_hw else F.interpolate(latent, size=grid, mode="nearest")
            return m.flatten(1)

        return self._cached(("mask", level), compute)

    def row_mask(self, site: Site, device: torch.device | None = None) -> torch.Tensor:
        """Masks ``[R, H*W]`` (float32) for the rows of the current UNet call at ``site``'s grid."""
        return self.masks_for_rows(site.level, self._rows, device)

    def masks_for_rows(self, level: int, rows: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
        """Masks ``[len(rows), H*W]`` (float32) at the grid of ``level``: row ``r`` gets its image's mask."""
        def compute() -> torch.Tensor:
            masks = self.mask(level)
            idx = torch.tensor([self.layout.images[r] % masks.shape[0] for r in rows])
            return masks[idx].to(device) if device is not None else masks[idx]

        return self._cached(("rows", level, tuple(rows), device), compute)

    def memo(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run and latent size for ``key``, then the cached value.

        For tensors derived from the masks (soft masks, gather indices, biases): they depend
        only on the grid and the rows, so attention calls after the first do no mask work
        (and on CUDA, no host-device syncs).
        """
        return self._cached(key, compute)

    def _cached(self, key: tuple, compute: Callable[[], Any]) -> Any:
        # Under torch.compile the value is computed inside the graph instead: reading the cache
        # would make dynamo guard on which keys it holds, and the first step (empty cache) and
        # the later ones (full) would compile different graphs.
        if torch.compiler.is_compiling():
            return compute()
        if key not in self._mask_cache:
            self._mask_cache[key] = compute()
        return self._mask_cache[key]

    def store(self, instance: str) -> RunStore:
        """The run store of one strategy instance (tensors by key, counted in ``report()``)."""
        if instance not in self._stores:
            self._stores[instance] = RunStore(instance)
        return self._stores[instance]

    def note_explicit(self, site: Site, query_chunk: int, chunk_bytes: int) -> None:
        """Record that ``site`` computed an explicit attention map (called by the core)."""
        # a site's map has the same size at every call of one kind of pass (same rows, same grid)
        self._explicit[(site.key, self.pass_kind)] = (query_chunk, chunk_bytes)

    @property
    def explicit_sites(self) -> dict[str, tuple[int, int]]:
        """Site key -> (query chunk, bytes of the largest map chunk) for sites that computed an explicit map."""
        sites: dict[str, tuple[int, int]] = {}
        for (key, _), noted in self._explicit.items():
            if noted is not None and noted[1] >= sites.get(key, (0, -1))[1]:
                sites[key] = noted
        return sites

    def report(self) -> dict[str, Any]:
        """What the run cost beyond the stock pipeline: added rows, explicit maps, stores.

        ``rows``: role -> number of rows added to each UNet call; ``explicit_maps``: site key ->
        ``{"query_chunk", "bytes"}`` (the largest map chunk held at once); ``stores``: instance ->
        ``{"bytes", "peak_bytes"}``; ``inversions``: role -> ``{"unet_calls", "rows_per_call"}`` of the
        record pass that inverted its image.
        """
        roles = self.layout.extra_roles
        return {
            "inversions": dict(self.inversions),
            "rows": {role: len(self.layout.rows_of(role)) for role in roles},
            "explicit_maps": {key: {"query_chunk": chunk, "bytes": size}
                              for key, (chunk, size) in sorted(self.explicit_sites.items())},
            "stores": {name: {"bytes": store.nbytes, "peak_bytes": store.peak_bytes}
                       for name, store in sorted(self._stores.items()) if store.peak_bytes or store.nbytes},
        }

    def scratch_for(self, instance: str) -> dict[str, Any]:
        """Per-run scratch space of one strategy instance."""
        return self.scratch.setdefault(instance, {})

    def publish(self, instance: str, result: Any) -> None:
        """Hand ``result`` back to whoever runs the pipeline: ``state.results[instance]`` after the run.

        For measurements (probes): set at ``attnctl_run_end`` at the latest; the state object
        stays readable after ``Controller.run`` exits.
        """
        self.results[instance] = result


MASK_FORMS = (
    "a torch tensor or numpy array [H, W], [K, H, W] or [K, 1, H, W] with values in [0, 1] (uint8 0-255 and "
    "bool also work), a PIL image (white = inpaint), or a list of those, one per image"
)


def _as_mask_batch(mask: Any) -> torch.Tensor:
    """Binarize a mask and bring it to ``[K, 1, H, W]`` float32 (1 = inpaint).

    Accepts ``MASK_FORMS``; anything else is an ``InputError`` that lists them.
    """
    if isinstance(mask, (list, tuple)):
        parts = [_as_mask_batch(m) for m in mask]
        if len({p.shape[-2:] for p in parts}) > 1:
            raise InputError(f"the masks of a list must have one size, got {[tuple(p.shape[-2:]) for p in parts]}")
        return torch.cat(parts)
    if hasattr(mask, "getbands"):  # a PIL image: white (255) = inpaint
        import numpy as np

        mask = np.array(mask.convert("L"), dtype=np.uint8)
    try:
        tensor = torch.as_tensor(mask).detach()
    except (TypeError, ValueError, RuntimeError):
        raise InputError(f"mask: cannot use a {type(mask).__name__}; give {MASK_FORMS}") from None
    tensor = tensor.float() / 255.0 if tensor.dtype == torch.uint8 else tensor.float()
    if tensor.ndim == 2:
        tensor = tensor[None, None]
    elif tensor.ndim == 3:
        tensor = tensor[:, None]
    if tensor.ndim != 4 or tensor.shape[1] != 1:
        raise InputError(f"mask must have shape [H, W], [K, H, W] or [K, 1, H, W], got {tuple(tensor.shape)}; "
                         f"give {MASK_FORMS}")
    return (tensor >= 0.5).float()
