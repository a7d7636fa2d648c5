"""Out-of-distribution score per cell and the domain-shift tests built on it.

The score (``ood_score``) adds two standardised log-Mahalanobis distances,
both fitted on the training split and standardised on the validation split:

* **penultimate**: the input of the model's classification head (the registry's
  ``head``), distance to the nearest class mean under one shared (tied)
  covariance -- "does this look like any class the model knows";
* **early**: the global-average-pooled output of an early activation, one
  Gaussian over all training cells -- low-level colour and texture
  statistics, which move with stain, camera and scale even when the
  classifier's own features do not (measured in docs/RESULTS.md: on cells
  from another laboratory the penultimate distance alone reaches AUROC 0.98
  and misses ~45 % of them; the early one separates them completely).

The early layer is chosen by one recorded rule (:data:`EARLY_RULE`): the first
activation module *called* after the second ``Conv2d`` call of a forward pass
(BloodNet: ``features.7``, the ReLU of block 2; a ResNet: the ReLU inside the
first residual block). Its name and call index are stored, and the rule reads
module names only, so it survives the CPU predictor's BatchNorm folding
(folding keeps the names of convolutions and activations).

Covariances are Ledoit--Wolf shrinkage estimates (scikit-learn), whose
shrinkage is chosen from the data. Each log-distance is standardised with the
validation median and standard deviation, so neither part dominates; the
threshold of ``status = 'unidentified'`` is a quantile (99.5 % by default) of
the validation scores, so about 0.5 % of in-distribution cells are expected
above it.

The domain-shift tests (:func:`shift_statistics`) compare a group of cells
(a sample, a run) with the validation reference: a one-sided binomial test of
the unidentified share against the validation share, and a one-sided
Kolmogorov--Smirnov test of the scores against the validation quantiles. Each
fires only when it is significant (``alpha``) *and* the effect is at least
``min_effect`` (excess unidentified share, or KS distance), so a small normal
sample with two or three odd cells never raises the alarm.

The reference is kept **per predicted class** (:class:`ClassReference`: score
quantiles and unidentified share of the val cells, and of unseen training cells
scoring alike, that the model assigns to each class). The score distribution differs between classes
(an immature granulocyte lies further from its class mean, and its early
features further from the pooled Gaussian, than a lymphocyte), so one pooled
distribution mistakes a sample dominated by one class -- a left shift, an
eosinophilia -- for images from another laboratory. Each cell is therefore
compared with its own predicted class's validation distribution (the KS test
runs on these per-class probability-integral transforms, uniform under "same
laboratory" whatever the class mix) and the expected unidentified share is the
mix-weighted mean of the per-class shares. A class with fewer than
:data:`MIN_CLASS_CELLS` validation cells falls back to the pooled reference. A
reference fitted before the per-class format (no ``per_class`` entry) still
loads and is tested pooled; :func:`pooled_reference_note` says how to refit it.

The reference is kept **per arithmetic** too: bf16 rounding raises the score
(robust-v2's PBC val cells: each class's median 0.12-0.26 higher than in fp32,
docs/RESULTS.md), so bf16 cells of the training laboratory read as shifted
against an fp32 reference. The Gaussians and standardisation (fp32) define one
score; its validation reference (:data:`PRECISION_FIELDS`) is stored for each
arithmetic it was measured in (``precision``: the entry's own; ``by_precision``:
the others), and :func:`for_precision` picks the one the cells were scored in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

#: The rule that picks the early layer (recorded in the checkpoint).
EARLY_RULE = "first activation module called after the 2nd Conv2d call of a forward pass"
#: Activation modules the rule recognises.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish)
#: Quantile of the validation scores used as the unidentified threshold.
DEFAULT_QUANTILE = 0.995
#: Number of validation score quantiles stored for the KS test (0 %, 1 %, ..., 100 %).
N_REFERENCE_QUANTILES = 101
#: Flag a sample under the domain-shift alarm gets in front of its other flags (which it keeps, marked unverified).
SHIFT_FLAG = "results unreliable: images unlike the training data"
#: Fewest validation cells of a predicted class for its own reference; smaller classes use the pooled one.
MIN_CLASS_CELLS = 30
#: How to refit an OOD reference in the per-class format (named by :func:`pooled_reference_note`).
REFIT_COMMAND = "python jobs/fit_ood_packaged.py --data <labelled folder> --checkpoint {checkpoint}"
#: The arithmetic of a reference that does not name one (fitted before references recorded it: fp32 only then).
LEGACY_PRECISION = "fp32"
#: Entries of the reference that depend on the arithmetic the cells are scored in (kept per precision).
PRECISION_FIELDS = ("threshold", "val_quantiles", "val_unidentified_share", "n_val", "per_class")
_TENSORS = ("pen_means", "pen_precision", "early_mean", "early_precision")


class OodError(ValueError):
    """An OOD reference cannot be fitted or does not fit the model."""


def early_layer(model: nn.Module, input_size: int) -> tuple[str, int]:
    """``(module name, call index)`` of the early layer under :data:`EARLY_RULE`, found by one blank forward pass."""
    calls: list[tuple[str, nn.Module]] = []
    handles = [m.register_forward_hook(lambda mod, _i, _o, name=name: calls.append((name, mod)))
               for name, m in model.named_modules() if not list(m.children())]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, 3, input_size, input_size))
    finally:
        for h in handles:
            h.remove()
    seen_convs, counts = 0, {}
    for name, mod in calls:
        index = counts.get(name, 0)
        counts[name] = index + 1
        if isinstance(mod, nn.Conv2d):
            seen_convs += 1
        elif seen_convs >= 2 and isinstance(mod, ACTIVATIONS):
            return name, index
    raise OodError(f"{type(model).__name__}: no activation after a second Conv2d ({EARLY_RULE})")


class FeatureTap:
    """Forward hooks that collect the two feature sets of the OOD score from every forward pass.

    ``head`` is the dotted path of the classification head (its input is
    taken); ``early``/``early_call`` name the early activation (its output,
    averaged over height and width). Works on the model or its BatchNorm-folded
    copy. :meth:`take` returns and clears what was collected.
    """

    def __init__(self, model: nn.Module, head: str, early: str, early_call: int = 0):
        self.pen: list[torch.Tensor] = []
        self.early: list[torch.Tensor] = []
        self._calls = 0
        self._early_call = early_call

        def reset(_mod, _inputs):
            self._calls = 0

        def on_head(_mod, inputs):
            self.pen.append(inputs[0].detach().flatten(1).float())

        def on_early(_mod, _inputs, output):
            if self._calls == self._early_call:
                self.early.append(output.detach().float().mean(dim=(2, 3)))
            self._calls += 1

        try:
            head_module, early_module = model.get_submodule(head), model.get_submodule(early)
        except AttributeError as exc:
            raise OodError(f"{type(model).__name__}: {exc}") from exc
        self.handles = [model.register_forward_pre_hook(reset), head_module.register_forward_pre_hook(on_head),
                        early_module.register_forward_hook(on_early)]

    def take(self, views: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Collected (penultimate, early) features, averaged over ``views`` consecutive passes of the same images."""
        pen, early = torch.cat(self.pen).cpu().numpy(), torch.cat(self.early).cpu().numpy()
        self.pen.clear()
        self.early.clear()
        if views > 1:
            pen = pen.reshape(views, -1, pen.shape[1]).mean(0)
            early = early.reshape(views, -1, early.shape[1]).mean(0)
        return pen.astype(np.float64), early.astype(np.float64)

    def close(self) -> None:
        """Remove the hooks."""
        for h in self.handles:
            h.remove()


