"""Model code shared by the engines and the trainer: loading HF checkpoints, float32
logits, packed attention. It imports neither side."""
