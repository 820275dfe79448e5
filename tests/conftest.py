"""Settings for the whole test session."""

import os

# The official fixtures the answers are checked against are fp32 (the bf16 ones are asked for
# explicitly), so engines built without a dtype, the test servers' included, compute in fp32
# rather than in the CPU's default bf16.
os.environ.setdefault("DEEPSEEK_VL2_DTYPE", "float32")
# How products run is forced, not calibrated, so that every machine runs the same paths (the
# tests that need another choice force it; test_calibration covers `auto`), and nothing is
# remembered in the home directory.
os.environ.setdefault("DEEPSEEK_VL2_EXECUTION", "upcast")
os.environ.setdefault("DEEPSEEK_VL2_EXECUTION_CACHE", "")
# Nor are quantized weights kept between runs, unless a test asks for a cache folder.
os.environ.setdefault("DEEPSEEK_VL2_QUANTIZED_CACHE", "")