def _min_sq_distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distance of each row of ``x`` to the nearest of ``means`` (shared precision)."""
    diff = np.asarray(x, dtype=np.float64)[:, None, :] - means[None, :, :]
    return np.einsum("nkd,de,nke->nk", diff, precision, diff).min(axis=1)


@dataclass(frozen=True)
class ClassReference:
    """The validation reference of the cells the model assigns to one class."""

    n_val: int
    #: their score quantiles at 0, 1, ..., 100 %.
    val_quantiles: list[float]
    #: their share above the (pooled) unidentified threshold.
    val_unidentified_share: float

    def to_json(self) -> dict[str, Any]:
        """JSON values for the checkpoint metadata."""
        return {"n_val": int(self.n_val), "val_quantiles": [float(v) for v in self.val_quantiles],
                "val_unidentified_share": float(self.val_unidentified_share)}


def class_references(scores: np.ndarray, classes: np.ndarray, threshold: float) -> dict[str, ClassReference]:
    """Per predicted class (named by ``str``) of the validation cells: their :class:`ClassReference`."""
    scores, classes = np.asarray(scores, dtype=np.float64), np.asarray(classes).astype(str)
    out = {}
    for name in np.unique(classes):
        own = scores[classes == name]
        out[str(name)] = ClassReference(
            len(own), np.quantile(own, np.linspace(0, 1, N_REFERENCE_QUANTILES)).tolist(),
            float(np.mean(own > threshold)))
    return out


def per_class_of(meta: Mapping[str, Any]) -> dict[str, ClassReference] | None:
    """The per-class references of a checkpoint's ``ood`` metadata entry (None: a pooled-only reference)."""
    raw = meta.get("per_class")
    if not raw:
        return None
    return {str(k): ClassReference(int(v["n_val"]), [float(x) for x in v["val_quantiles"]],
                                   float(v["val_unidentified_share"])) for k, v in raw.items()}


