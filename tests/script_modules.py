"""The scripts of scripts/ as modules, for their tests. They are imported as the scripts import
one another (scripts/ on sys.path): a script that another one imports (benchmark, by gpu_check and
quantize_drift) is then one module, loaded once."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str) -> ModuleType:
    """scripts/`name`.py as a module."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)
