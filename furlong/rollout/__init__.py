"""Rollout: generating responses and scoring them."""
