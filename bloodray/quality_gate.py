"""The checkpoint quality gate: the minimums a model must meet on its own val split before it classifies cells.

``bloodray calibrate`` measures the model on the run's val split and refuses to seal a checkpoint that misses
one of these minimums (``--force`` seals it anyway and records that it was forced); ``bloodray classify``
refuses a checkpoint that was never calibrated this way, or whose sealed val metrics miss them, unless
``model.quality_gate: false`` (an explicit opt-out; each such run logs a warning naming the failures).

The minimums are deliberately far below any model worth shipping (the packaged ones score above 0.95 on
every class): they stop a useless checkpoint (a 1-epoch chance-level run calls every cell "basophil" and
fits a temperature of ~100), they do not certify a good one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from bloodray.classes import CLASS_NAMES


@dataclass(frozen=True)
class GateMinimums:
    """What a sealed checkpoint must reach on its val split (documented in the ML engineer guide)."""

    #: share of val cells classified right.
    val_accuracy: float = 0.80
    #: recall of every class on val (a class without any val cell fails: its recall is unknown).
    class_recall: float = 0.50
    #: the highest fitted softmax temperature: above it the logits carry no usable confidence (a chance-level
    #: model fits ~100, the search's bound). A low one is no fault: a val split the model gets entirely right
    #: fits the search's lower bound, 0.01.
    max_temperature: float = 10.0


MINIMUMS = GateMinimums()


class QualityGateError(ValueError):
    """A checkpoint is unsealed or misses the quality gate's minimums (exit status ``quality_gate``)."""


def failures(calibration: Mapping[str, Any], minimums: GateMinimums = MINIMUMS) -> list[str]:
    """Why a calibration block misses the gate, one phrase per failure; empty when it passes.

    A block without the val metrics (a checkpoint calibrated before they were recorded, or never) fails.
    """
    if not calibration or "val_accuracy" not in calibration or "val_recall" not in calibration:
        return ["not calibrated with val metrics (run `bloodray calibrate` on its training run)"]
    found = []
    accuracy = calibration["val_accuracy"]
    if not _number(accuracy) or accuracy < minimums.val_accuracy:
        found.append(f"val accuracy {_show(accuracy)} < {minimums.val_accuracy:.2f}")
    recall = calibration["val_recall"] if isinstance(calibration["val_recall"], Mapping) else {}
    for name in CLASS_NAMES:
        value = recall.get(name)
        if value is None:
            found.append(f"no val cell of class {name} (its recall is unknown)")
        elif not _number(value) or value < minimums.class_recall:
            found.append(f"{name} val recall {_show(value)} < {minimums.class_recall:.2f}")
    temperature = calibration.get("temperature")
    if not _number(temperature) or not 0 < temperature <= minimums.max_temperature:
        found.append(f"temperature {_show(temperature)} > {minimums.max_temperature:g} (the logits carry no usable "
                     "confidence)")
    return found


def record(calibration: Mapping[str, Any], forced: bool, minimums: GateMinimums = MINIMUMS) -> dict[str, Any]:
    """The ``gate`` entry ``bloodray calibrate`` seals: passed or not, forced or not, why, and the minimums."""
    missed = failures(calibration, minimums)
    return {"passed": not missed, "forced": bool(forced and missed), "failures": missed,
            "minimums": asdict(minimums)}


def check_calibration(calibration: Mapping[str, Any], where: str, force: bool = False) -> dict[str, Any]:
    """The gate record for a fresh calibration of ``where``; :class:`QualityGateError` when it fails unforced."""
    entry = record(calibration, force)
    if not entry["passed"] and not force:
        raise QualityGateError(f"{where}: refused to seal: {'; '.join(entry['failures'])} (quality gate minimums "
                               "in the ML engineer guide; `bloodray calibrate --force` seals it anyway, marked as "
                               "forced, and classify will still refuse it)")
    return entry


def check_checkpoint(metadata: Any, where: str) -> None:
    """Refuse, in one line naming ``where``, a checkpoint whose sealed calibration misses the gate.

    The sealed metrics are checked again against this version's minimums, so a checkpoint sealed with
    ``--force`` (or under laxer minimums) is refused too.
    """
    missed = failures(metadata.calibration)
    if missed:
        forced = " (sealed with --force)" if (metadata.calibration.get("gate") or {}).get("forced") else ""
        raise QualityGateError(f"model.checkpoint {where}: fails the quality gate{forced}: {'; '.join(missed)}; "
                               "calibrate a better model, or set model.quality_gate=false to classify with it "
                               "anyway (each such run then logs a warning)")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _show(x: Any) -> str:
    return f"{x:.3f}" if _number(x) else repr(x)