def pooled_reference_note(meta: Mapping[str, Any] | None, checkpoint: str) -> str | None:
    """One line for a checkpoint whose OOD reference predates the per-class format; None otherwise."""
    if not meta or meta.get("per_class"):
        return None
    return (f"{checkpoint}: its OOD reference is pooled over all classes (fitted before the per-class format), so a "
            f"sample dominated by one class can raise the domain-shift alarm; refit it with "
            f"`{REFIT_COMMAND.format(checkpoint=checkpoint)}`")


def precision_of(path: str | None) -> str | None:
    """The arithmetic of a predictor path as the runs table names it (``"bf16 (openvino)"`` -> ``"bf16"``)."""
    return path.strip().split(" ", 1)[0] if path and path.strip() else None


def precisions_of(meta: Mapping[str, Any]) -> list[str]:
    """The arithmetics an ``ood`` entry has a validation reference for (its own first; fp32 if it names none)."""
    return [str(meta.get("precision") or LEGACY_PRECISION), *sorted(meta.get("by_precision") or {})]


def for_precision(meta: Mapping[str, Any], precision: str | None) -> dict[str, Any]:
    """The ``ood`` metadata entry with the validation reference of cells scored in ``precision`` (``bf16``,
    ``fp32 (openvino)``...); the entry's own (a copy) when there is none for it: its ``precision`` says which."""
    out = {k: v for k, v in meta.items() if k != "by_precision"}
    out["precision"] = str(meta.get("precision") or LEGACY_PRECISION)
    other = (meta.get("by_precision") or {}).get(precision_of(precision) or "")
    if other and precision_of(precision) != out["precision"]:
        out.update({k: other[k] for k in PRECISION_FIELDS if k in other}, precision=precision_of(precision))
        if "per_class" not in other:
            out.pop("per_class", None)
    return out


