"""What a run writes for people: metrics (jsonl, TensorBoard, W&B), the console progress
line, the reward-curve plot and the summary table of a finished run."""
