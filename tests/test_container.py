"""The container side, checked without Docker or the cog CLI (neither can run here).

* cog.yaml is valid against cog's own schema (vendored in tests/fixtures/cog/, see its README),
  names a CUDA version cog can build when the torch pin is newer than cog's compatibility matrix,
  installs torch the way the comments in cog.yaml say, and bakes COG_MAX_CONCURRENCY in.
* .dockerignore, read with Docker's matching rules, keeps what the server needs in the build
  context and leaves out the virtual environment, git data, demo weights, tests and caches.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent
COG_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "cog"

# Variables cog refuses in cog.yaml `environment` (its deny list, pkg/config/env.go); a trailing
# `*` is a prefix.
COG_RESERVED_ENV = (
    "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "PYTHONUNBUFFERED", "R8_*",
    "REPLICATE_*", "LIBRARY_PATH", "CUDA_*", "NVIDIA_*", "NV_*", "PGET_*", "HF_ENDPOINT",
    "HF_HUB_ENABLE_HF_TRANSFER", "KUBERNETES_*",
)  # fmt: skip


@pytest.fixture(scope="module")
def cog_config() -> dict:
    return yaml.safe_load((PROJECT_ROOT / "cog.yaml").read_text())


def _environment(config: dict) -> dict[str, str]:
    pairs = {}
    for entry in config.get("environment") or []:
        name, sep, value = entry.partition("=")
        assert sep and name, f"environment entry {entry!r} is not NAME=value"
        assert name not in pairs, f"{name} is set twice in cog.yaml environment"
        pairs[name] = value
    return pairs


# --- cog.yaml -------------------------------------------------------------------------------


def test_cog_yaml_is_valid_for_cogs_schema(cog_config: dict) -> None:
    schema = json.loads((COG_FIXTURES / "config_schema_v1.0.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(cog_config)


def test_schema_check_catches_an_unknown_key(cog_config: dict) -> None:
    schema = json.loads((COG_FIXTURES / "config_schema_v1.0.json").read_text())
    broken = {**cog_config, "build": {**cog_config["build"], "cuda_version": "13.0"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(schema).validate(broken)


def _release(version: str) -> tuple[int, ...]:
    """(2, 13, 0) for "2.13.0" or "2.13.0+cu130"."""
    return tuple(int(part) for part in version.split("+")[0].split("."))


def _requirement_lines() -> list[str]:
    lines = []
    for raw in (PROJECT_ROOT / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _torch_pin() -> str:
    pins = [m.group(1) for line in _requirement_lines() if (m := re.fullmatch(r"torch==(\S+)", line))]
    assert len(pins) == 1, "requirements.txt must pin torch exactly once as torch==X.Y.Z"
    return pins[0]


def test_cuda_is_named_when_cogs_matrix_does_not_know_the_torch_pin(cog_config: dict) -> None:
    matrix = json.loads((COG_FIXTURES / "torch_compatibility.json").read_text())
    newest = max(_release(row["Torch"]) for row in matrix)
    if _release(_torch_pin()) <= newest:
        pytest.skip("cog's matrix knows this torch; it can derive CUDA on its own")

    cuda = cog_config["build"].get("cuda")
    assert cog_config["build"].get("gpu") is True
    assert isinstance(cuda, str) and cuda, (
        f"torch=={_torch_pin()} is newer than cog's matrix (newest {newest}): without build.cuda "
        "`cog build` stops with \"Cog doesn't know what CUDA version is compatible with torch\""
    )
    parts = cuda.split(".")
    assert len(parts) in (2, 3) and all(p.isdigit() for p in parts) and int(parts[0]) >= 11, cuda
    # CUDA versions cog pairs with its newest torch have base images (its matrix keeps no others).
    known = {row["CUDA"] for row in matrix if _release(row["Torch"]) == newest and row["CUDA"]}
    assert ".".join(parts[:2]) in known, f"CUDA {cuda} is not one cog builds for ({sorted(known)})"


def test_torch_comes_from_pypi_without_index_options() -> None:
    # cog.yaml relies on this: with no index or link options, cog writes `torch==X` unchanged for a
    # torch it does not know, and pip takes PyPI's wheel (the CUDA build on Linux x86_64).
    options = [line for line in _requirement_lines() if line.startswith("-") and not line.startswith("-r")]
    assert not options, f"requirements.txt has pip options that change where torch comes from: {options}"


def test_environment_bakes_a_concurrency_limit(cog_config: dict) -> None:
    env = _environment(cog_config)
    assert "COG_MAX_CONCURRENCY" in env, "cog.yaml environment must set COG_MAX_CONCURRENCY"
    value = env["COG_MAX_CONCURRENCY"]
    assert value.isdigit() and int(value) > 0, f"COG_MAX_CONCURRENCY={value!r}"
    assert "concurrency" not in cog_config, "the top-level concurrency key is deprecated"


def test_environment_caps_glibc_arenas_as_the_soak_runs(cog_config: dict) -> None:
    # The soak measured flat memory with two arenas; the image must run the worker the same way.
    assert _environment(cog_config).get("MALLOC_ARENA_MAX") == "2"


def test_environment_entries_are_ones_cog_accepts(cog_config: dict) -> None:
    for name, value in _environment(cog_config).items():
        for reserved in COG_RESERVED_ENV:
            clash = name.startswith(reserved[:-1]) if reserved.endswith("*") else name == reserved
            assert not clash, f"cog refuses {name} in cog.yaml environment"
        # cog writes them as one unquoted `ENV NAME=value ...` line.
        assert value and not re.search(r"\s", value), f"{name}={value!r} needs quoting"


# --- .dockerignore --------------------------------------------------------------------------


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` stay inside one path segment, `**` spans segments,
    `[...]` is a character class and a backslash escapes; the whole path must match."""
    regex = ["^"]
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):
                i += 1
            regex.append(".*" if i >= len(pattern) else "(.*/)?")
            continue
        if char == "*":
            regex.append("[^/]*")
        elif char == "?":
            regex.append("[^/]")
        elif char == "\\" and i + 1 < len(pattern):
            i += 1
            regex.append(re.escape(pattern[i]))
        elif char == "[" and (close := pattern.find("]", i + 1)) > i + 1:
            regex.append(pattern[i : close + 1])  # passed to the regexp as written, like Docker
            i = close
        else:
            regex.append(re.escape(char))
        i += 1
    regex.append("$")
    return re.compile("".join(regex))


