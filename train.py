"""Synchronous RL training: python train.py [flags] (see --help; flags follow Miles/slime)."""
import sys

from furlong.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train.py"))
