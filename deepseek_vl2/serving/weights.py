"""Finding (and if needed downloading) a DeepSeek-VL2 checkpoint.

Lookup order, shared by the Cog predictor and `scripts/download_weights.py`:

1. `$DEEPSEEK_VL2_WEIGHTS`, a checkpoint directory (wins when set; it must be valid);
2. `weights/<variant>` in the project, with `<variant>` from `$DEEPSEEK_VL2_VARIANT`
   (default `deepseek-vl2-small`);
3. a download of the Hugging Face hub repository `deepseek-ai/<variant>` into `weights/<variant>`
   (skipped when `HF_HUB_OFFLINE=1`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "DEEPSEEK_VL2_WEIGHTS"
VARIANT_ENV = "DEEPSEEK_VL2_VARIANT"
DEFAULT_VARIANT = "deepseek-vl2-small"
HUB_ORGANISATION = "deepseek-ai"
KNOWN_VARIANTS = ("deepseek-vl2-tiny", "deepseek-vl2-small", "deepseek-vl2")
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # deepseek_vl2/serving/ -> the project
# Only the files inference needs; the hub repos also hold images and docs.
DOWNLOAD_PATTERNS = ["*.json", "*.safetensors"]
# Seconds to wait for the hub's metadata before giving up (the files themselves may take long).
HUB_METADATA_TIMEOUT_S = 10.0


# Written by scripts/make_demo_checkpoint.py next to its random weights.
DEMO_MARKER = "DEMO_RANDOM_WEIGHTS.txt"


class WeightsNotFoundError(RuntimeError):
    """No usable checkpoint could be found or downloaded."""


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` looks like a Hugging Face checkpoint directory (config + safetensors)."""
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file()
    )


def is_demo_checkpoint(path: Path) -> bool:
    """Whether `path` holds the random-weight demo checkpoint (whose answers are noise)."""
    return (path / DEMO_MARKER).is_file()


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _how_to_provide(variant: str, local_dir: Path) -> str:
    return (
        f"Provide weights with one of: `python scripts/download_weights.py --variant {variant}` "
        f"(downloads into {local_dir}); or `export {WEIGHTS_ENV}=/path/to/checkpoint`. "
        f"For a smoke test without real weights: `python scripts/make_demo_checkpoint.py` "
        f"then {WEIGHTS_ENV}=weights/demo (random weights, the answers are noise)."
    )


def hub_repo_id(variant: str) -> str:
    return f"{HUB_ORGANISATION}/{variant}"


def download_weights(variant: str, destination: Path) -> Path:
    """Download `deepseek-ai/<variant>` into `destination` (with a progress bar)."""
    # Imported here so that using local weights never needs the hub client's import time.
    from huggingface_hub import snapshot_download

    if variant not in KNOWN_VARIANTS:
        raise WeightsNotFoundError(
            f"unknown variant {variant!r}; downloadable variants: {', '.join(KNOWN_VARIANTS)}"
        )
    logger.info("Downloading %s into %s", hub_repo_id(variant), destination)
    try:
        snapshot_download(
            hub_repo_id(variant),
            local_dir=destination,
            allow_patterns=DOWNLOAD_PATTERNS,
            etag_timeout=HUB_METADATA_TIMEOUT_S,
        )
    except Exception as error:  # network, auth and disk errors all mean "no weights"
        raise WeightsNotFoundError(
            f"downloading {hub_repo_id(variant)} into {destination} failed: {error}"
        ) from error
    if not is_checkpoint_dir(destination):
        raise WeightsNotFoundError(
            f"the download of {hub_repo_id(variant)} into {destination} is incomplete "
            "(no config.json or safetensors index)"
        )
    return destination


def resolve_weights(
    environ: Mapping[str, str] | None = None, project_root: Path = PROJECT_ROOT
) -> Path:
    """The checkpoint directory to load, following the lookup order in the module docstring."""
    environ = os.environ if environ is None else environ
    variant = environ.get(VARIANT_ENV, "").strip() or DEFAULT_VARIANT
    local_dir = project_root / "weights" / variant

    explicit = environ.get(WEIGHTS_ENV, "").strip()
    if explicit:
        explicit_dir = Path(explicit).expanduser()  # relative paths are taken from the cwd
        if is_checkpoint_dir(explicit_dir):
            return explicit_dir
        raise WeightsNotFoundError(
            f"{WEIGHTS_ENV}={explicit} is not a checkpoint directory "
            f"(expected config.json and model.safetensors.index.json in {explicit_dir})."
        )

    if is_checkpoint_dir(local_dir):
        return local_dir

    looked = f"Looked in: ${WEIGHTS_ENV} (unset), {local_dir} (no checkpoint)"
    if _flag(environ, "HF_HUB_OFFLINE"):
        raise WeightsNotFoundError(
            f"No DeepSeek-VL2 weights found and HF_HUB_OFFLINE is set, so no download was "
            f"attempted. {looked}. {_how_to_provide(variant, local_dir)}"
        )
    try:
        return download_weights(variant, local_dir)
    except WeightsNotFoundError as error:
        raise WeightsNotFoundError(
            f"No DeepSeek-VL2 weights found. {looked}, hub {hub_repo_id(variant)} ({error}). "
            f"{_how_to_provide(variant, local_dir)}"
        ) from error
