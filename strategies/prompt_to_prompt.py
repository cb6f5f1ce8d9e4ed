"""``prompt_to_prompt``: Prompt-to-Prompt (Hertz et al. 2022), as the authors' code computes it.

A source image (``source_prompt``) is denoised beside each main image (the target prompt) from
the same initial latent. On the main images' conditional rows only:

- cross-attention, every site and step: ``A' = (A_src B) ⊙ c1 + A ⊙ c2`` column-wise, with ``B``
  the replace mapper ``M`` (word swap) or the refine gather ``P`` (words added), ``c1``/``c2``
  from the per-step word switch ``alpha``, refine's alphas and the reweight equalizer ``e``;
  computed fused as ``SDPA(Q_src, K_src, B diag(c1) V) + SDPA(Q, K, diag(c2) V)``, or with an
  explicit map at the local-blend sites, whose edited maps are summed over steps;
- self-attention at sites with at most ``self_max_tokens`` queries, during the first
  ``self_replace_steps`` of the steps: ``A' = A_src`` (queries and keys taken from the source);
- local blend, after each ``scheduler.step``: ``z <- z_src + m ⊙ (z - z_src)``, ``m`` the
  thresholded, max-pooled sum of the blend words' maps of source and target.

Quirks copied: the store holds the *edited* target maps, summed (not averaged) over steps; the
self window is ``[int(T s0), int(T s1))``; alpha has ``T + 1`` rows; reweight is not renormalized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import attnctl
from attnctl.errors import ConfigError, InputError
from attnctl.layout import MAIN_ROLE
from attnctl.ops import Branch, BranchOp, MapOp, ProjectionOp
from attnctl.params import StrategySpec
from attnctl.rows import RowOp, RowSpec
from attnctl.selectors import select_sites
from attnctl.step_ops import PostStepOp

# torch is imported where tensors are made: listing strategies must not load it

NAME = "prompt_to_prompt"
EDITS = ("replace", "refine", "reweight")


@dataclass
class PromptToPromptParams:
    """Parameters of ``prompt_to_prompt`` (defaults: the authors' notebook)."""

    source_prompt: str = field(default="", metadata={"help": "the source prompt; the main prompt is the edited one"})
    edit: str = field(default="replace", metadata={"help": "replace (word swap), refine (words added) or reweight"})
    cross_replace_steps: float = field(default=0.8, metadata={"help": "fraction of steps using the source's cross maps"})
    self_replace_steps: float = field(default=0.4, metadata={"help": "fraction of steps using the source's self maps"})
    self_max_tokens: int = field(default=256, metadata={"help": "self maps are replaced where queries <= this (16x16)"})
    equalizer: dict = field(default_factory=dict, metadata={"help": "word -> weight on its cross maps (reweight)"})
    blend_words: list = field(default_factory=list, metadata={"help": "local blend: [source word, target word]; [] = off"})
    blend_threshold: float = field(default=0.3, metadata={"help": "local blend: threshold of the normalized maps"})
    blend_sites: str = field(default="cross@down/4,cross@up/4", metadata={"help": "sites whose maps the blend sums"})
    keep_source: bool = field(default=False, metadata={"help": "keep the source image's final latent (row output)"})

    def __post_init__(self) -> None:
        if not self.source_prompt.strip():
            raise ConfigError("source_prompt is empty: give the prompt the edit starts from")
        if self.edit not in EDITS:
            raise ConfigError(f"edit must be one of {', '.join(EDITS)}, got {self.edit!r}")
        if self.blend_words and len(self.blend_words) != 2:
            raise ConfigError("blend_words: give [source word, target word] (or [] for no local blend)")


SPEC = StrategySpec(NAME, "Prompt-to-Prompt: edit by swapping, adding or reweighting words", PromptToPromptParams)


class _Edit:
    """Per-run tensors of one instance: the column factors of both terms and the source mapper."""

    def __init__(self, state: Any, p: PromptToPromptParams, role: str):
        import torch
        import torch.nn.functional as F

        from strategies import p2p_tokens as tok

        if state.tokenizer is None or not state.prompts:
            raise InputError(f"{NAME} needs the prompt texts and the tokenizer: attach to the pipeline and pass "
                             "prompts=[...] to controller.run (harmonpaint_recipe does)")
        source, target, t = p.source_prompt, state.prompts[0], state.tokenizer
        steps = state.num_inference_steps or 1
        alpha = tok.time_word_alpha(steps, p.cross_replace_steps, source, [target], t)[:, 0, 0, 0]  # [T+1, 77]
        e = tok.equalizer(target, p.equalizer, t) if p.equalizer else torch.ones(77)
        if p.edit == "refine":
            mapper, a_r = tok.refinement_mapper(source, target, t)
            self.mapper = F.one_hot(mapper, 77).T.float()  # P[i, j] = 1 where target token j takes source i
            self.c1, self.c2 = alpha * a_r * e, alpha * (1 - a_r) * e + (1 - alpha)
        else:
            self.mapper = tok.replacement_mapper(source, target, t) if p.edit == "replace" else torch.eye(77)
            self.c1, self.c2 = alpha * e, 1 - alpha
        self.role = role


def _prepare(op: Any, state: Any) -> None:
    """The run's tables (tokenizer work) once, and this step's column factors ``c1``, ``c2`` [77]:
    done eagerly before the step, so the attention call only reads tensors (and ``torch.compile``
    neither breaks on the tokenizer nor bakes the step index into its graph)."""
    scratch = state.scratch_for(op.strategy)
    if "edit" not in scratch:
        scratch["edit"] = _Edit(state, op.params, op.strategy)
    edit, i = scratch["edit"], state.step_index or 0
    scratch["c1"], scratch["c2"] = edit.c1[i], edit.c2[i]


def _edit(call: Any, op: Any) -> tuple[_Edit, Any, Any]:
    """The run's tables and this step's ``c1``, ``c2`` (see ``_prepare``)."""
    scratch = call.state.scratch_for(op.strategy)
    return scratch["edit"], scratch["c1"], scratch["c2"]


#: the rows P2P edits: the main images' conditional rows (``call.rows_of(*TARGET)``, ``call.on_rows(*TARGET)``)
TARGET = (MAIN_ROLE, "cond")


@dataclass(frozen=True)
class _SelfWindow:
    """Gate of the self-map replacement: step index < int(T * fraction) (the authors' window from step 0)."""

    fraction: float

    def __call__(self, state: Any) -> bool:
        i = state.step_index
        return i is not None and i < int((state.num_inference_steps or 1) * self.fraction)

    def __str__(self) -> str:
        return f"step < int(T * {self.fraction})"


@dataclass(eq=False)
class CrossEdit(BranchOp):
    """The cross edit as two fused terms on the target rows."""

    params: Any = field(default=None, kw_only=True)

    def prepare(self, state):
        _prepare(self, state)

    def main_weight(self, call):
        return 1 - call.on_rows(*TARGET).to(call.value.dtype)

    def branches(self, call):
        import torch

        (ed, c1, c2), on = _edit(call, self), call.on_rows(*TARGET).to(call.value.dtype)
        c1, c2 = c1.to(call.value), c2.to(call.value)
        v_src = torch.einsum("ij,bhjd->bhid", ed.mapper.to(call.value) * c1, call.value)
        rows = tuple(call.rows_of(*TARGET))
        return [Branch(on, query=call.take(call.query, ed.role), key=call.take(call.key, ed.role), value=v_src, rows=rows),
                Branch(on, value=c2[:, None] * call.value, rows=rows)]


@dataclass(eq=False)
class CrossEditStored(MapOp):
    """The same edit on the explicit map at a blend site; the edited conditional maps are summed over steps."""

    params: Any = field(default=None, kw_only=True)

    def prepare(self, state):
        _prepare(self, state)

    def edit_probs(self, call, queries, probs):
        (ed, c1, c2), on = _edit(call, self), call.on_rows(*TARGET)
        source = call.take(probs, ed.role)
        edited = (source @ ed.mapper.to(probs)) * c1.to(probs) + probs * c2.to(probs)
        return on * edited + (1 - on) * probs

    def read(self, call, queries, probs):
        # this step's maps only, under the same keys every step: the local blend moves them into its
        # sums eagerly after the step, so a compiled forward always finds the store as it left it
        cond = [k for k, b in enumerate(call.layout.branches) if b == "cond"]
        key = tuple(call.rows[k] for k in cond)
        call.state.store(self.strategy).put((key, call.site.key), probs[cond].mean(1).detach())


@dataclass(eq=False)
class SelfEdit(ProjectionOp):
    """Target rows take the source's queries and keys: ``A' = A_src`` (values stay their own)."""

    params: Any = field(default=None, kw_only=True)

    def prepare(self, state):
        _prepare(self, state)

    def project(self, call):
        ed = _edit(call, self)[0]
        if call.query.shape[-2] > self.params.self_max_tokens:  # the grid depends on the run's size: checked here
            return
        rows = call.rows_of(*TARGET)
        # clones keep the tensors' strides, so the other rows run the very kernel they ran before
        query, key = call.query.clone(), call.key.clone()
        query[rows], key[rows] = call.take(call.query, ed.role)[rows], call.take(call.key, ed.role)[rows]
        call.set_query(query)
        call.set_own_kv(key=key)


@dataclass(eq=False)
class LocalBlend(PostStepOp):
    """``z <- z_src + m ⊙ (z - z_src)``, ``m`` from the summed maps of the blend words (source OR target)."""

    params: Any = field(default=None, kw_only=True)

    def apply(self, latents, ctx):
        import torch
        import torch.nn.functional as F

        from strategies import p2p_tokens as tok

        state, p = ctx.state, self.params
        step, store = state.store(self.strategy), state.store(f"{self.strategy}/blend")
        for key in step.keys():  # this step's maps join the sums over steps
            store.add(key, step.pop(key))
        sums = [store.get(k) for k in store.keys()]
        if not sums:
            return latents
        rows = store.keys()[0][0]
        words = [tok.word_token_positions(state.prompts[state.layout.prompts[r]], p.blend_words[
            0 if state.layout.roles[r] != "main" else 1], state.tokenizer) for r in rows]
        masks = []
        for k, r in enumerate(rows):  # [sites, HW, 77] per row -> word mass [HW] -> mask at the latent size
            maps = torch.stack([s[k] for s in sums])[..., words[k]].sum(-1).mean(0)
            side = int(round(maps.numel() ** 0.5))
            m = F.max_pool2d(maps.reshape(1, 1, side, -1), 3, 1, padding=1)
            m = F.interpolate(m, size=latents.shape[-2:])
            masks.append(m / m.amax(dim=(2, 3), keepdim=True) > p.blend_threshold)
        src = ctx.row_latents(self.strategy)
        out = latents.clone()
        for image in range(latents.shape[0]):
            pair = [masks[k] for k, r in enumerate(rows) if state.layout.images[r] == image]
            m = (pair[0] | pair[1]).float()[0].to(latents)
            out[image] = src[image] + m * (latents[image] - src[image])
        return out


@attnctl.hookimpl
def attnctl_add_strategies():
    return [SPEC]


@attnctl.hookimpl
def attnctl_plan(instance: str, spec: StrategySpec, params: PromptToPromptParams, sites):
    if spec.name != NAME:
        return None
    blend = {s.name for s in select_sites(params.blend_sites, sites)} if params.blend_words else set()
    ops: list[Any] = [RowOp(instance, row=RowSpec(instance, prompt=params.source_prompt, output=params.keep_source))]
    window = _SelfWindow(params.self_replace_steps)
    for site in sites:
        if site.kind == "self":
            ops.append(SelfEdit(instance, site=site, params=params, gates=(window,)))
        else:
            ops.append((CrossEditStored if site.name in blend else CrossEdit)(instance, site=site, params=params))
    if blend:
        ops.append(LocalBlend(instance, params=params))
    return ops
