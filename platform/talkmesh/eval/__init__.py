"""Evaluation: metrics (LVE, FDD, MVE, ...), scoring saved predictions, the speaker-identity
network for style metrics, and the evaluation protocol that decodes a method on a split."""