@dataclass
class OodReference:
    """A fitted OOD score: Gaussians, standardisation, threshold and the validation reference.

    Tensors go to the checkpoint's OOD file, everything else to its metadata
    (:meth:`metadata`); :meth:`from_parts` reads them back.
    """

    pen_means: np.ndarray
    pen_precision: np.ndarray
    early_mean: np.ndarray
    early_precision: np.ndarray
    early_layer: str
    early_call: int
    #: (median, std) of the validation log-distances, penultimate and early.
    pen_scale: tuple[float, float]
    early_scale: tuple[float, float]
    threshold: float
    #: validation score quantiles at 0, 1, ..., 100 %.
    val_quantiles: list[float]
    #: share of validation cells above the threshold.
    val_unidentified_share: float
    quantile: float = DEFAULT_QUANTILE
    n_train: int = 0
    n_val: int = 0
    #: per predicted class: the validation reference of its cells (None: fitted before the per-class format).
    per_class: dict[str, ClassReference] | None = None
    #: the arithmetic the validation features above were computed in.
    precision: str = LEGACY_PRECISION
    #: the validation reference of the same score in other arithmetics (metadata form: :data:`PRECISION_FIELDS`).
    by_precision: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def for_precision(self, precision: str | None) -> "OodReference":
        """This reference with the validation reference of cells scored in ``precision`` (:func:`for_precision`)."""
        import dataclasses

        meta = for_precision(self.metadata(""), precision)
        if meta["precision"] == self.precision:
            return self
        own = {k: v for k, v in self.metadata("").items() if k in PRECISION_FIELDS}
        return dataclasses.replace(
            self, threshold=float(meta["threshold"]), val_quantiles=list(meta["val_quantiles"]),
            val_unidentified_share=float(meta["val_unidentified_share"]), n_val=int(meta["n_val"]),
            per_class=per_class_of(meta), precision=meta["precision"],
            by_precision={**{k: v for k, v in self.by_precision.items() if k != meta["precision"]},
                          self.precision: own})

    def score(self, pen: np.ndarray, early: np.ndarray) -> np.ndarray:
        """The OOD score of cells given their penultimate and early features (higher = less like training)."""
        d_pen = np.log(_min_sq_distance(pen, self.pen_means, self.pen_precision) + 1e-12)
        d_early = np.log(_min_sq_distance(early, self.early_mean[None], self.early_precision) + 1e-12)
        return (d_pen - self.pen_scale[0]) / self.pen_scale[1] + (d_early - self.early_scale[0]) / self.early_scale[1]

    def tensors_bytes(self) -> bytes:
        """The arrays as a safetensors file."""
        from safetensors.numpy import save

        return save({k: np.ascontiguousarray(getattr(self, k), dtype=np.float64) for k in _TENSORS})

    def metadata(self, file_sha256: str) -> dict[str, Any]:
        """The checkpoint metadata ``ood`` entry (JSON values) for a tensor file with hash ``file_sha256``."""
        return {"file_sha256": file_sha256, "rule": EARLY_RULE, "early_layer": self.early_layer,
                "early_call": int(self.early_call), "pen_scale": [float(v) for v in self.pen_scale],
                "early_scale": [float(v) for v in self.early_scale], "threshold": float(self.threshold),
                "quantile": float(self.quantile), "val_quantiles": [float(v) for v in self.val_quantiles],
                "val_unidentified_share": float(self.val_unidentified_share), "n_train": int(self.n_train),
                "n_val": int(self.n_val), **self.extra,
                **({"per_class": {k: v.to_json() for k, v in sorted(self.per_class.items())}}
                   if self.per_class else {}),
                "precision": self.precision,
                **({"by_precision": {k: dict(v) for k, v in sorted(self.by_precision.items())}}
                   if self.by_precision else {})}

    @classmethod
    def from_parts(cls, meta: Mapping[str, Any], blob: bytes, where: str) -> "OodReference":
        """Rebuild from the metadata entry and the tensor file; refuses a file whose hash differs."""
        from safetensors.numpy import load

        if hashlib.sha256(blob).hexdigest() != meta.get("file_sha256"):
            raise OodError(f"{where}: the OOD file does not match the hash in the metadata (tampered or corrupted)")
        arrays = load(blob)
        missing = [k for k in _TENSORS if k not in arrays]
        if missing:
            raise OodError(f"{where}: the OOD file lacks {', '.join(missing)}")
        known = {"file_sha256", "rule", "early_layer", "early_call", "pen_scale", "early_scale", "threshold",
                 "quantile", "val_quantiles", "val_unidentified_share", "n_train", "n_val", "per_class", "precision",
                 "by_precision"}
        return cls(**{k: arrays[k] for k in _TENSORS}, early_layer=str(meta["early_layer"]),
                   early_call=int(meta["early_call"]), pen_scale=tuple(meta["pen_scale"]),
                   early_scale=tuple(meta["early_scale"]), threshold=float(meta["threshold"]),
                   val_quantiles=list(meta["val_quantiles"]),
                   val_unidentified_share=float(meta["val_unidentified_share"]),
                   quantile=float(meta.get("quantile", DEFAULT_QUANTILE)), n_train=int(meta.get("n_train", 0)),
                   n_val=int(meta.get("n_val", 0)), per_class=per_class_of(meta),
                   precision=str(meta.get("precision") or LEGACY_PRECISION),
                   by_precision={str(k): dict(v) for k, v in (meta.get("by_precision") or {}).items()},
                   extra={k: v for k, v in meta.items() if k not in known})


def _log_scale(values: np.ndarray) -> tuple[float, float]:
    logs = np.log(values + 1e-12)
    return float(np.median(logs)), float(max(np.std(logs), 1e-6))


