"""DeepSeek-VL2 inference: model, processor and generation engine, weight-compatible with the
official Hugging Face checkpoints."""

from .checkpoint import CheckpointError, checkpoint_manifest
from .config import ConfigError, DeepseekVL2Config
from .conversation import build_messages
from .engine import ContextOverflowError, Engine, GenerationResult
from .grounding import GroundedObject, parse_grounding, render_grounding
from .images import ImageInputError, load_image
from .model import DeepseekVL2
from .processor import Processor, ProcessorOutput
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, Tokenizer
from .weights import WeightsNotFoundError, resolve_weights

__all__ = [
    # model
    "DeepseekVL2Config", "ConfigError", "DeepseekVL2", "checkpoint_manifest", "CheckpointError",
    # processor
    "Processor", "ProcessorOutput", "Tokenizer", "StreamDecoder", "build_messages",
    # generation
    "Engine", "GenerationResult", "SamplingParams", "ContextOverflowError",
    # service helpers
    "load_image", "ImageInputError", "parse_grounding", "render_grounding", "GroundedObject",
    "resolve_weights", "WeightsNotFoundError",
]  # fmt: skip
