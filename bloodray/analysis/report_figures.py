"""Figures of the nightly report (matplotlib, rendered to PNG bytes) and the flag helpers they share with it."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

from bloodray.analysis.gallery import num
from bloodray.classes import DIFFERENTIAL_CLASSES, cell_class, reference_ranges
from bloodray.nightly.contract import FLAGS_UNVERIFIED
from bloodray.ood import SHIFT_FLAG

#: Samples per differential figure; more make rows too thin to read.
SAMPLES_PER_FIGURE = 40
#: Rows listed in the review-queue chart and the error examples.
TOP_N = 40

_OK, _LOW, _HIGH = "#2b7bba", "#d62728", "#d62728"


def side(sample: Mapping[str, Any], cls: str) -> str | None:
    """``low``/``high`` when the sample's fraction of ``cls`` is out of range.

    The job's flag columns are authoritative; the reference range is only the
    fallback for outputs written before a flag column existed.
    """
    low, high = sample.get(f"flag_{cls}_low"), sample.get(f"flag_{cls}_high")
    if low is not None or high is not None:
        return "low" if low else "high" if high else None
    value, ref = num(sample.get(f"pct_{cls}")), reference_ranges().get(cls)
    if value is None or ref is None:
        return None
    return "low" if value < ref.low and ref.flag_low else "high" if value > ref.high else None


def flags_of(sample: Mapping[str, Any]) -> list[str]:
    """The sample's flag names (the job's ``flags`` list when present)."""
    flags = sample.get("flags")
    if flags is not None:
        return [str(f) for f in flags]
    out = [f"{c}_{s}" for c in DIFFERENTIAL_CLASSES if (s := side(sample, c))]
    out += [name for name in ("erythroblasts", "ig", "low_wbc_count") if sample.get(f"flag_{name}")]
    return out


#: What the report writes after each flag a sample under the domain-shift alarm keeps.
UNVERIFIED_MARK = " (unverified: domain shift)"


def flag_text(sample: Mapping[str, Any], empty: str = "") -> str:
    """The sample's flags for reading: comma-separated, each one kept under the domain-shift alarm marked unverified."""
    flags = flags_of(sample)
    if sample.get(FLAGS_UNVERIFIED):
        flags = [f if f == SHIFT_FLAG else f + UNVERIFIED_MARK for f in flags]
    return ", ".join(flags) or empty


def flagged(sample: Mapping[str, Any]) -> bool:
    """True when the sample has any flag."""
    any_flag = sample.get("any_flag")
    return bool(any_flag) if any_flag is not None else bool(flags_of(sample))


def review_pct(sample: Mapping[str, Any]) -> float | None:
    """Share of the classified images needing review (%)."""
    n_review = num(sample.get("n_review"))
    denom = num(sample.get("n_classified")) or num(sample.get("n_images"))
    return None if n_review is None or not denom else 100.0 * n_review / denom


