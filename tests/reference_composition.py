"""Naive composition of strategies, written from their literal equations.

At one self-attention site, for one batch row with query/key/value ``q, K, V`` (float64)::

    keys   = [K ; lambda K~ (every kv_bank instance active here, in instance order)]   (Eq. 10-11)
    values = [V ; V~ ...]
    A      = softmax(q keys^T * scale)                                   explicit, all keys
    W      = product of the literal HW x HW weights of every reweighting instance here
             (region_mask: M^M^T + (1-M^)(1-M^)^T, Eq. 4-7; region_boost: 1 w^T) on own keys,
             1 on appended keys (the documented op contract)
    A'     = W ⊙ A, rows divided by their sums if any instance renormalizes
    out    = A' values

With a ``curves`` probe in ``config["probes"]``, the main pass records, for the conditional
rows and the masked queries, the literal measurements of the effective weights ``A'`` (shares
of unmasked own keys and of appended keys, row mass, the feature gaps of ``A' values``; at
cross sites the object tokens' mass and share), as ``NaiveRun.measured``.

Cross-attention sites compute a plain explicit softmax; in the guidance pass the maps at
latent_guidance's read sites are recorded and the steer loss is computed literally
(``steer_loss_literal``, checked against ``reference_guidance``'s loop form), its gradient by autograd, and
z <- z - alpha_k grad. Gates are literal windows ``min <= t/T < max``. Nothing here is
shared with the fast path except site selection (``attnctl.select_sites``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F

import reference_guidance as ref_g
from attnctl import describe_sites, select_sites


def steer_loss_literal(maps: list[tuple[torch.Tensor, tuple[int, int]]], masks: dict, tokens: list[int],
                       token_scale: float = 100.0, eps: float = 1e-4) -> torch.Tensor:
    """Eq. 8-9 for one image, the explicit product over patches written as ``torch.prod``.

    ``maps``: ([h, HW, 77] probabilities, grid) per read site. Per grid: average over heads and
    sites; per patch drop the start token, x token_scale, softmax over tokens; per token i
    ``-log(max(1 - prod_j (1 - A_ij + eps)^(M_j / HW), eps))``, summed over the prompt's tokens;
    the loss is the mean over grids (0 for a grid without masked patches).
    """
    per_grid = []
    for grid in sorted({g for _, g in maps}):
        same = [p for p, g in maps if g == grid]
        a = sum(p.mean(dim=0) for p in same) / len(same)  # [HW, 77]
        e = torch.exp(a[:, 1:] * token_scale)
        a = e / e.sum(dim=-1, keepdim=True)  # column c = text position c + 1
        m = masks[grid]
        hw = m.shape[0]
        if float(m.sum()) == 0:
            per_grid.append(torch.zeros((), dtype=torch.float64))
            continue
        prod = torch.prod((1 - a + eps) ** (m[:, None] / hw), dim=0)
        losses = -torch.log(torch.clamp(1 - prod, min=eps))
        per_grid.append(sum(losses[i - 1] for i in tokens))
    return sum(per_grid) / len(per_grid)

SELF_STRATEGIES = ("region_mask", "kv_bank", "region_boost")


def literal_masks(pixel_masks: torch.Tensor, latent_hw: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """Binary masks [K, HW] at ``grid``: binarize, nearest to the latent, nearest to the grid."""
    m = (pixel_masks.float() >= 0.5).float()
    m = F.interpolate(m, size=latent_hw, mode="nearest")
    return F.interpolate(m, size=grid, mode="nearest").flatten(1).double()


@dataclass
class NaiveRun:
    """Settings of one naive evaluation: the config, the batch and where we are in it."""

    config: dict
    images: list[int]  # image index per layout row
    cond_rows: list[int]
    pixel_masks: torch.Tensor  # [K, 1, H, W]
    tokens: list[list[int]]  # per image (one prompt per image here)
    latent_hw: tuple[int, int]
    num_train: int = 1000
    t: float = 0.0
    step_index: int = 0
    num_steps: int = 1
    pass_kind: str = "main"
    rows: list[int] = field(default_factory=list)
    records: list[tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=list)
    measured: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (quantity, site key, image)
    probe_sites: set[str] = field(default_factory=set)  # site keys a curves probe measures

    def probing(self, site) -> bool:
        """A curves probe measures ``site`` and this is the main pass."""
        return self.pass_kind == "main" and site.key in self.probe_sites

    def instances(self, strategy: str) -> list[tuple[str, dict]]:
        """Enabled instances of ``strategy`` active now (gates and passes), sorted by name."""
        out = []
        for name, settings in sorted(self.config["strategies"].items()):
            if settings.get("strategy", name) != strategy or not settings.get("enabled", True):
                continue
            if not self._open(name):
                continue
            out.append((name, settings))
        return out

    def _open(self, name: str) -> bool:
        t = self.t / self.num_train
        for settings in self.config["strategies"].values():
            if settings.get("strategy") != "timestep_gate":
                continue
            rule = settings.get("rules", {}).get(name)
            if rule is None:
                continue
            if rule.get("min") is not None and not t >= rule["min"]:
                return False
            if rule.get("max") is not None and not t < rule["max"]:
                return False
        return True


class NaiveSelf:
    """Literal composition at one self-attention site."""

    def __init__(self, run: NaiveRun, site, selected: dict[str, set[str]]):
        self.run, self.site, self.selected = run, site, selected

    def _here(self, strategy: str) -> list[tuple[str, dict]]:
        return [(n, s) for n, s in self.run.instances(strategy) if self.site.name in self.selected[n]]

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        run = self.run
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        d = q.shape[-1] // heads
        q, k, v = (x.view(b, n, heads, d).transpose(1, 2).double() for x in (q, k, v))
        grid = self.site.grid(run.latent_hw)
        masks = literal_masks(run.pixel_masks, run.latent_hw, grid)
        outs = []
        for i, row in enumerate(run.rows):
            m = masks[run.images[row] % masks.shape[0]]  # [HW]
            a, values = self._row(q[i], k[i], v[i], m, d**-0.5)
            outs.append(a @ values)
            if run.probing(self.site) and row in run.cond_rows:
                measure_self(run, self.site.key, run.images[row], a, outs[-1], m)
        out = torch.stack(outs).to(hidden_states.dtype)
        out = out.transpose(1, 2).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor

    def _row(self, q, k, v, m, scale):
        hw = m.shape[0]
        keys, values = [k], [v]
        for _, s in self._here("kv_bank"):
            keep = 1 - m
            if keep.sum() == 0:  # no unmasked token: no mean, no injection
                continue
            k_bar = (keep[None, :, None] * k).sum(1, keepdim=True) / keep.sum()
            v_bar = (keep[None, :, None] * v).sum(1, keepdim=True) / keep.sum()
            k_t = torch.where(keep[None, :, None] > 0, k, k_bar)  # Eq. 10
            v_t = torch.where(keep[None, :, None] > 0, v, v_bar)
            keys.append(s.get("scale", 1.4) * k_t)
            values.append(v_t)
        keys, values = torch.cat(keys, 1), torch.cat(values, 1)
        a = torch.softmax(q @ keys.transpose(-1, -2) * scale, dim=-1)  # [h, HW, N_all]
        w = torch.ones(hw, keys.shape[1], dtype=torch.float64)
        renormalize = False
        for _, s in self._here("region_mask"):
            tau = s.get("tau", 0.1)
            mh = (1 - tau) * m + tau / hw  # Eq. 7
            w[:, :hw] *= mh[:, None] * mh[None, :] + (1 - mh)[:, None] * (1 - mh)[None, :]  # Eq. 4-6
            renormalize |= bool(s.get("renormalize", False))
        for _, s in self._here("region_boost"):
            w[:, :hw] *= (1 + (s.get("gain", 2.0) - 1) * m)[None, :]
            renormalize = True
        a = w * a
        if renormalize:
            a = a / a.sum(-1, keepdim=True)
        return a, values


class NaiveCross:
    """Explicit-softmax cross-attention; records the maps the guidance loss reads."""

    def __init__(self, run: NaiveRun, site, read_by: set[str]):
        self.run, self.site, self.read_by = run, site, read_by

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q, k, v = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        d = q.shape[-1] // heads
        q, k, v = (x.view(b, -1, heads, d).transpose(1, 2).double() for x in (q, k, v))
        probs = torch.softmax(q @ k.transpose(-1, -2) * d**-0.5, dim=-1)
        run = self.run
        if run.probing(self.site):
            grid = self.site.grid(run.latent_hw)
            masks = literal_masks(run.pixel_masks, run.latent_hw, grid)
            for i, row in enumerate(run.rows):
                if row in run.cond_rows:
                    image = run.images[row]
                    measure_cross(run, self.site.key, image, probs[i], masks[image % masks.shape[0]], run.tokens[image])
        if run.pass_kind == "guidance" and any(name in self.read_by for name, _ in run.instances("latent_guidance")):
            run.records.append((probs, self.site.grid(run.latent_hw)))
        out = (probs @ v).to(hidden_states.dtype).transpose(1, 2).reshape(b, n, heads * d)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def measure_self(run: NaiveRun, site: str, image: int, a: torch.Tensor, out: torch.Tensor, m: torch.Tensor) -> None:
    """The curves probe's self-site quantities from the literal effective weights ``a`` [h, HW, N_all]."""
    hw = m.shape[0]
    inside = m > 0.5
    total = a.sum(-1)  # [h, HW]
    shares = {"background_share": (a[..., :hw] * (1 - m)).sum(-1) / total,
              "bank_share": a[..., hw:].sum(-1) / total, "row_mass": total}
    for name, value in shares.items():
        run.measured[(name, site, image)] = value[:, inside].mean().item()
    features = out.transpose(0, 1).reshape(hw, -1)  # [HW, heads * d]
    fin, fout = features[inside], features[~inside]
    run.measured[("mean_gap", site, image)] = (fin.mean(0) - fout.mean(0)).pow(2).mean().sqrt().item()
    std_gap = fin.std(0, unbiased=False) - fout.std(0, unbiased=False)
    run.measured[("std_gap", site, image)] = std_gap.pow(2).mean().sqrt().item()


