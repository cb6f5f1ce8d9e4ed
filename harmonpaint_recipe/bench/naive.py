"""HarmonPaint written the way typical research code writes it: the ``naive`` variant.

This is the baseline attnctl's fused path is measured against, and it deliberately keeps
the costs such code usually pays (it lives in the benchmark, not in the library):

- its attention processor (diffusers' classic ``AttnProcessor`` math) materializes
  ``softmax(QK^T)`` at every site it controls, in every call: self sites 2..6 (SAMS),
  the last 8 self sites (MAKVS) and all cross sites (the guidance loss reads them);
- SAMS builds the ``HW x HW`` weight matrix ``M^ M^T + (1-M^)(1-M^)^T`` and multiplies
  the probabilities by it (Eq. 4-7);
- MAKVS concatenates all ``2*HW`` keys ``[K ; lambda K~]`` and values ``[V ; V~]``
  (Eq. 10-12) instead of merging the identical mean keys;
- the Attention Steer Loss is Attend-and-Excite-style: a full conditional UNet forward
  (no early stop) that stores every cross-attention map, the loss from the maps of the
  latent/4 and latent/2 grids, and a backward through the whole UNet (Eq. 8-9).

The numbers and sites are read from the same recipe the ``harmonpaint`` variant runs
(``NaiveSettings.from_recipe``; defaults as in docs/harmonpaint.md: tau 0.1,
lambda 1.4, eta 0.6, step size 20 with the sqrt-linspace schedule, token scale 100,
eps 1e-4). Like the A&E pipeline it
updates z_t before the step's noise prediction and the scheduler step continues from the
updated latent; here that is done with a UNet pre-hook and a wrapped ``scheduler.step``
so the stock diffusers pipeline can be driven unchanged (DDIM: ``scale_model_input`` is
the identity).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F

from attnctl.attention import finish_attention, project_attention
from attnctl.selectors import select_sites
from attnctl.sites import Site, describe_sites, grid_at


@dataclass(frozen=True)
class NaiveSettings:
    """HarmonPaint defaults (docs/harmonpaint.md); ``from_recipe`` reads them from a recipe."""

    tau: float = 0.1
    makvs_scale: float = 1.4
    eta: float = 0.6
    step_size: float = 20.0
    token_scale: float = 100.0
    eps: float = 1e-4
    sams_sites: str = "self[2:7]"
    makvs_sites: str = "self[-8:]"
    read_sites: str = "cross/4,cross/2"

    @classmethod
    def from_recipe(cls, config: Mapping[str, Any]) -> NaiveSettings:
        """The same numbers and sites as a resolved HarmonPaint recipe (plain dict)."""
        st = config["strategies"]
        return cls(
            tau=float(st["sams"]["tau"]),
            makvs_scale=float(st["makvs"]["scale"]),
            eta=float(config["eta"]),
            step_size=float(st["steer"]["step_size"]),
            token_scale=float(st["steer"]["token_scale"]),
            eps=float(st["steer"]["eps"]),
            sams_sites=str(st["sams"]["sites"]),
            makvs_sites=str(st["makvs"]["sites"]),
            read_sites=str(st["steer"]["read_sites"]),
        )


class _Run:
    """Per-call state of the naive implementation (the research-code 'controller')."""

    def __init__(self, mask: torch.Tensor, token_indices: list[int], settings: NaiveSettings, num_train: int):
        self.mask = mask  # [1, 1, H, W] binary float32 at image resolution
        self.tokens = token_indices
        self.settings = settings
        self.num_train = num_train
        self.t: float = float(num_train)
        self.latent_hw: tuple[int, int] = (0, 0)
        self.storing = False
        self.cross_maps: list[tuple[int, torch.Tensor]] = []  # (level, probs [B, h, HW, 77])
        self.guided: torch.Tensor | None = None
        self.in_guidance = False
        self._masks: dict[int, torch.Tensor] = {}

    @property
    def structure(self) -> bool:
        return self.t >= self.settings.eta * self.num_train

    def mask_at(self, level: int, device, dtype) -> torch.Tensor:
        """Flattened binary mask [HW] at ``level``'s grid."""
        if level not in self._masks:
            latent = F.interpolate(self.mask, size=self.latent_hw, mode="nearest")
            grid = grid_at(level, self.latent_hw)
            self._masks[level] = F.interpolate(latent, size=grid, mode="nearest").flatten()
        return self._masks[level].to(device=device, dtype=dtype)


