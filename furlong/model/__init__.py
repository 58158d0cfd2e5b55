"""Model code shared by the engines and the trainer, importing neither: loading HF
checkpoints (loading.py), float32 logits (logits.py), packed attention (varlen.py,
attention.py), the fused log-prob/entropy head (log_prob_head.py) and Liger-Kernel's
fused layers for a GPU trainer (fused_kernels.py)."""
