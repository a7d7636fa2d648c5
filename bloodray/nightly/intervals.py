"""Intervals behind the clinical flags (:mod:`bloodray.nightly.differential`): counting error and the model's errors.

Without a confusion matrix every rate carries Wilson's score interval of its
counted cells with Newcombe's continuity correction (:func:`wilson_interval`).
That assumes every cell was classified right (issue 21: the shipped model
calls 7 of 250 neutrophils "ig", so a healthy 100-cell sample got the ig flag
about 31 % of the time). When the checkpoint carries its confusion on the
validation split (sealed by ``bloodray calibrate``;
:meth:`bloodray.checkpoint.CheckpointMetadata.val_confusion`), the nightly job
puts it into ``FlagRules.confusion`` (a :class:`ModelConfusion`) and the
intervals behind the flags become intervals of the sample's TRUE rates:

* the counts are corrected for misclassification: the observed class shares
  ``q`` are what the true shares ``p`` look like through the model,
  ``q = C^T p`` with ``C[i, j]`` = P(predicted j | true i) from val, so
  ``p = (C^T)^-1 q`` (negative shares set to 0, then rescaled to sum 1);
* each rate's variance adds the confusion estimate's own uncertainty to the
  counting error (delta method: the observed shares are multinomial over the
  sample's counted cells; each row of ``C`` has the (co)variance of its
  posterior under a Jeffreys Dirichlet(1/2) prior, below);
* the interval is the score interval of the corrected rate on the corrected
  number of cells, with the variance the binomial term does not hold (the
  misclassified cells' own counting error, the confusion's estimation error)
  added as a constant and Newcombe's continuity correction: it solves
  ``(|rate - x| - 1/(2n))^2 = z^2 (x (1 - x) / n + extra)``; ``extra = 0`` is
  exactly the counting-error interval. The flag rules (whole interval outside
  the range) then apply unchanged.

So a sample whose only "immature granulocytes" are the few the model makes of
neutrophils and monocytes is no longer flagged, while a truly left-shifted one
still is. Why this and not a fixed, raised threshold: the spurious share of a
class depends on the sample's own mix (7 in 250 neutrophils become "ig": a
neutrophil-rich sample gets more), and the correction uses that mix; a raised
threshold would have to assume the worst in-range mix and lose the flag on
real left shifts. Without a matrix (a checkpoint calibrated before issue 21)
the flags keep the counting-error rule and the column
``flags_confusion_corrected`` is false, so nobody reads them as more than that.

Why the continuity correction. Counts are whole cells, and the plain Wilson
interval covers less than it says for the small counts flags are made of: its
lower bound for 3 basophils in 100 is 1.03 %, above the healthy range's 1.0 %,
so even a perfect classifier flagged basophilia on about 4 % of healthy
100-cell samples (the middle of the range, 0.75 %, gives 3 or more of 100
that often; bench/results/flags_robust_v2.md). The corrected interval
(Newcombe 1998, method 4; scipy's ``wilsoncc``) is close to the exact
Clopper-Pearson coverage for such counts and has a closed form the review
page's JavaScript repeats: its bounds are the plain score bounds of the rate
moved half a cell outwards. 3 of 100 gives 0.78 % (no flag), 4 of 100 1.29 %
(basophilia). The price is sensitivity near the limits: a 15 % monocytosis at
200 cells is flagged 86 % of the time with perfect counts (90 % before).
Clopper-Pearson itself (or a Korn-Graubard effective-n version with the
confusion's variance) needs the inverse incomplete beta function, which the
page would have to port: not worth it for an interval this close.

Why the Jeffreys posterior for the confusion's uncertainty. Val has about 125
cells per class, so an error it never showed (0 of 125 neutrophils called
basophils) has a raw rate of 0 and, in the multinomial delta method, no
variance: the correction then trusts it exactly. Each row's posterior under
a Dirichlet(1/2) prior (Jeffreys) gives it the variance of half a pseudo-cell
(:attr:`ModelConfusion.posterior_rates`, :attr:`ModelConfusion.posterior_cells`),
so a neutrophil-rich sample's rare-class intervals widen by what 125 cells
cannot rule out. The correction itself keeps the raw rates: correcting with
the posterior mean would subtract half a pseudo-cell per val row from every
class, about 0.4 % of all other cells, so every rare class (basophils, ig)
would be biased low; bench/flags.py --variants measures that variant too
(fewer healthy samples flagged, but the ig 3 % profile loses a fifth of its
flags). ``ModelConfusion.prior = 0`` is the plain multinomial variance.

Measured (bench/results/flags_robust_v2_cc.md, the packaged model on real PBC
test cells, val's confusion): healthy 100-cell samples flagged 13.5 % -> 6.9 %
(issue 21's target: 5 %), the abnormal profiles still >= 94 % at 200 cells.
What was left is val's 992 cells under-estimating the model's errors on other
cells of the same lab (neutrophil -> ig: 3 of 125 on val, 13 of 250 on test).

Why the training cells may join the confusion. The only other labelled cells
that are not test cells are the training split's. A model usually classifies
them better than new cells, and their confusion would make the flags trust it
more than it deserves; a model trained with strong augmentation may not
(robust-v2: 0.984 on its 6,947 training cells, 0.986 on val; neutrophil -> ig
4.5 % on them, 5.2 % on test). So ``bloodray calibrate`` (and the OOD refit)
seal the training cells' confusion with a check
(:func:`bloodray.evaluation.calibration.training_confusion`: one-sided Fisher
exact tests find no sign the model does better on them, over all cells and per
class), and the flags correct with val + training cells only when it passed
(:meth:`bloodray.checkpoint.CheckpointMetadata.flag_confusion`); a model that
fitted its training cells keeps val's confusion alone. With robust-v2 that
takes healthy 100-cell samples to about 3 % (bench/flags.py, docs/RESULTS.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from bloodray.classes import CLASS_NAMES, DEFAULT_FLAG_CONFIDENCE

__all__ = ["ConfusionError", "ModelConfusion", "checkpoint_confusion", "score_interval", "share_bounds",
           "wilson_interval"]


class ConfusionError(ValueError):
    """A confusion matrix that cannot correct counts; the message names where it came from."""


@dataclass(frozen=True)
class ModelConfusion:
    """A classifier's measured confusion: counts of val cells (plus training cells that passed calibrate's check:
    module docstring), rows = true class, columns = predicted class.

    Class order is :data:`bloodray.classes.CLASS_NAMES`. Build it with
    :meth:`from_counts`, which refuses a matrix that cannot correct counts (wrong
    shape, negative or non-integer counts, a class with no val cells, a
    singular matrix). See the module docstring for how flags use it.
    """

    counts: tuple[tuple[int, ...], ...]
    #: Dirichlet pseudo-count per cell of each val row for the estimate's own uncertainty (module docstring);
    #: 0.5 (Jeffreys) by default, 0 = the plain multinomial variance of the raw rates.
    prior: float = 0.5

    @classmethod
    def from_counts(cls, counts: Any, where: str = "confusion matrix") -> "ModelConfusion":
        """Validate ``counts`` (8 x 8 non-negative integers, every row with cells); errors name ``where``."""
        k = len(CLASS_NAMES)
        try:
            arr = np.asarray(counts, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ConfusionError(f"{where}: expected {k} x {k} counts, got {counts!r}") from exc
        if arr.shape != (k, k):
            raise ConfusionError(f"{where}: expected {k} x {k} counts (rows true, columns predicted, "
                                 f"classes {', '.join(CLASS_NAMES)}), got shape {arr.shape}")
        if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise ConfusionError(f"{where}: counts must be integers >= 0")
        empty = [CLASS_NAMES[i] for i in np.flatnonzero(arr.sum(axis=1) == 0)]
        if empty:
            raise ConfusionError(f"{where}: no val cells of {', '.join(empty)}; the model's errors on them are unknown")
        out = cls(tuple(tuple(int(x) for x in row) for row in arr))
        if not np.all(np.isfinite(out.inverse_t)):
            raise ConfusionError(f"{where}: the confusion matrix is singular; counts cannot be corrected with it")
        return out

    @functools.cached_property
    def row_totals(self) -> np.ndarray:
        """Val cells per true class."""
        return np.asarray(self.counts, dtype=np.float64).sum(axis=1)

    @functools.cached_property
    def rates(self) -> np.ndarray:
        """``C[i, j]`` = P(predicted j | true i), each row summing to 1."""
        return np.asarray(self.counts, dtype=np.float64) / self.row_totals[:, None]

    @functools.cached_property
    def posterior_rates(self) -> np.ndarray:
        """Posterior mean of each row of ``C`` under the Dirichlet(``prior``) prior: ``(counts + a) / (n + K a)``."""
        counts = np.asarray(self.counts, dtype=np.float64)
        return (counts + self.prior) / (self.row_totals + len(CLASS_NAMES) * self.prior)[:, None]

    @functools.cached_property
    def posterior_cells(self) -> np.ndarray:
        """The divisor of each row's posterior (co)variance, ``n + K a + 1``: ``Cov(C_ij, C_il) = (r_j [j = l] -
        r_j r_l) / (n + K a + 1)`` with ``r`` = :attr:`posterior_rates` (the Dirichlet's moments)."""
        return self.row_totals + len(CLASS_NAMES) * self.prior + 1.0

    @functools.cached_property
    def inverse_t(self) -> np.ndarray:
        """``(C^T)^-1``: true class shares from observed ones (NaN when ``C`` is singular)."""
        try:
            inv = np.linalg.inv(self.rates.T)
        except np.linalg.LinAlgError:
            return np.full(self.rates.shape, np.nan)
        return inv if np.linalg.cond(self.rates) < 1e8 else np.full(self.rates.shape, np.nan)


def checkpoint_confusion(counts: Any, where: str) -> tuple[ModelConfusion | None, str | None]:
    """The confusion the flags use from a checkpoint's sealed confusion counts
    (:meth:`~bloodray.checkpoint.CheckpointMetadata.flag_confusion`: val's, plus the training cells' when they
    passed calibrate's check; None: it has none).

    Returns ``(confusion, None)``, or ``(None, why)`` when the flags cannot
    account for the model's errors (no matrix, or one that cannot correct
    counts): the caller must say so (``why`` is one line naming ``where``).
    """
    if counts is None or (hasattr(counts, "__len__") and len(counts) == 0):
        return None, (f"{where}: the checkpoint carries no val confusion matrix (calibrated before issue 21, or "
                      "never): flags assume every cell is classified right; re-run `bloodray calibrate` on it")
    try:
        return ModelConfusion.from_counts(counts, f"{where}: val confusion"), None
    except ConfusionError as exc:
        return None, f"{exc}: flags assume every cell is classified right"


def wilson_interval(k: Any, n: Any, confidence: float = DEFAULT_FLAG_CONFIDENCE,
                    continuity: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of the proportion ``k / n``, with Newcombe's continuity correction by default.

    ``continuity=True`` (what the flags use; module docstring): the interval of
    Newcombe (1998), method 4 (``scipy.stats.binomtest(k, n).proportion_ci(method="wilsoncc")``);
    ``False``: Wilson's plain score interval (``method="wilson"``). Element-wise over
    arrays; bounds are fractions in [0, 1], NaN where ``n`` is 0. ``k = 0`` gives a
    lower bound of exactly 0 and ``k = n`` an upper bound of exactly 1.
    """
    k = np.asarray(k, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    empty = n <= 0
    with np.errstate(divide="ignore", invalid="ignore"):
        lo, hi = score_interval(k / n, n, np.zeros_like(k / n), confidence, continuity)
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def share_bounds(c: np.ndarray, k: int, members: np.ndarray, confusion: ModelConfusion | None,
                 confidence: float, known: np.ndarray | None = None,
                 continuity: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Interval (fractions) of class ``k``'s share of the classes in ``members``, per sample (module docstring).

    ``c``: counted cells per sample (rows) and class (columns, :data:`CLASS_NAMES` order). Without
    ``confusion``: the (continuity-corrected) Wilson interval of the counts. With it: the score interval of the
    misclassification-corrected share with the extra variance (module docstring). NaN where ``members`` has no cells.
    ``known``: the part of ``c`` a reviewer verified (same shape): taken as true, only the rest is corrected.
    ``continuity``: Newcombe's half-cell correction (the rule); False only to compare with the uncorrected rule.
    """
    n_members = c[:, members].sum(axis=1)
    if confusion is None:
        return wilson_interval(c[:, k], n_members, confidence, continuity)
    m, rates, n_post = confusion.inverse_t, confusion.posterior_rates, confusion.posterior_cells
    inside = members.astype(np.float64)
    known = np.zeros_like(c) if known is None else known
    machine = c - known
    with np.errstate(divide="ignore", invalid="ignore"):
        total = c.sum(axis=1)
        n_machine = machine.sum(axis=1)
        q = np.nan_to_num(machine / n_machine[:, None])  # the machine-called cells' shares (0 if none)
        p_machine = np.clip(q @ m.T, 0.0, None)  # their true shares: (C^T)^-1 q, negatives set to 0 ...
        p_machine = np.nan_to_num(p_machine / p_machine.sum(axis=1, keepdims=True))  # ... rescaled to sum 1
        weight = n_machine / total  # share of the sample's cells the model called
        p = known / total[:, None] + weight[:, None] * p_machine
        share_of = p @ inside
        f = p[:, k] / share_of
        # d f / d p, then through p = known + w M q: u = w M^T (d f / d p), per sample.
        grad = (np.eye(len(CLASS_NAMES))[k][None, :] - f[:, None] * inside[None, :]) / share_of[:, None]
        u = weight[:, None] * (grad @ m)
        var_counts = np.nan_to_num(((u * u * q).sum(axis=1) - (u * q).sum(axis=1) ** 2) / n_machine)
        # Row i of C moves p_machine by -M (p_i dC_i); its (co)variance is the Dirichlet posterior's of the val row
        # (module docstring: an error val never showed still has a variance).
        spread = (u * u) @ rates.T - (u @ rates.T) ** 2
        var_confusion = (p_machine * p_machine * spread / n_post[None, :]).sum(axis=1)
        n_cells = share_of * total
        # What the binomial term of the score interval does not already hold: the misclassified cells' own
        # counting error and the confusion estimate's error, added as a constant (the score interval solves
        # (|f - x| - 1/(2n))^2 = z^2 (x (1 - x) / n + extra) for x; extra = 0 is exactly the Wilson interval).
        extra = np.maximum(var_counts + var_confusion - f * (1.0 - f) / n_cells, 0.0)
        lo, hi = score_interval(f, n_cells, extra, confidence, continuity)
    empty = (n_members <= 0) | ~(share_of > 0)
    return np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)


def score_interval(f: np.ndarray, n: np.ndarray, extra: np.ndarray, confidence: float,
                   continuity: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Score interval of a share ``f`` of ``n`` cells whose estimate has ``extra`` variance besides the binomial.

    The bounds ``x`` solve ``(|f - x| - h)^2 = z^2 (x (1 - x) / n + extra)`` with ``h = 1 / (2 n)``
    (Newcombe's continuity correction) or ``h = 0`` (``continuity=False``: Wilson's plain score interval):
    the lower bound is the plain one of ``f - h``, the upper the plain one of ``f + h``. The lower bound is
    exactly 0 when ``f - h <= 0`` (so always for ``f = 0``), the upper exactly 1 when ``f + h >= 1``.
    """
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    z2 = z * z
    scale = 1.0 + z2 / n
    h = 0.5 / n if continuity else 0.0
    f_lo, f_hi = f - h, f + h
    lo = np.where(f_lo <= 0, 0.0, np.clip(
        (f_lo + z2 / (2.0 * n)) / scale
        - z / scale * np.sqrt(f_lo * (1.0 - f_lo) / n + z2 / (4.0 * n * n) + scale * extra), 0.0, 1.0))
    hi = np.where(f_hi >= 1, 1.0, np.clip(
        (f_hi + z2 / (2.0 * n)) / scale
        + z / scale * np.sqrt(f_hi * (1.0 - f_hi) / n + z2 / (4.0 * n * n) + scale * extra), 0.0, 1.0))
    return lo, hi
