"""Attach, run, detach.

``attach(pipe, config)`` describes the sites of ``pipe.unet``, compiles the config into a
plan, and wraps every site's processor (through its adapter, see ``attnctl.adapters``).
``Controller.run(...)`` is the context in which the pipeline is called: it creates the
run state, follows the steps through a UNet forward pre-hook (wrapping any processor a
pipeline swapped in, e.g. PAG's), applies latent guidance, adds the rows strategies asked
for (``attnctl.rows``) and takes them out again in a forward hook, runs the step ops
around ``scheduler.step`` (``attnctl.step_ops``), and drops the state at the end.
``detach()`` puts the very same processor objects back.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch

from attnctl.adapters import AdapterRegistry, ProcessorAdapter
from attnctl.backbones import UNET, Backbone, denoiser_of, find_backbone
from attnctl.block_context import block_recorder, blocks_needed
from attnctl.feature_ops import feature_hook, feature_modules
from attnctl.errors import AttnctlError, ConfigError, ProcessorReplacedError, RunError, UnsupportedModelError
from attnctl.guidance import GuidanceContext, UNetCall
from attnctl.plan import Plan
from attnctl.planning import compile_plan
from attnctl.plugins import StrategyManager
from attnctl.processor import ControlledProcessor, RunSlot, innermost, make_processor
from attnctl.run_report import idle_instances, warn_idle_instances, warn_sites_not_run
from attnctl.layout import BatchLayout, prompt_token_indices
from attnctl.row_driver import RowDriver, StepContext, main_output, pipeline_guidance_scale
from attnctl.run_state import RunState
from attnctl.sites import SiteTable
from attnctl.scheduler_hooks import wrap_scheduler
from attnctl.step_ops import GuidanceTermOp, PredictionOp
from attnctl.transformer_guidance import guide_transformer_call


class Controller:
    """Attention control attached to one UNet (and, if given, its pipeline's scheduler).

    Use ``attnctl.attach`` to make one. Usable as a context manager that detaches on exit.
    """

    def __init__(self, unet: torch.nn.Module, plan: Plan, manager: StrategyManager, scheduler: Any = None,
                 adapters: AdapterRegistry | None = None, pipe: Any = None, backbone: Backbone = UNET):
        self.unet = unet  # the denoising network: a UNet or a transformer (``backbone`` says which)
        self.backbone = backbone
        if backbone.is_transformer:
            _refuse_unet_only(plan, backbone)
        self.pipe = pipe
        self.plan = plan
        self.sites: SiteTable = plan.sites
        self.manager = manager
        self.scheduler = scheduler
        self.adapters = adapters or AdapterRegistry()
        self.slot = RunSlot()
        self._modules = {s.name: unet.get_submodule(s.name) for s in self.sites}
        self.processors: dict[str, ControlledProcessor] = {}
        wrappers = {}
        for site in self.sites:
            current = self._modules[site.name].processor
            if isinstance(current, ControlledProcessor) and current.slot.attached:
                raise ConfigError("this UNet already has an attnctl controller attached; detach it first")
            # wrappers of a detached controller can come back (e.g. unfuse_qkv_projections restores them)
            wrappers[site.name] = self._wrap(site, innermost(current))
        for name, wrapper in wrappers.items():
            self._install(name, wrapper)
        self._hook = unet.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        self._post_hook = unet.register_forward_hook(self._post_forward)
        self._module_hooks = []
        for name in blocks_needed(plan.site_ops, self.sites):  # only where an op reads its block
            module = unet.get_submodule(name)
            hook = block_recorder(name, module, lambda: self.slot.state)
            self._module_hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        rotary = backbone.rotary_module if backbone.is_transformer else None
        if rotary and any(op.needs_rotary() for ops in plan.site_ops.values() for op in ops):
            self._module_hooks.append(unet.get_submodule(rotary).register_forward_hook(self._keep_rotary))
        for name, ops in feature_modules(plan.feature_ops, unet).items():  # only where a feature op acts
            module = unet.get_submodule(name)
            self._module_hooks.append(module.register_forward_hook(feature_hook(name, ops, lambda: self.slot.state)))
        self._rows: RowDriver | None = None

    @property
    def state(self) -> RunState | None:
        """The run in progress, or None."""
        return self.slot.state

    @state.setter
    def state(self, value: RunState | None) -> None:
        self.slot.state = value

    @property
    def attached(self) -> bool:
        return self.slot.attached

    # ------------------------------------------------------------------ processors
    def _wrap(self, site, original: Any) -> ControlledProcessor:
        adapter = self.adapters.find(original)
        if adapter is None and site.name in self.plan.site_ops:
            instances = sorted({op.strategy for op in self.plan.site_ops[site.name]})
            raise self.adapters.refusal(site, original, instances)
        return make_processor(self.slot, site, original, adapter)

    def _install(self, name: str, wrapper: ControlledProcessor) -> None:
        self._modules[name].set_processor(wrapper)
        self.processors[name] = wrapper

    def sync_processors(self) -> None:
        """Wrap processors that were put on sites since attach (fused, sliced, PAG's, a user's).

        Called at run start and before every main UNet call, so processors a pipeline swaps
        in during its call (PAG does) are controlled too. A processor without an adapter at
        a site where a strategy acts raises ``UnsupportedProcessorError``.
        """
        if not self.attached:
            raise ProcessorReplacedError("this controller was detached; call attnctl.attach(...) again")
        for name, module in self._modules.items():
            current = module.processor
            if current is self.processors[name]:
                continue
            if isinstance(current, ControlledProcessor):
                if current.slot is self.slot:  # one of ours, put back (e.g. by PAG at the end of its call)
                    self.processors[name] = current
                    continue
                if current.slot.attached:
                    raise ConfigError(f"{name}: a second attnctl controller was attached over this one; detach it")
            self._install(name, self._wrap(self.sites.by_name(name), innermost(current)))

    # ------------------------------------------------------------------ lifecycle
    def detach(self) -> None:
        """Put back what each wrapper runs and remove every hook. Idempotent.

        Sites whose wrapper was replaced by someone else since keep that processor.
        """
        if not self.attached:
            return
        self._hook.remove()
        self._post_hook.remove()
        for hook in self._module_hooks:
            hook.remove()
        for name, module in self._modules.items():
            current = module.processor
            if isinstance(current, ControlledProcessor) and current.slot is self.slot:
                module.set_processor(current.original)
        self.slot.attached = False
        self.slot.state = None

    def __enter__(self) -> Controller:
        return self

    def __deepcopy__(self, memo: dict) -> Controller:
        # reached when a UNet is copied with this controller's hook on it
        raise AttnctlError(
            "cannot copy a model while attnctl is attached to it; call controller.detach() first, copy, "
            "then attach to each copy"
        )

    def __exit__(self, *exc) -> None:
        self.detach()

    # ------------------------------------------------------------------ runs
    @contextmanager
    def run(
        self,
        layout: BatchLayout,
        mask: Any = None,
        token_indices: Sequence[Sequence[int]] = (),
        num_train_timesteps: int | None = None,
        prompts: Sequence[str] = (),
    ) -> Iterator[RunState]:
        """Context for one pipeline call: ``with ctl.run(layout, mask): pipe(...)``.

        Args:
            layout: batch layout of the pipeline's UNet calls (see ``BatchLayout.for_pipeline``).
            mask: inpainting mask(s), 1 = region to inpaint: a tensor / array ``[H, W]`` (or
                ``[K, H, W]``), a PIL image (white = inpaint), or a list, one per image (see ``RunState``).
            token_indices: per prompt, positions of the prompt's own tokens.
            num_train_timesteps: T_train; default: the scheduler's ``num_train_timesteps``.
            prompts: the prompt texts, by prompt index (strategies that map words to tokens,
                such as Prompt-to-Prompt, need them).
        """
        self.sync_processors()
        if self.state is not None:
            raise RunError("a run is already active on this controller; runs cannot be nested")
        if getattr(self.unet, "is_cache_enabled", False) and not self.plan.is_idle:
            raise ConfigError(
                f"the {type(self.unet).__name__} has a cache enabled (enable_cache: FirstBlockCache, "
                "PyramidAttentionBroadcast, ...), which skips or reuses blocks on some steps, so the strategies' "
                "ops would not run there; call disable_cache() while strategies act"
            )
        if self.plan.latent_ops and self.scheduler is None:
            raise ConfigError(
                "latent guidance needs the pipeline's scheduler; attach to the pipeline "
                "(attnctl.attach(pipe, ...)), not to the bare UNet"
            )
        if num_train_timesteps is None:
            num_train_timesteps = getattr(getattr(self.scheduler, "config", None), "num_train_timesteps", 1000)
        token_indices = [list(t) for t in token_indices]
        prompts = list(prompts)
        full_layout = self._with_rows(layout, token_indices, prompts)
        state = RunState(
            self.plan,
            full_layout,
            mask=mask,
            token_indices=token_indices,
            num_train_timesteps=num_train_timesteps,
            timesteps=_LazyTimesteps(self.scheduler),
        )
        state.prompts = prompts
        state.tokenizer = getattr(self.pipe, "tokenizer", None)
        state.text_start_token = self.backbone.text_start_token
        self.state = state
        self._rows = None
        needs_scheduler = self.plan.latent_ops or self.plan.rows or self.plan.step_ops
        if needs_scheduler and self.scheduler is None:
            raise ConfigError(
                "strategies that add rows or act on the denoising loop need the pipeline's scheduler; attach to "
                "the pipeline (attnctl.attach(pipe, ...)), not to the bare UNet"
            )
        restore = (wrap_scheduler(self.scheduler, state, self._step_context) if needs_scheduler
                   else (lambda: None))
        try:
            self.manager.hook.attnctl_run_start(state=state, plan=self.plan)
            yield state
            warn_sites_not_run(state, {n: m.processor for n, m in self._modules.items()})
        finally:
            restore()
            self._rows = None
            try:
                self.manager.hook.attnctl_run_end(state=state, plan=self.plan)
            finally:
                self.state = None

    def _with_rows(self, layout: BatchLayout, token_indices: list[list[int]], prompts: list[str]) -> BatchLayout:
        """``layout`` plus the rows the plan adds; their prompts join ``prompts`` and their own tokens ``token_indices``."""
        if not self.plan.rows:
            return layout
        if "perturbed" in layout.branches:
            raise ConfigError(
                f"{', '.join(f'strategies.{i}' for i, _ in self.plan.rows)} add rows to the batch, which "
                "perturbed-attention guidance (PAG) pipelines cannot take: their processors split the batch in "
                "three equal parts; use the pipeline without PAG (or pag_scale=0)"
            )
        roles = []
        for _, spec in self.plan.rows:
            prompt_index = None
            if spec.prompt is not None:
                prompt_index = max(len(token_indices), len(prompts), layout.prompts[-1] + 1 if layout.prompts else 0)
                while len(token_indices) < prompt_index:
                    token_indices.append([])
                while len(prompts) < prompt_index:
                    prompts.append("")
                tokenizer = getattr(self.pipe, "tokenizer", None)
                token_indices.append([] if tokenizer is None else prompt_token_indices(tokenizer, spec.prompt))
                prompts.append(spec.prompt)
            roles.append((spec.role, spec.per_image, prompt_index, spec.branches))
        return layout.with_rows(roles)

    # ------------------------------------------------------------------ per UNet call
    def _pre_forward(self, unet, args: tuple, kwargs: dict):
        state = self.state
        if state is None:
            if not self.plan.is_idle:
                self.sync_processors()
                raise ConfigError(
                    "attnctl strategies are attached but the pipeline was called outside a run; call it "
                    "inside `with controller.run(layout, mask): pipe(...)` (or use harmonpaint_recipe.inpaint)"
                )
            return None
        if state.in_side_pass:
            return None
        self.sync_processors()
        if self.backbone.is_transformer:
            return self._pre_transformer(unet, state, args, kwargs)
        call = UNetCall(unet, args, kwargs)
        timestep = call.get("timestep")
        t = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else float(timestep)
        sample = call.get("sample")
        if sample.shape[0] != len(state.layout.main_rows):
            raise ConfigError(
                f"the run's BatchLayout has {state.layout.describe()}, but the UNet got a batch of "
                f"{sample.shape[0]}; build it with attnctl.BatchLayout.for_call(pipe, prompt=..., "
                "num_images_per_prompt=..., guidance_scale=...), which follows the pipeline's own rules "
                "(classifier-free guidance, PAG's perturbed rows)"
            )
        first = state.timestep is None
        state.begin_step(t, latent_hw=tuple(sample.shape[-2:]))
        if first:
            self._preview_gates(state, t)
        own = state.scratch_for("_attnctl")
        unscaled = own.get("scale_inputs", {}).get(sample.shape[0])  # before guidance clears it
        if self.plan.rows:
            if self._rows is None:
                self._rows = RowDriver(state, self.plan.rows, self.pipe, self.scheduler, own.get("scale"))
            call, unscaled = self._rows.begin(call, unscaled)  # inversions; main rows that start from one
        guided = self._guide(state, call, t) if state.active_latent_ops else None
        if not self.plan.rows:
            return guided
        if guided is not None:
            call = UNetCall(unet, *guided)
        return self._rows.extend(call, t, unscaled)

    def _keep_rotary(self, module, args, output) -> None:
        """The rotary embedding of the current call, for ops that read it (``call.image_rotary()``)."""
        if self.state is not None:
            self.state.rotary = output

    def _pre_transformer(self, model, state: RunState, args: tuple, kwargs: dict) -> None:
        """Before a transformer call: the step (by the scheduler's index), the latent size, the token segments."""
        info = self.backbone.call_info(model, args, kwargs)
        if info.batch != len(state.layout.main_rows):
            raise ConfigError(
                f"the run's BatchLayout has {state.layout.describe()}, but the transformer got a batch of "
                f"{info.batch}; build it with attnctl.BatchLayout.for_call(pipe, prompt=..., "
                "num_images_per_prompt=..., guidance_scale=...), which follows the pipeline's own rules"
            )
        index, t = _scheduler_step(self.scheduler, info.timestep)
        first = state.timestep is None
        state.tokens = (info.text_tokens, info.image_tokens)
        state.begin_step(t, latent_hw=info.latent_hw, step_index=index)
        if first:
            self._preview_gates(state, t)
        if state.active_latent_ops:
            if torch.is_inference_mode_enabled():
                raise RunError(_INFERENCE_MODE)
            return guide_transformer_call(state, model, self.backbone, args, kwargs)
        return None

    def _post_forward(self, unet, args, output):
        """After a main UNet call: step the added rows, apply the prediction op and guidance terms, return the main rows."""
        state = self.state
        if state is None or state.in_side_pass:
            return None
        prediction = next((op for op in state.active_step_ops if isinstance(op, PredictionOp)), None)
        terms = tuple(op for op in state.active_step_ops if isinstance(op, GuidanceTermOp))  # in instance order
        if self._rows is not None:
            return self._rows.split(output, prediction, self._step_context(state), terms)
        if prediction is not None or terms:
            return main_output(output, len(state.layout), prediction, self._step_context(state), terms)
        return None

    def _step_context(self, state: RunState) -> StepContext:
        return StepContext(state, state.timestep, pipeline_guidance_scale(self.pipe), self._rows)

    def _preview_gates(self, state: RunState, t: float) -> None:
        """Warn now about strategies whose gates are closed for the rest of the run."""
        schedule = [float(v) for v in state._timesteps]
        if t not in schedule:
            return
        remaining = schedule[schedule.index(t):]
        idle = idle_instances(self.plan, state.layout, schedule, remaining, state.num_train_timesteps)
        warn_idle_instances(self.plan, idle, remaining, state.num_train_timesteps)

    def _guide(self, state: RunState, call: UNetCall, t: float):
        sample = call.get("sample")
        own = state.scratch_for("_attnctl")
        recorded, scale = own.get("scale_inputs", {}).get(sample.shape[0]), own["scale"]
        if recorded is None:
            raise UnsupportedModelError(
                "latent guidance could not find this step's latents (the pipeline did not call "
                "scheduler.scale_model_input on the UNet's batch before the UNet); this pipeline is not supported"
            )
        if torch.is_inference_mode_enabled():
            raise RunError(_INFERENCE_MODE)
        channels = recorded.shape[1]
        layout = state.layout
        cond = torch.tensor(layout.cond_rows, device=recorded.device)
        z = recorded.index_select(0, cond).detach()
        # ops work in UNet-input space x = c * z (c = 1 for DDIM, 1/sqrt(sigma^2+1) for Euler-type
        # schedulers), so a step size means the same whatever the scheduler
        c = scale(torch.ones_like(z[:1]), t)
        x = scale(z, t)
        ctx = GuidanceContext(state, call, channels)
        for op in state.active_latent_ops:
            x = op.guide(x, ctx).detach()
        state.pending_latents = x / c  # back to the scheduler's sample space for scheduler.step
        images = torch.tensor([layout.images[r] for r in layout.main_rows], device=x.device)
        x = x.index_select(0, images).to(sample.dtype)
        new_sample = torch.cat([x, sample[:, channels:]], dim=1) if sample.shape[1] > channels else x
        own["scale_inputs"] = {}
        return call.with_sample(new_sample)


_INFERENCE_MODE = ("latent guidance needs gradients, but the pipeline runs under torch.inference_mode(); "
                   "call it under torch.no_grad() (what diffusers' pipelines use) or outside any grad mode")


def _scheduler_step(scheduler: Any, timestep: float) -> tuple[int | None, float]:
    """The step index from the scheduler's own state and that step's timestep from its schedule.

    A transformer may get the timestep rounded (FLUX casts t / 1000 to the latent dtype: in
    bf16, 666.67 comes back as 667.97), so the step is never found by comparing values.
    Schedulers without a step counter fall back to the value the call carried.
    """
    if scheduler is None or not hasattr(scheduler, "step_index"):
        return None, timestep
    index = scheduler.step_index
    if index is None:
        index = getattr(scheduler, "begin_index", None) or 0
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is None or index >= len(timesteps):
        return index, timestep
    return index, float(timesteps[index])


def _refuse_unet_only(plan: Plan, backbone: Backbone) -> None:
    """Refuse, naming them, the strategies whose machinery exists on UNets only so far."""
    unet_only = {
        "add rows to the batch": [i for i, _ in plan.rows],
        "act on non-attention modules (feature ops)": sorted({op.strategy for op in plan.feature_ops}),
        "act around the scheduler step (prediction, noise or post-step ops)":
            sorted({op.strategy for op in plan.step_ops}),
        "read the block holding a site": sorted({op.strategy for ops in plan.site_ops.values() for op in ops
                                                 if getattr(op, "needs_block", False)}),
    }
    for what, instances in unet_only.items():
        if instances:
            raise ConfigError(
                f"{', '.join(f'strategies.{i}' for i in instances)} {what}, which attnctl supports on UNets only so "
                f"far; this pipeline's network is a {backbone.name} transformer. Disable them for this model"
            )


class _LazyTimesteps:
    """The scheduler's timesteps, read when first needed (the pipeline sets them after run start)."""

    def __init__(self, scheduler: Any):
        self._scheduler = scheduler

    def __iter__(self):
        ts = getattr(self._scheduler, "timesteps", None)
        return iter(() if ts is None else ts)


def attach(
    target: Any,
    config: Any = None,
    manager: StrategyManager | None = None,
    adapters: Mapping[type | str, ProcessorAdapter] | None = None,
) -> Controller:
    """Attach attention control to a diffusers pipeline (or a bare UNet).

    Args:
        target: a pipeline with ``.unet`` (and ``.scheduler``), or a ``UNet2DConditionModel``.
        config: mapping with ``strategies: {instance: {strategy: type, enabled: bool, ...}}``
            and optionally ``probes: {...}`` (the same form; off unless ``enabled: true``;
            they may only observe or measure, their results are in the run state's
            ``results``); ``None`` attaches idle.
        manager: strategy plugin manager; default discovers plugins from entry points.
        adapters: processor class (or qualified class name) -> adapter, for attention
            processors of your own that strategies should act inside (see ``attnctl.adapters``).

    Returns:
        The ``Controller``; use it as a context manager or call ``detach()``.
    """
    unet = denoiser_of(target)
    if not isinstance(unet, torch.nn.Module):
        raise UnsupportedModelError(f"cannot attach to {type(target).__name__}: expected a diffusers pipeline, "
                                    "UNet or transformer")
    if hasattr(unet, "_orig_mod"):
        raise UnsupportedModelError(
            "the UNet was wrapped by torch.compile(); attach to the uncompiled UNet, then compile its "
            "forward: `ctl = attnctl.attach(pipe, cfg); pipe.unet.forward = torch.compile(pipe.unet.forward)`"
        )
    scheduler = getattr(target, "scheduler", None)
    manager = manager or StrategyManager.default()
    backbone = find_backbone(unet, manager.backbones())
    sites = backbone.describe_sites(unet)
    for site in sites:
        current = unet.get_submodule(site.name).processor
        if isinstance(current, ControlledProcessor) and current.slot.attached:
            raise ConfigError("this UNet already has an attnctl controller attached; detach it first")
    plan = compile_plan(config or {}, sites, manager)
    registry = AdapterRegistry(*manager.processor_adapters(), adapters or {})
    return Controller(unet, plan, manager, scheduler, registry, pipe=target if target is not unet else None,
                      backbone=backbone)
