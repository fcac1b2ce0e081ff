"""The Fréchet distance between two sets of features (FVD's formula), in numpy.

Owns feature statistics (mean and covariance) and the distance between the Gaussians they describe:
|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). The square-root term is computed from the symmetric
matrix S1^(1/2) S2 S1^(1/2), whose eigenvalues are those of S1 S2 and real, so no complex matrix square
root is taken and the result is stable for the rank-deficient covariances of small sample sets.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean [D] and covariance [D, D] of N feature vectors (float64)."""

  mean: np.ndarray
  cov: np.ndarray
  count: int


def statistics(features: np.ndarray) -> Statistics:
  """Statistics of features [N, D]; the covariance is unbiased (N - 1), as the published FVD code's."""
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or features.shape[0] < 2:
    raise ValueError(f"features of shape {features.shape}: expected [N, D] with N >= 2 clips")
  if not np.all(np.isfinite(features)):
    raise ValueError("features hold NaN or inf values")
  return Statistics(features.mean(axis=0), np.cov(features, rowvar=False), int(features.shape[0]))


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
  return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def distance(first: Statistics, second: Statistics) -> float:
  """The Fréchet distance between two feature Gaussians (>= 0; 0 for equal statistics)."""
  if first.mean.shape != second.mean.shape:
    raise ValueError(f"feature widths differ: {first.mean.shape[0]} and {second.mean.shape[0]}")
  root_first = _psd_sqrt(first.cov)
  middle = root_first @ second.cov @ root_first
  trace_root = float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None))))
  difference = first.mean - second.mean
  value = float(difference @ difference + np.trace(first.cov) + np.trace(second.cov) - 2.0 * trace_root)
  return max(value, 0.0)