class DockerIgnore:
    """A .dockerignore read the way Docker reads it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, re.Pattern[str]]] = []
        for raw in text.splitlines():
            if raw.startswith("#"):
                continue
            line = raw.strip()
            if not line:
                continue
            negated = line.startswith("!")
            if negated:
                line = line[1:].strip()
            line = posixpath.normpath(line)
            if len(line) > 1 and line.startswith("/"):
                line = line.lstrip("/")
            self.rules.append((negated, _glob_to_regex(line)))

    def excludes(self, path: str) -> bool:
        """Whether `path` (relative to the context root) is left out: the last rule that matches
        the path or one of its parent directories decides."""
        parts = path.strip("/").split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for negated, regex in self.rules:
            if negated != excluded:
                continue  # only an exception can undo an exclusion, only a pattern can make one
            if any(regex.match(prefix) for prefix in prefixes):
                excluded = not negated
        return excluded


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        ("*.md", "README.md", True),
        ("*.md", "docs/guide.md", False),  # no slash does not mean "at any depth" in Docker
        ("**/*.md", "docs/deep/guide.md", True),
        ("**/*.md", "guide.md", True),
        ("docs", "docs/deep/guide.md", True),  # a matched directory takes its contents
        ("/docs", "docs/guide.md", True),
        ("docs/**", "docs/deep/guide.md", True),
        ("d?cs", "docs/a", True),
        ("d?cs", "dos/a", False),
        ("*.py[cod]", "x.pyc", True),
        ("weights/*\n!weights/README.md", "weights/README.md", False),
        ("weights/*\n!weights/README.md", "weights/tiny/model.safetensors", True),
        ("!keep.txt\n*.txt", "keep.txt", True),  # the later rule wins
        ("# comment\n\n  build  ", "build/out.bin", True),
        ("# comment", "comment", False),
    ],
)
def test_docker_matching_rules(rules: str, path: str, excluded: bool) -> None:
    assert DockerIgnore(rules).excludes(path) is excluded


# Files a developer typically has besides the repository's own (none of them tracked by git).
UNTRACKED = [
    ".git/HEAD",
    ".venv/lib/python3.11/site-packages/x.py",
    ".venv/bin/python",
    "weights/demo/model-00001-of-00003.safetensors",
    "weights/demo/config.json",
    "weights/deepseek-vl2-tiny/config.json",
    "weights/deepseek-vl2-tiny/model.safetensors.index.json",
    "weights/deepseek-vl2-tiny/model-00001-of-00001.safetensors",
    "weights/deepseek-vl2-tiny/tokenizer.json",
    "weights/deepseek-vl2-tiny/.cache/huggingface/download/config.json.metadata",
    "__pycache__/predict.cpython-311.pyc",
    "deepseek_vl2/__pycache__/engine.cpython-311.pyc",
    "tests/__pycache__/test_http.cpython-311-pytest-9.2.0.pyc",
    ".pytest_cache/v/cache/nodeids",
    ".cog/tmp/build20260101000000.000000/requirements.txt",
    "build/out.txt",
    "dist/deepseek_vl2-0.0.0-py3-none-any.whl",
    "outputs/boxes.png",
    ".env",
]


@pytest.fixture(scope="module")
def build_context(tmp_path_factory: pytest.TempPathFactory) -> tuple[set[str], set[str]]:
    """(paths copied into the image, paths left out) for a copy of the working tree."""
    if shutil.which("git") is None:
        pytest.skip("git is needed to list the repository's files")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT, capture_output=True, check=True,
    ).stdout.decode()  # fmt: skip
    repo_files = {path for path in listing.split("\0") if path}
    root = tmp_path_factory.mktemp("context")
    for relative in repo_files | set(UNTRACKED):
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    walked = {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}
    ignore = DockerIgnore((PROJECT_ROOT / ".dockerignore").read_text())
    kept = {path for path in walked if not ignore.excludes(path)}
    return kept, walked - kept


def test_build_context_keeps_what_the_server_needs(build_context: tuple[set[str], set[str]]) -> None:
    kept, _ = build_context
    needed = {
        "predict.py",
        "cog.yaml",
        "requirements.txt",
        ".cog/openapi_schema.json",
        ".cog/tmp/build20260101000000.000000/requirements.txt",  # cog COPYs its build files from here
        "weights/README.md",
        "weights/deepseek-vl2-tiny/config.json",
        "weights/deepseek-vl2-tiny/model.safetensors.index.json",
        "weights/deepseek-vl2-tiny/model-00001-of-00001.safetensors",
        "weights/deepseek-vl2-tiny/tokenizer.json",
    }
    assert not needed - kept, f"left out of the image: {sorted(needed - kept)}"
    package = {p for p in kept | build_context[1] if p.startswith("deepseek_vl2/") and "__pycache__" not in p}
    assert any(p.startswith("deepseek_vl2/assets/") for p in package)
    assert not package - kept, f"package files left out: {sorted(package - kept)}"


def test_build_context_leaves_out_bulk_and_caches(build_context: tuple[set[str], set[str]]) -> None:
    kept, _ = build_context
    unwanted = [
        p
        for p in kept
        if p.startswith((".venv/", ".git/", "weights/demo/", "tests/", ".pytest_cache/", "build/", "dist/"))
        or "__pycache__" in p.split("/")
        or p.endswith((".pyc", ".pyo"))
        or "/.cache/" in p
        or p.split("/")[-1] == ".env"
    ]
    assert not unwanted, f"would be copied into the image: {sorted(unwanted)[:10]}"


def test_dockerignore_leaves_cog_its_directory() -> None:
    # cog refuses to build when its .dockerignore check (gitignore-style, a pattern without a
    # slash matching at any depth) matches ".cog", and it needs .cog/ in the context anyway.
    for raw in (PROJECT_ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", "!")):
            continue
        pattern = line.strip("/")
        pattern = pattern[3:] if pattern.startswith("**/") else pattern
        assert not fnmatch.fnmatchcase(".cog", pattern), f"{line!r} would hide .cog from cog"
