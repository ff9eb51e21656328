"""Evaluation: perplexity (and zero-shot accuracy through lm-evaluation-harness)."""

from .ppl import PerplexityResult, perplexity, perplexity_details

__all__ = ["perplexity", "perplexity_details", "PerplexityResult"]
