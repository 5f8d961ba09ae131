"""Speculative decoding's engine side: proposers of draft tokens and the counters of what was accepted.
The verify forward is the runner's (runner/model_runner.py `launch_verify`); the accept rule is in
sample/rejection_sampler.py."""
from asyncserve.engine.spec_decode.metrics import SpecDecodeStats
from asyncserve.engine.spec_decode.ngram_proposer import NgramProposer, TokenHistory
from asyncserve.engine.spec_decode.speculator import Speculator

__all__ = ["NgramProposer", "SpecDecodeStats", "Speculator", "TokenHistory"]
