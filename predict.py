"""Cog entry point for DeepSeek-VL2: inputs, validation, one engine call, output.

All model logic lives in the `deepseek_vl2` package; this file only adapts it to Cog.
"""

import asyncio
import functools
import inspect
import logging
import os
import resource
import tempfile
import time
import typing
from typing import Any, Optional

import cog
import torch
from cog import BaseModel, BasePredictor, FieldInfo, Input, Path
from PIL import Image

from deepseek_vl2 import Engine, GenerationResult, build_messages
from deepseek_vl2.inputs.grounding import render_grounding
from deepseek_vl2.inputs.images import load_image, local_files_allowed
from deepseek_vl2.serving.weights import is_demo_checkpoint, resolve_weights

logger = logging.getLogger("deepseek_vl2.predict")

IMAGE_INPUTS = ("image1", "image2", "image3")


class ModelOutput(BaseModel):
    img_out: Optional[Path]
    text_out: str


def _configure_logging() -> None:
    # Cog captures stderr into the prediction logs; without a handler INFO records are lost.
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("deepseek_vl2").setLevel(logging.INFO)


def _memory_report(device: torch.device) -> str:
    # ru_maxrss is in KiB on Linux.
    report = f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    if str(device).startswith("cuda"):
        report += f", CUDA max allocated {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    return report


class Predictor(BasePredictor):
    def setup(self) -> None:
        _configure_logging()
        weights_dir = resolve_weights()
        logger.info("Loading DeepSeek-VL2 from %s", weights_dir)
        started = time.perf_counter()
        self.engine = Engine.from_pretrained(str(weights_dir))
        logger.info(
            "Model loaded in %.1f s on %s (%s); %s",
            time.perf_counter() - started,
            self.engine.device,
            self.engine.dtype,
            _memory_report(self.engine.device),
        )
        if is_demo_checkpoint(weights_dir):
            logger.warning("%s is a random-weight DEMO checkpoint: answers are noise.", weights_dir)

    # As many concurrent predictions as the engine batches on a GPU (runner.GPU_MAX_BATCH_CAP). `cog
    # build` reads this literal; a server started by hand takes COG_MAX_CONCURRENCY instead, which
    # deepseek_vl2/local_server.py sets from DEEPSEEK_VL2_MAX_BATCH (default 4 on the CPU).
    @cog.concurrent(max=16)
    async def predict(
        self,
        text: str = Input(
            default="Describe this image.",
            description=(
                "Question or instruction about the image(s). `<image>` tags mark where each "
                "image goes; missing tags are added in front, one per line. For grounding, ask "
                "e.g. `<|ref|>the giraffe at the back<|/ref|>.` or start with `<|grounding|>`."
            ),
        ),
        image1: Path = Input(description="First input image (required)."),
        image2: Optional[Path] = Input(
            default=None, description="Optional second image (multi-image questions)."
        ),
        image3: Optional[Path] = Input(
            default=None,
            description=(
                "Optional third image. With three images each image is seen at 384x384 "
                "(no high-resolution tiling), so small details may be missed."
            ),
        ),
        max_new_tokens: int = Input(
            default=2048,
            ge=0,
            le=4096,
            description=(
                "Maximum number of tokens to generate. Reduced automatically when prompt plus "
                "answer would exceed the model's 4096-token context."
            ),
        ),
        temperature: float = Input(
            default=0.1,
            ge=0,
            description=(
                "Sampling temperature: higher is more random, lower is more focused. "
                "0 means greedy decoding (deterministic)."
            ),
        ),
        top_p: float = Input(
            default=0.9,
            ge=0,
            le=1,
            description=(
                "Nucleus sampling: sample only from the most likely tokens whose probabilities "
                "add up to top_p. 1 disables it. Ignored when temperature is 0."
            ),
        ),
        repetition_penalty: float = Input(
            default=1.1,
            ge=0,
            description=(
                "Penalty for tokens already present in the prompt or the answer; must be "
                "greater than 0. 1 means no penalty, above 1 discourages repetition."
            ),
        ),
        top_k: int = Input(
            default=50,
            ge=0,
            description=(
                "Sample only from the top_k most likely tokens; 0 disables it. "
                "Ignored when temperature is 0."
            ),
        ),
        seed: Optional[int] = Input(
            default=None,
            description="Random seed for reproducible sampling. Leave empty for a random seed.",
        ),
        image_detail: str = Input(
            default="auto",
            choices=["auto", "low"],  # deepseek_vl2.IMAGE_DETAILS (a literal, for `cog build`)
            description=(
                "How closely each image is seen. `auto`: high-resolution tiling (up to ~1800 "
                "tokens per image) with one or two images, as the official model does. `low`: "
                "each image as one 384x384 view (421 tokens), as `auto` does with three images; "
                "small details may be missed, but for a large image the first token comes over "
                "4x sooner (measured on a 2-core CPU: 11 s instead of 49 s)."
            ),
        ),
    ) -> ModelOutput:
        arguments = _resolve_arguments(locals())
        if arguments["repetition_penalty"] <= 0:
            raise ValueError(
                "repetition_penalty must be greater than 0 (1 = no penalty), "
                f"got {arguments['repetition_penalty']}"
            )
        seed_value = arguments["seed"]
        if seed_value is None:
            seed_value = int.from_bytes(os.urandom(4), "big") >> 1
            logger.info("Using seed %d", seed_value)

        images = await asyncio.to_thread(_load_images, arguments)
        # Cancellation (POST /predictions/<id>/cancel, or a client that disconnects) arrives here
        # as asyncio.CancelledError, and the engine drops the request at its next step.
        result = await self.engine.generate_async(
            build_messages(arguments["text"], len(images)),
            images,
            max_new_tokens=arguments["max_new_tokens"],
            temperature=arguments["temperature"],
            top_p=arguments["top_p"],
            top_k=arguments["top_k"],
            repetition_penalty=arguments["repetition_penalty"],
            seed=seed_value,
            image_detail=arguments["image_detail"],
        )
        if result.max_new_tokens_clipped:
            logger.warning(
                "max_new_tokens=%d does not fit the context after the %d-token prompt: "
                "reduced to %d",
                arguments["max_new_tokens"],
                result.prompt_tokens,
                result.max_new_tokens,
            )
        for name, value in prediction_metrics(result).items():
            self.record_metric(name, value)
        boxes = await asyncio.to_thread(_grounding_image, result.text, images[-1])
        return ModelOutput(img_out=boxes, text_out=result.text)


