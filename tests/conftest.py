"""Settings for the whole test session."""

import os

# The official fixtures the answers are checked against are fp32 (the bf16 ones are asked for
# explicitly), so engines built without a dtype, the test servers' included, compute in fp32
# rather than in the CPU's default bf16.
os.environ.setdefault("DEEPSEEK_VL2_DTYPE", "float32")