def _val_entry(scores: np.ndarray, classes: np.ndarray | None, quantile: float, own: np.ndarray) -> dict[str, Any]:
    """The validation reference (:data:`PRECISION_FIELDS`, metadata form) of one arithmetic's reference scores;
    the threshold from the validation cells (``own``) only."""
    threshold = float(np.quantile(scores[own], quantile))
    entry = {"threshold": threshold,
             "val_quantiles": np.quantile(scores, np.linspace(0, 1, N_REFERENCE_QUANTILES)).tolist(),
             "val_unidentified_share": float(np.mean(scores > threshold)), "n_val": int(len(scores))}
    if classes is not None:
        if len(classes) != len(scores):
            raise OodError(f"{len(classes)} validation classes for {len(scores)} validation cells")
        entry["per_class"] = {k: v.to_json() for k, v in sorted(class_references(scores, classes, threshold).items())}
    return entry


def fit_ood(train_pen: np.ndarray, train_labels: np.ndarray, train_early: np.ndarray, val_pen: np.ndarray,
            val_early: np.ndarray, early: tuple[str, int], quantile: float = DEFAULT_QUANTILE,
            val_classes: np.ndarray | None = None, precision: str = LEGACY_PRECISION,
            other_val: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] | None = None,
            reference_only: np.ndarray | None = None) -> OodReference:
    """Fit the OOD score on training features and labels; standardise it and set its threshold on validation.

    ``val_classes``: the class the model predicts for each validation cell
    (names), for the per-class references (:func:`class_references`); without
    them the reference is pooled only. ``precision``: the arithmetic of these
    features. ``other_val``: per other arithmetic (``bf16``), the same
    validation cells' ``(penultimate, early, predicted classes)`` computed in
    it, for its own reference (``by_precision``). ``reference_only``: mask of
    validation rows that join the reference distributions but not the
    standardisation and threshold (unseen training cells: ``fit_ood_reference``).
    """
    from sklearn.covariance import LedoitWolf

    train_labels = np.asarray(train_labels)
    if len(train_pen) < 2 or len(val_pen) < 2:
        raise OodError(f"fitting the OOD score needs training and validation cells (got {len(train_pen)} and "
                       f"{len(val_pen)})")
    classes = np.unique(train_labels)
    means = np.stack([train_pen[train_labels == c].mean(axis=0) for c in classes])
    centred = train_pen - means[np.searchsorted(classes, train_labels)]
    pen_precision = LedoitWolf().fit(centred).precision_
    early_fit = LedoitWolf().fit(train_early)
    ref = OodReference(pen_means=means, pen_precision=pen_precision, early_mean=early_fit.location_,
                       early_precision=early_fit.precision_, early_layer=early[0], early_call=int(early[1]),
                       pen_scale=(0.0, 1.0), early_scale=(0.0, 1.0), threshold=0.0, val_quantiles=[],
                       val_unidentified_share=0.0, quantile=quantile, n_train=len(train_pen), n_val=len(val_pen))
    val = np.ones(len(val_pen), dtype=bool) if reference_only is None else ~np.asarray(reference_only, dtype=bool)
    ref.pen_scale = _log_scale(_min_sq_distance(val_pen[val], means, pen_precision))
    ref.early_scale = _log_scale(_min_sq_distance(val_early[val], ref.early_mean[None], ref.early_precision))
    own = _val_entry(ref.score(val_pen, val_early), val_classes, quantile, val)
    ref.threshold, ref.val_quantiles = own["threshold"], own["val_quantiles"]
    ref.val_unidentified_share, ref.per_class = own["val_unidentified_share"], per_class_of(own)
    ref.precision = precision
    for name, (pen, early_feats, classes_) in sorted((other_val or {}).items()):
        if name != precision:
            ref.by_precision[name] = _val_entry(ref.score(pen, early_feats), classes_, quantile, val)
    return ref


# --------------------------------------------------------------------------- domain-shift tests
@dataclass(frozen=True)
class ShiftRule:
    """When a group of cells counts as shifted: significant at ``alpha`` and at least ``min_effect``."""

    alpha: float = 0.0001
    min_effect: float = 0.25