def prediction_metrics(result: GenerationResult) -> dict[str, Any]:
    """Replicate's metrics for language models, and how much of the prompt came from the prefix
    cache. Times are from the moment the engine got the request (images already downloaded);
    tokens_per_second counts the tokens after the first."""
    return {
        "input_token_count": result.prompt_tokens,
        "output_token_count": len(result.token_ids),
        "time_to_first_token": round(result.timings.first_token_s, 4),
        "tokens_per_second": round(result.timings.decode_tokens_per_s, 2),
        "cached_prompt_tokens": result.cached_prompt_tokens,
    }


# The Input(...) declarations, captured at import: the Cog worker later replaces the signature's
# defaults with plain values, so they cannot be read back from predict() at run time.
_INPUT_FIELDS: dict[str, FieldInfo] = {
    name: parameter.default
    for name, parameter in inspect.signature(Predictor.predict).parameters.items()
    if name != "self"
}
_INPUT_TYPES = typing.get_type_hints(Predictor.predict)


def _resolve_arguments(values: dict[str, Any]) -> dict[str, Any]:
    """Plain Python values for every input, with the declared defaults and bounds applied.

    Over HTTP Cog has already done this, but in-process callers get the `Input(...)` FieldInfo
    itself for every argument they leave out, and an int where a float is declared.
    """
    resolved: dict[str, Any] = {}
    for name, field in _INPUT_FIELDS.items():
        value = values[name]
        if isinstance(value, FieldInfo):
            value = value.default
        number_type = _number_type(_INPUT_TYPES[name])
        if value is not None and number_type is not None:
            value = number_type(value)
            if field.ge is not None and value < field.ge:
                raise ValueError(f"{name} must be at least {field.ge}, got {value}")
            if field.le is not None and value > field.le:
                raise ValueError(f"{name} must be at most {field.le}, got {value}")
        if field.choices is not None and value not in field.choices:
            raise ValueError(f"{name} must be one of {', '.join(map(str, field.choices))}; got {value!r}")
        resolved[name] = value
    if resolved["image1"] is None:
        raise ValueError("image1 is required")
    return resolved


def _number_type(hint: Any) -> Optional[type]:
    """float or int for a (possibly Optional) numeric annotation, else None."""
    candidates = [arg for arg in typing.get_args(hint) if arg is not type(None)] or [hint]
    return candidates[0] if len(candidates) == 1 and candidates[0] in (float, int) else None


def _load_images(arguments: dict[str, Any]) -> list[Image.Image]:
    allow_local = local_files_allowed()
    return [
        load_image(arguments[name], name, allow_local_files=allow_local)
        for name in IMAGE_INPUTS
        if arguments[name] is not None
    ]


@functools.cache
def _output_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="deepseek-vl2-"))


# A grounding image is read by Cog right after its prediction returns; older ones are deleted so a
# long-running server does not fill its disk.
GROUNDING_IMAGE_LIFETIME_S = 600


def _grounding_image(answer: str, last_image: Image.Image) -> Optional[Path]:
    drawn = render_grounding(answer, last_image)
    if drawn is None:
        return None
    directory = _output_dir()
    expired = time.time() - GROUNDING_IMAGE_LIFETIME_S
    for old in directory.glob("grounding-*.png"):
        try:
            if old.stat().st_mtime < expired:
                old.unlink()
        except FileNotFoundError:
            pass  # a concurrent prediction removed it first
    # A file of its own: concurrent predictions must not overwrite each other's image.
    handle, name = tempfile.mkstemp(prefix="grounding-", suffix=".png", dir=directory)
    with os.fdopen(handle, "wb") as output:
        drawn.save(output, format="PNG")
    return Path(name)
