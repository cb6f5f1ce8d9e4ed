"""Random-weight models for tests, smoke runs and measurements: nothing here is downloaded.

- ``build_tiny_inpaint_pipeline(seed, kind="sd"|"sdxl")`` / ``save_tiny_inpaint_pipeline``:
  test-sized UNet pipelines with SD 1.5's or SDXL's attention-site layout (their images are noise);
- ``build_tiny_dit_pipeline(kind="sd3"|"flux-fill", seed)`` / ``save_tiny_dit_pipeline``:
  test-sized DiT inpainting pipelines, ``StableDiffusion3InpaintPipeline`` shaped like SD3.5
  Medium and ``FluxFillPipeline``, with three or two text encoders and offline tokenizers;
- ``build_inpaint_pipeline(PipelineSpec(...), seed)`` / ``build_dit_pipeline(DitSpec(...), seed)``:
  the builders behind them, for any component configs (benchmarks build larger architectures with them);
- ``build_unet(arch, device="meta")`` / ``load_unet_config(arch)``: the full-size UNets of
  SD 1.5, SD 2 and SDXL inpainting, from configs shipped with the package;
- ``build_transformer(arch, device="meta")`` / ``load_transformer_config(arch)``: the full-size
  transformers of SD3 Medium, SD3.5 Medium and Large, FLUX.1 [dev] and FLUX.1 Fill [dev].
"""

from attnctl.testing.architectures import (
    DIT_CONFIGS,
    UNET_CONFIGS,
    build_transformer,
    build_unet,
    load_transformer_config,
    load_unet_config,
)
from attnctl.testing.dit import (
    FLUX_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    TINY_DIT,
    TINY_FLUX_FILL_TRANSFORMER_CONFIG,
    TINY_SD3_TRANSFORMER_CONFIG,
    DitSpec,
    build_dit_pipeline,
    build_tiny_dit_pipeline,
    save_tiny_dit_pipeline,
    t5_char_tokenizer,
    t5_char_vocab,
    write_t5_char_tokenizer,
)
from attnctl.testing.pipelines import (
    SD_DDIM_SCHEDULER_CONFIG,
    PipelineSpec,
    build_inpaint_pipeline,
    byte_clip_tokenizer,
    byte_vocab,
    clip_byte_symbols,
    clip_text_encoder,
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
    "DIT_CONFIGS", "TINY_DIT", "DitSpec", "build_dit_pipeline", "FLUX_SCHEDULER_CONFIG", "SD3_SCHEDULER_CONFIG",
    "SD_DDIM_SCHEDULER_CONFIG",
    "TINY_FLUX_FILL_TRANSFORMER_CONFIG", "TINY_SD", "TINY_SD3_TRANSFORMER_CONFIG", "TINY_SDXL",
    "TINY_SDXL_UNET_CONFIG", "TINY_UNET_CONFIG", "TINY_VAE_CONFIG", "UNET_CONFIGS", "PipelineSpec",
    "build_inpaint_pipeline", "build_tiny_dit_pipeline", "build_tiny_inpaint_pipeline", "build_transformer",
    "build_unet", "byte_clip_tokenizer", "byte_vocab", "clip_byte_symbols", "clip_text_encoder",
    "load_transformer_config", "load_unet_config", "save_inpaint_pipeline", "save_tiny_dit_pipeline",
    "save_tiny_inpaint_pipeline", "seeded", "t5_char_tokenizer", "t5_char_vocab", "write_byte_tokenizer",
    "write_t5_char_tokenizer",
]
