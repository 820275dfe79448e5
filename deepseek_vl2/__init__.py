"""DeepSeek-VL2 inference: model, processor and generation engine, weight-compatible with the
official Hugging Face checkpoints."""

from .engine.admission import ContextOverflowError
from .engine.engine import Engine, GenerationResult
from .engine.sampling import SamplingParams
from .inputs.conversation import build_messages
from .inputs.grounding import GroundedObject, parse_grounding, render_grounding
from .inputs.images import ImageInputError, load_image
from .inputs.processor import Processor, ProcessorOutput
from .inputs.tiling import IMAGE_DETAILS
from .inputs.tokenizer import StreamDecoder, Tokenizer
from .model.checkpoint import CheckpointError, checkpoint_manifest
from .model.config import ConfigError, DeepseekVL2Config
from .model.model import DeepseekVL2
from .serving.weights import WeightsNotFoundError, resolve_weights

__all__ = [
    # model
    "DeepseekVL2Config", "ConfigError", "DeepseekVL2", "checkpoint_manifest", "CheckpointError",
    # processor
    "Processor", "ProcessorOutput", "Tokenizer", "StreamDecoder", "build_messages", "IMAGE_DETAILS",
    # generation
    "Engine", "GenerationResult", "SamplingParams", "ContextOverflowError",
    # service helpers
    "load_image", "ImageInputError", "parse_grounding", "render_grounding", "GroundedObject",
    "resolve_weights", "WeightsNotFoundError",
]  # fmt: skip
