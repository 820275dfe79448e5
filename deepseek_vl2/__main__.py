"""`python -m deepseek_vl2`: the command line (serving/cli.py)."""

from .serving.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