def measure_cross(run: NaiveRun, site: str, image: int, probs: torch.Tensor, m: torch.Tensor, tokens: list[int]) -> None:
    """The curves probe's cross-site quantities from the literal map ``probs`` [h, HW, 77]."""
    inside = m > 0.5
    mass = probs[..., tokens].sum(-1)
    run.measured[("object_mass", site, image)] = mass[:, inside].mean().item()
    run.measured[("object_share", site, image)] = (mass / probs[..., 1:].sum(-1))[:, inside].mean().item()


class NaiveComposer:
    """Puts literal processors on every site of ``unet`` and evaluates one step literally."""

    def __init__(self, unet, run: NaiveRun):
        self.unet, self.run = unet, run
        self.sites = describe_sites(unet)
        strategies = run.config["strategies"]
        self.selected = {
            name: {s.name for s in select_sites(settings["sites"], self.sites)}
            for name, settings in strategies.items() if settings.get("strategy") in SELF_STRATEGIES
        }
        self.read = {
            name: {s.name for s in select_sites(settings.get("read_sites", "cross/4,cross/2"), self.sites)}
            for name, settings in strategies.items() if settings.get("strategy") == "latent_guidance"
        }
        curves = [p for p in run.config.get("probes", {}).values() if p.get("enabled") and p.get("strategy") == "curves"]
        run.probe_sites = {s.key for p in curves
                           for selector in (p.get("self_sites", "self"), p.get("cross_sites", "cross/4,cross/2"))
                           for s in select_sites(selector, self.sites)}

    @contextmanager
    def installed(self) -> Iterator[None]:
        saved = dict(self.unet.attn_processors)
        for site in self.sites:
            module = self.unet.get_submodule(site.name)
            if site.kind == "self":
                module.set_processor(NaiveSelf(self.run, site, self.selected))
            else:
                module.set_processor(NaiveCross(self.run, site, {n for n, r in self.read.items() if site.name in r}))
        try:
            yield
        finally:
            self.unet.set_attn_processor(saved)

    def step(self, sample: torch.Tensor, t: float, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(noise prediction of the main pass, guided latent z or None) for one step."""
        run = self.run
        run.t = t
        z_new = None
        with self.installed():
            guidance = run.instances("latent_guidance")
            if guidance:
                (_, settings), = guidance
                z_new = self._guide(sample, t, emb, settings)
                rows_z = z_new.detach()[[run.cond_rows.index(self._cond_row_of(img)) for img in run.images]]
                sample = torch.cat([rows_z.to(sample.dtype), sample[:, 4:]], dim=1)
            run.pass_kind, run.rows = "main", list(range(sample.shape[0]))
            with torch.no_grad():
                eps = self.unet(sample, t, encoder_hidden_states=emb).sample
        return eps, z_new

    def _cond_row_of(self, image: int) -> int:
        return next(r for r in self.run.cond_rows if self.run.images[r] == image)

    def _guide(self, sample, t, emb, settings: dict[str, Any]) -> torch.Tensor:
        run = self.run
        cond = run.cond_rows
        z = sample[cond, :4].detach().double()
        alpha = ref_g.alpha_reference(settings.get("step_size", 20.0), run.num_steps, run.step_index)
        for _ in range(settings.get("iterations", 1)):
            z = z.detach().requires_grad_(True)
            run.pass_kind, run.rows, run.records = "guidance", list(cond), []
            with torch.enable_grad():
                self.unet(torch.cat([z.float(), sample[cond, 4:]], 1), t, encoder_hidden_states=emb[cond])
                images = [run.images[r] for r in cond]
                per_image = [[(p[i], grid) for p, grid in run.records] for i in range(len(cond))]
                grids = {grid for _, grid in run.records}
                masks = [{g: literal_masks(run.pixel_masks, run.latent_hw, g)[img % run.pixel_masks.shape[0]]
                          for g in grids} for img in images]
                loss = sum(steer_loss_literal(maps, mask, run.tokens[img])
                           for maps, mask, img in zip(per_image, masks, images))
            grad = torch.autograd.grad(loss, z)[0]
            z = z.detach() - alpha * grad
        return z.float()
