"""Metric names and default model ids: what the command line needs before any model is loaded."""

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"
DEFAULT_CMMD_MODEL = "openai/clip-vit-large-patch14-336"
DEFAULT_IR_MODEL = "ImageReward-v1.0"
#: every metric, in table order (``--metrics`` default)
DEFAULT_METRICS = ("cs", "cmmd", "as", "ir", "preserve")
