"""DeepSeek-VL2 inference: model, processor and generation engine, weight-compatible with the
official Hugging Face checkpoints."""

from .checkpoint import CheckpointError, checkpoint_manifest
from .config import ConfigError, DeepseekVL2Config
from .model import DeepseekVL2
from .conversation import build_messages
from .processor import Processor, ProcessorOutput
from .tokenizer import StreamDecoder, Tokenizer
from .engine import ContextOverflowError, Engine, GenerationResult
from .sampling import SamplingParams
from .images import ImageInputError, load_image
from .grounding import GroundedObject, parse_grounding, render_grounding
from .weights import WeightsNotFoundError, resolve_weights
