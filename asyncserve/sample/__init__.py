"""Sampling: the sampler over a step's logits and what a request's token lists become before it runs."""