class NaiveProcessor:
    """Classic explicit-softmax attention with SAMS / MAKVS / map storage by role."""

    def __init__(self, owner: NaiveHarmonPaint, site: Site, roles: frozenset[str]):
        self.owner, self.site, self.roles = owner, site, roles

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        run = self.owner.run_state
        # diffusers' own pre/post-processing; the core below is the classic explicit processor
        p = project_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, heads, _, head_dim = p.query.shape
        query, key, value = (t.reshape(batch * heads, -1, t.shape[-1]) for t in (p.query, p.key, p.value))
        attention_mask = None if p.mask is None else p.mask.reshape(batch * heads, -1, p.mask.shape[-1])

        if run is not None and "makvs" in self.roles and not run.structure:
            key, value = self._makvs_kv(run, key, value, batch, heads)
        probs = attn.get_attention_scores(query, key, attention_mask)
        if run is not None and "sams" in self.roles and run.structure:
            m = run.mask_at(self.site.level, probs.device, probs.dtype)
            hw = m.numel()
            soft = (1 - run.settings.tau) * m + run.settings.tau / hw
            weight = soft[:, None] * soft[None, :] + (1 - soft)[:, None] * (1 - soft)[None, :]  # [HW, HW]
            probs = probs * weight
        if run is not None and "cross" in self.roles and run.storing:
            run.cross_maps.append((self.site.level, probs.view(batch, heads, *probs.shape[1:])))
        out = torch.bmm(probs, value).view(batch, heads, -1, value.shape[-1])
        return finish_attention(attn, p, out)

    def _makvs_kv(self, run: _Run, key, value, batch: int, heads: int):
        """``[K ; lambda K~]`` and ``[V ; V~]`` with all 2*HW tokens (Eq. 10-12)."""
        m = run.mask_at(self.site.level, key.device, key.dtype)
        keep = m == 0
        if not bool(keep.any()):
            return key, value
        k_bar = key[:, keep].mean(dim=1, keepdim=True)
        v_bar = value[:, keep].mean(dim=1, keepdim=True)
        masked = (m == 1)[None, :, None]
        k_tilde = torch.where(masked, k_bar, key)
        v_tilde = torch.where(masked, v_bar, value)
        return torch.cat([key, run.settings.makvs_scale * k_tilde], 1), torch.cat([value, v_tilde], 1)


