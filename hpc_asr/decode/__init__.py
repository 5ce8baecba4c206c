"""Decoding and scoring: CTC greedy/beam, the n-gram LM, LM tuning, WER, evaluation."""
