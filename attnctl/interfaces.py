"""What ops see of a run and of a guidance pass, as protocols.

Ops and the attention call they act on sit at the bottom of the engine; the run state,
the guidance context and the controller sit above them. These protocols are the part of
the upper objects an op may use, so the lower layer names no module above it
(``attnctl.run_state.RunState`` and ``attnctl.guidance.GuidanceContext`` implement them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ContextManager, Hashable, Protocol, Sequence

if TYPE_CHECKING:
    import torch

    from attnctl.layout import BatchLayout
    from attnctl.sites import Site


class RunView(Protocol):
    """The run state as ops and gates read it (one object per pipeline call)."""

    layout: BatchLayout
    token_indices: list[list[int]]
    prompts: list[str]
    tokenizer: Any
    num_train_timesteps: int
    step_index: int | None
    timestep: float | None
    pass_kind: str
    latent_hw: tuple[int, int] | None
    #: (text, image) tokens of the current transformer call's joint attention; (0, 0) on a UNet
    tokens: tuple[int, int]
    text_start_token: bool
    rotary: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def t_norm(self) -> float | None: ...

    @property
    def num_inference_steps(self) -> int | None: ...

    @property
    def in_guidance(self) -> bool: ...

    @property
    def rows(self) -> tuple[int, ...]: ...

    @property
    def row_layout(self) -> BatchLayout: ...

    def grid(self, site: Site) -> tuple[int, int]: ...

    def mask(self, level: int) -> torch.Tensor: ...

    def masks_for_rows(self, level: int, rows: Sequence[int], device: Any = None) -> torch.Tensor: ...

    def row_mask(self, site: Site, device: Any = None) -> torch.Tensor: ...

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any: ...

    def scratch_for(self, instance: str) -> dict[str, Any]: ...

    def publish(self, instance: str, result: Any) -> None: ...

    def guidance_pass(self, rows: Sequence[int]) -> ContextManager[None]: ...

    def block_input(self, site: Site) -> Any: ...

    def input_mask(self, image: int = 0) -> torch.Tensor: ...


class GuidanceView(Protocol):
    """What a latent op gets besides z: the run state and a conditional denoiser."""

    state: RunView
    timestep: float | None

    def denoise_cond(self, z: torch.Tensor, stop_after: Site | None = None) -> torch.Tensor | None: ...