def _rows(value: Any, rows: slice, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    return value


class NaiveHarmonPaint:
    """Install on a pipeline, then ``with naive.run(mask, token_indices): pipe(...)``.

    Supports batch size 1 with classifier-free guidance (rows ``[uncond, cond]``), which
    is what the benchmark runs.
    """

    def __init__(self, pipe, settings: NaiveSettings | None = None):
        self.pipe = pipe
        self.unet = pipe.unet
        self.settings = settings or NaiveSettings()
        self.run_state: _Run | None = None
        sites = describe_sites(self.unet)
        roles: dict[str, set[str]] = {}
        for s in select_sites(self.settings.sams_sites, sites):
            roles.setdefault(s.name, set()).add("sams")
        for s in select_sites(self.settings.makvs_sites, sites):
            roles.setdefault(s.name, set()).add("makvs")
        for s in sites.of_kind("cross"):  # A&E-style: every cross map is computed and stored
            roles.setdefault(s.name, set()).add("cross")
        self._roles = {name: (sites.by_name(name), frozenset(r)) for name, r in roles.items()}
        self._read_levels = sorted({s.level for s in select_sites(self.settings.read_sites, sites)}, reverse=True)
        self._originals: dict[str, Any] | None = None
        self._hook = None

    # ---------------------------------------------------------------- install
    def install(self) -> None:
        """Swap in the naive processors and the guidance pre-hook."""
        self._originals = dict(self.unet.attn_processors)
        procs = {}
        for key, original in self._originals.items():
            name = key.rsplit(".processor", 1)[0]
            role = self._roles.get(name)
            procs[key] = NaiveProcessor(self, *role) if role else original
        self.unet.set_attn_processor(procs)
        self._hook = self.unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)

    def remove(self) -> None:
        """Put the original processors back."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._originals is not None:
            self.unet.set_attn_processor(self._originals)
            self._originals = None

    @contextmanager
    def run(self, mask: torch.Tensor, token_indices: list[int]) -> Iterator[None]:
        """One pipeline call; ``mask`` [H, W] (1 = inpaint) at image size."""
        sched = self.pipe.scheduler
        num_train = sched.config.num_train_timesteps
        self.run_state = _Run(mask.float()[None, None].ge(0.5).float(), list(token_indices), self.settings, num_train)
        step = sched.step

        def guided_step(model_output, timestep, sample, *a, **kw):
            run = self.run_state
            if run is not None and run.guided is not None:
                sample, run.guided = run.guided.to(sample.dtype), None
            return step(model_output, timestep, sample, *a, **kw)

        sched.step = guided_step
        try:
            yield
        finally:
            del sched.step
            self.run_state = None

    # ---------------------------------------------------------------- guidance
    def _pre_forward(self, unet, args, kwargs):
        run = self.run_state
        if run is None or run.in_guidance:
            return None
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        run.t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        run.latent_hw = tuple(sample.shape[-2:])
        if not run.structure:
            return None
        z = self._guide(unet, run, sample, args, kwargs)
        channels = z.shape[1]
        new = torch.cat([z.expand(sample.shape[0], -1, -1, -1).to(sample.dtype), sample[:, channels:]], dim=1)
        return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "sample": new})

    def _guide(self, unet, run: _Run, sample, args, kwargs) -> torch.Tensor:
        """One Attend-and-Excite-style update of the conditional latent."""
        batch = sample.shape[0]
        cond = slice(batch - 1, batch)  # rows are [uncond, cond]
        channels = self.pipe.vae.config.latent_channels
        z = sample[cond, :channels].detach().float().requires_grad_(True)
        c_args = tuple(_rows(a, cond, batch) for a in args[1:])
        c_kwargs = {k: _rows(v, cond, batch) for k, v in kwargs.items() if k != "sample"}
        c_kwargs["return_dict"] = False
        run.cross_maps, run.storing, run.in_guidance = [], True, True
        try:
            with torch.enable_grad():  # the pipeline runs under no_grad
                x = torch.cat([z.to(sample.dtype), sample[cond, channels:]], dim=1)
                unet(x, *c_args, **c_kwargs)  # full forward, every cross map stored
                loss = self._steer_loss(run)
                grad = torch.autograd.grad(loss, z)[0]
        finally:
            run.storing, run.in_guidance = False, False
            run.cross_maps = []
        timesteps = [float(v) for v in self.pipe.scheduler.timesteps]
        k = timesteps.index(run.t) if run.t in timesteps else 0
        alpha = self.settings.step_size * math.sqrt(1.0 - 0.5 * k / max(len(timesteps) - 1, 1))
        z = (z - alpha * grad).detach()
        run.guided = z
        return z

    def _steer_loss(self, run: _Run) -> torch.Tensor:
        """Eq. 8-9 on the read grids (maps averaged over heads and the sites of each grid)."""
        s = self.settings
        losses = []
        for level in self._read_levels:
            maps = [p for lv, p in run.cross_maps if lv == level]
            if not maps:
                continue
            a = torch.stack(maps).float().mean(dim=(0, 2))[0]  # [HW, 77]
            a = (a[:, 1:] * s.token_scale).softmax(dim=-1)
            m = run.mask_at(level, a.device, a.dtype)
            hw = m.numel()
            total = a.new_zeros(())
            for i in run.tokens:
                score = (m * torch.log(1 - a[:, i - 1] + s.eps)).sum() / hw
                total = total - torch.log(-torch.expm1(score))
            losses.append(total)
        return torch.stack(losses).mean()
