"""Scores of a model's output (its logits) that screening uses as detectors.

Owns three per-sample scores of logits (n, K), each oriented so that higher is more
suspicious:

* `msp`: minus the maximum softmax probability (Hendrycks and Gimpel 2017, "A Baseline for
  Detecting Misclassified and Out-of-Distribution Examples in Neural Networks").
* `energy`: the free energy -logsumexp(logits) (Liu et al. 2020, "Energy-based
  Out-of-distribution Detection"), at temperature 1.
* `margin`: minus the gap between the largest and second-largest logit, the quantity the
  Carlini-Wagner loss drives to zero (Carlini and Wagner 2017, "Towards Evaluating the
  Robustness of Neural Networks"): minimal-perturbation attacks stop just past the boundary.
"""

from __future__ import annotations

import numpy as np
from scipy.special import logsumexp, softmax

__all__ = ["OUTPUT_SCORES", "output_scores"]

OUTPUT_SCORES = ("msp", "energy", "margin")


def output_scores(logits: np.ndarray) -> np.ndarray:
    """(n, 3): msp, energy and margin of logits (n, K), in the order of OUTPUT_SCORES."""
    z = np.asarray(logits, dtype=np.float64)
    top2 = np.sort(z, axis=1)[:, -2:] if z.shape[1] > 1 else np.c_[z, z]
    return np.stack(
        [
            -softmax(z, axis=1).max(axis=1),
            -logsumexp(z, axis=1),
            -(top2[:, 1] - top2[:, 0]),
        ],
        axis=1,
    )
