"""DeepSeek-VL2 inference: model, processor and generation engine, weight-compatible with the
official Hugging Face checkpoints."""

from .checkpoint import CheckpointError, checkpoint_manifest
from .config import ConfigError, DeepseekVL2Config
from .model import DeepseekVL2
from .conversation import build_messages
from .processor import Processor, ProcessorOutput
from .tokenizer import StreamDecoder, Tokenizer