def _cell_references(scores: np.ndarray, classes: np.ndarray | None, per_class: Mapping[str, ClassReference] | None,
                     val_quantiles: list[float], val_share: float,
                     n_val: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per cell: its score's quantile in its reference distribution and that reference's unidentified share; and
    the effective size of the mixture of references.

    The reference is the cell's predicted class's when there is one with at
    least :data:`MIN_CLASS_CELLS` validation cells, else the pooled one. Shares
    are floored at 1 / (validation cells of the reference), so a clean
    validation set does not make one odd cell significant. A mixture with
    weights ``w`` of references of ``m`` cells is itself known to within the
    error of ``1 / sum(w**2 / m)`` cells.
    """
    grid = np.asarray(val_quantiles, dtype=np.float64)
    u = np.interp(scores, grid, np.linspace(0.0, 1.0, len(grid)))
    p = np.full(len(scores), min(max(float(val_share), 1.0 / max(n_val, 1)), 1.0))
    pooled = np.ones(len(scores), dtype=bool)
    weights = []
    if classes is not None and per_class:
        classes = np.asarray(classes).astype(str)
        for name, ref in per_class.items():
            mask = classes == name
            if ref.n_val < MIN_CLASS_CELLS or not mask.any():
                continue
            own = np.asarray(ref.val_quantiles, dtype=np.float64)
            u[mask] = np.interp(scores[mask], own, np.linspace(0.0, 1.0, len(own)))
            p[mask] = min(max(ref.val_unidentified_share, 1.0 / ref.n_val), 1.0)
            pooled &= ~mask
            weights.append((mask.mean(), ref.n_val))
    if pooled.any():
        weights.append((pooled.mean(), max(n_val, 1)))
    return u, p, 1.0 / sum(w * w / m for w, m in weights)


def shift_statistics(scores: np.ndarray, threshold: float, val_quantiles: list[float], val_share: float,
                     rule: ShiftRule = ShiftRule(), n_val: int = 1000, classes: np.ndarray | None = None,
                     per_class: Mapping[str, ClassReference] | None = None) -> dict[str, Any]:
    """Domain-shift statistics of one group of OOD scores against the validation reference.

    Returns ``n_unidentified``, ``share_unidentified``, ``unidentified_p_value``
    (one-sided binomial: more unidentified cells than the reference share
    predicts), ``ood_ks`` and ``ood_ks_p_value`` (one-sided
    Kolmogorov--Smirnov: scores larger than the reference distribution, read
    from its quantiles) and ``domain_shift``. An empty group has null
    statistics and no alarm.

    With ``classes`` (each cell's predicted class) and ``per_class`` (the
    checkpoint's :class:`ClassReference` by class name), each cell is compared
    with its own class's validation distribution: the KS test runs on the
    cells' quantiles in their class's distribution (uniform for cells of the
    training laboratory, whatever the class mix), and the expected
    unidentified share is the mean of the cells' class shares. Without them
    (or for classes with under :data:`MIN_CLASS_CELLS` validation cells) the
    pooled ``val_quantiles``/``val_share`` are the reference. The KS
    p-value accounts for the reference's own sampling error (a two-sample
    test at the effective sizes), so a reference of a hundred validation cells
    per class does not make small samples alarm more often than ``alpha``.
    """
    from scipy import stats

    scores = np.asarray(scores, dtype=np.float64)
    finite = np.isfinite(scores)
    scores = scores[finite]
    if classes is not None:
        classes = np.asarray(classes)[finite]
    n = len(scores)
    if n == 0:
        return {"n_unidentified": 0, "share_unidentified": None, "unidentified_p_value": None, "ood_ks": None,
                "ood_ks_p_value": None, "domain_shift": False}
    u, p, m = _cell_references(scores, classes, per_class, val_quantiles, val_share, n_val)
    k = int((scores > threshold).sum())
    p0, share = float(p.mean()), k / n
    # A binomial at the mean share: the count is Poisson-binomial, whose variance is at most this one's, so the
    # p-value errs on the side of no alarm.
    p_binom = float(stats.binom.sf(k - 1, n, p0))
    d = float(stats.kstest(u, "uniform", alternative="less").statistic)
    # The reference is itself a sample (a few hundred cells per class): the p-value is that of the
    # two-sample test, at the effective size n*m/(n+m) (rounded down, so it errs towards no alarm).
    p_ks = float(stats.ksone.sf(d, max(int(n * m / (n + m)), 1)))
    shifted = ((p_binom < rule.alpha and share - p0 >= rule.min_effect)
               or (p_ks < rule.alpha and d >= rule.min_effect))
    return {"n_unidentified": k, "share_unidentified": share, "unidentified_p_value": p_binom, "ood_ks": d,
            "ood_ks_p_value": p_ks, "domain_shift": bool(shifted)}
