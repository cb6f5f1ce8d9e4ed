"""Random-weight models for tests, smoke runs and measurements: nothing here is downloaded.

- ``build_tiny_inpaint_pipeline(seed, kind="sd"|"sdxl")`` / ``save_tiny_inpaint_pipeline``:
  test-sized pipelines with SD 1.5's or SDXL's attention-site layout (their images are noise);
- ``build_inpaint_pipeline(PipelineSpec(...), seed)``: the one builder behind them, for any
  component configs (benchmarks build full-size architectures with it);
- ``build_unet(arch, device="meta")`` / ``load_unet_config(arch)``: the full-size UNets of
  SD 1.5, SD 2 and SDXL inpainting, from configs shipped with the package.
"""

from attnctl.testing.architectures import (
    DIT_CONFIGS,
    UNET_CONFIGS,
    build_transformer,
    build_unet,
    load_transformer_config,
    load_unet_config,
)
from attnctl.testing.pipelines import (
    SD_DDIM_SCHEDULER_CONFIG,
    PipelineSpec,
    build_inpaint_pipeline,
    byte_vocab,
    clip_byte_symbols,
    save_inpaint_pipeline,
    seeded,
    write_byte_tokenizer,
)
from attnctl.testing.tiny import (
    TINY_SD,
    TINY_SDXL,
    TINY_SDXL_UNET_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    build_tiny_inpaint_pipeline,
    save_tiny_inpaint_pipeline,
)

__all__ = [
    "SD_DDIM_SCHEDULER_CONFIG", "TINY_SD", "TINY_SDXL", "TINY_SDXL_UNET_CONFIG", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG",
    "DIT_CONFIGS", "UNET_CONFIGS", "PipelineSpec", "build_transformer", "load_transformer_config", "build_inpaint_pipeline", "build_tiny_inpaint_pipeline", "build_unet",
    "byte_vocab", "clip_byte_symbols", "load_unet_config", "save_inpaint_pipeline", "save_tiny_inpaint_pipeline", "seeded",
    "write_byte_tokenizer",
]
