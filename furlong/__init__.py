"""furlong: RL post-training of causal language models with GRPO and its relatives
(GSPO, REINFORCE++), with the command line of Miles/slime (`train.py`, `train_async.py`).
A rollout engine generates groups of responses per prompt, rewards score them, and a
trainer takes optimizer steps on their advantages, then pushes its weights back to the
engine. Start reading at `furlong/loop.py` (the schedule of a run: generate -> train ->
save -> push weights -> eval), then `furlong/train/rl_step.py` (what training on one
rollout means: old and reference log-probs -> advantages -> optimizer steps);
`docs/architecture.md` follows one sample from prompt to gradient and lists every module.
"""