# --------------------------------------------------------------------------- figures
def png(fig: Any) -> bytes:
    """PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def short(text: Any, n: int = 24) -> str:
    """``text`` cut to ``n`` characters."""
    text = str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def differential_figures(samples: list[dict[str, Any]]) -> dict[str, bytes]:
    """Differential figures (one per SAMPLES_PER_FIGURE samples), name -> PNG bytes."""
    # A bare Figure renders through Agg without pyplot, so no global backend is
    # switched in the caller's process and nothing opens a window.
    from matplotlib.figure import Figure

    ref = reference_ranges()
    # One x scale per class across all pages, so pages compare at a glance.
    xmax = {c: max([ref[c].high * 1.6] + [v * 1.08 for s in samples if (v := num(s.get(f"pct_{c}"))) is not None])
            for c in DIFFERENTIAL_CLASSES}
    out: dict[str, bytes] = {}
    for page, start in enumerate(range(0, len(samples), SAMPLES_PER_FIGURE), start=1):
        chunk = samples[start:start + SAMPLES_PER_FIGURE]
        fig = Figure(figsize=(13, 1.4 + 0.3 * len(chunk)), layout="constrained")
        axes = fig.subplots(1, len(DIFFERENTIAL_CLASSES), sharey=True)
        ys = list(range(len(chunk)))
        for ax, cls in zip(axes, DIFFERENTIAL_CLASSES):
            rng = ref[cls]
            values = [num(s.get(f"pct_{cls}")) for s in chunk]
            ax.axvspan(rng.low, rng.high, color="#2ca02c", alpha=0.18, lw=0)
            for y, s, v in zip(ys, chunk, values):
                if v is None:
                    continue
                where = side(s, cls)
                ax.plot([v], [y], "o", ms=6, color=_OK if where is None else _HIGH if where == "high" else _LOW,
                        mfc="white" if where is None else None)
            ax.set_xlim(0, xmax[cls])
            ax.set_title(f"{cell_class(cls).label}\n{rng.low:g}–{rng.high:g} %", fontsize=10)
            ax.set_xlabel("% of WBC")
            ax.grid(axis="x", alpha=0.3)
            ax.set_ylim(len(chunk) - 0.5, -0.5)
        axes[0].set_yticks(ys, [short(s.get("sample_id")) for s in chunk], fontsize=8)
        for label, s in zip(axes[0].get_yticklabels(), chunk):
            if flagged(s):  # other flags (IG, low WBC count...) have no dot to colour
                label.set_color(_HIGH)
        fig.suptitle("WBC differential vs adult reference range (shaded); red = flagged", fontsize=11)
        out[f"differential_{page}.png"] = png(fig)
    return out


def barh(labels: Sequence[str], values: Sequence[float], title: str, xlabel: str, color: str,
          integer: bool = False) -> bytes:
    """A horizontal bar chart as PNG bytes."""
    """A horizontal bar chart as PNG bytes."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 1.2 + 0.3 * len(labels)), layout="constrained")
    ax = fig.subplots()
    ys = list(range(len(labels)))
    ax.barh(ys, values, color=color)
    ax.set_yticks(ys, [short(x, 32) for x in labels], fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return png(fig)


def prediction_figure(classes: list[tuple[str, int, int]], bins: list[tuple[float, int]]) -> bytes:
    """Predicted classes and the confidence histogram as PNG bytes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    names = [c[0] for c in classes]
    ax1.bar(names, [c[1] - c[2] for c in classes], color=_OK, label="confident")
    ax1.bar(names, [c[2] for c in classes], bottom=[c[1] - c[2] for c in classes], color="#ff7f0e",
            label="needs review")
    ax1.set_title("Predicted class", fontsize=11)
    ax1.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax1.legend(fontsize=8)
    ax2.bar([b + 0.025 for b, _ in bins], [n for _, n in bins], width=0.048, color=_OK)
    ax2.set_xlim(0, 1)
    ax2.set_title("Confidence of the predicted class", fontsize=11)
    ax2.set_xlabel("confidence")
    return png(fig)


def render_figures(page: Any) -> None:
    """Render the report's PNG figures into ``page.figures`` (name -> bytes)."""
    if page.samples:
        page.figures.update(differential_figures(page.samples))
    counts: dict[str, int] = {}
    for s in page.samples:
        for f in flags_of(s):
            counts[f] = counts.get(f, 0) + 1
    if counts:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]
        page.figures["flags.png"] = barh([k for k, _ in top], [v for _, v in top],
                                          "Samples per flag", "samples", _HIGH, integer=True)
    review = sorted(((s.get("sample_id"), p) for s in page.samples if (p := review_pct(s))),
                    key=lambda kv: -kv[1])[:TOP_N]
    if review:
        page.figures["review.png"] = barh([str(k) for k, _ in review], [v for _, v in review],
                                           "Share of images needing review (top samples)", "% of classified",
                                           "#ff7f0e")
    if page.classes:
        page.figures["predictions.png"] = prediction_figure(page.classes, page.confidence_bins)


