"""Asynchronous RL training: rollout k+1 is generated while rollout k trains.

Same flags as train.py (see --help); --colocate is refused. Weights reach the engines
every --update-weights-interval rollouts, after the generation in flight finishes.
"""
import sys

from furlong.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="train_async.py", overlap=True))
