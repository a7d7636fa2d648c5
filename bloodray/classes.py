"""Facts about the eight PBC cell classes, kept as data in one place.

Everything that needs to know about cell classes -- the model head size, label
indices, folder and file-name mapping, differential counts and clinical flags --
reads from :data:`CELL_CLASSES`. The order of that tuple *is* the label index
order used by every model and checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath


@dataclass(frozen=True)
class ReferenceRange:
    """Adult reference interval of a white-cell class, in % of white cells or in 10^9/L.

    ``low`` and ``high`` are the interval as laboratories publish it (reports
    draw it). ``flag_low=False`` means the range has no low limit for flagging:
    a value below ``low`` is never flagged (low basophils, eosinophils and
    monocytes, which no clinician acts on).
    """

    low: float
    high: float
    flag_low: bool = True


@dataclass(frozen=True)
class CellClass:
    """One class of peripheral blood cell as labelled in the PBC dataset.

    Attributes:
        name: canonical class name, also the PBC folder name.
        label: human-readable label for reports.
        folder_names: folder names (lower case) that map to this class.
        file_prefixes: PBC file-name prefixes (upper case, before the first ``_``).
        is_wbc: whether the cell is a white blood cell (counts toward the
            differential denominator).
        reference_range: adult reference range in % of white cells, where one
            applies (the five mature leukocytes).
        absolute_range: adult reference range of the absolute count in 10^9/L,
            used instead of ``reference_range`` when a sample's WBC count is known.
    """

    name: str
    label: str
    folder_names: tuple[str, ...]
    file_prefixes: tuple[str, ...]
    is_wbc: bool
    reference_range: ReferenceRange | None = None
    absolute_range: ReferenceRange | None = None


# Percent ranges: the classic textbook adult differential (neutrophils 40-60 %,
# lymphocytes 20-40 %, monocytes 2-8 %, eosinophils 1-4 %, basophils 0.5-1 %).
# Absolute ranges (10^9/L): common UK adult reference intervals, the most
# frequent interval per cell type among the UK laboratories and sources listed
# in Table 6 of Front. Pharmacol. 2020;11:314, doi:10.3389/fphar.2020.00314:
# NEUT 2.0-7.5, LYMPH 1.0-4.0 (1.5-4.0 or 1.0-3.5 in some laboratories),
# MONO 0.2-1.0, EOSIN 0.0-0.5, BASO 0.0-0.1.
# Low basophils, eosinophils and monocytes are never flagged (flag_low=False).
CELL_CLASSES: tuple[CellClass, ...] = (
    CellClass("basophil", "Basophil", ("basophil", "basophils"), ("BA",), True,
              ReferenceRange(0.5, 1.0, flag_low=False), ReferenceRange(0.0, 0.1, flag_low=False)),
    CellClass("eosinophil", "Eosinophil", ("eosinophil", "eosinophils"), ("EO",), True,
              ReferenceRange(1.0, 4.0, flag_low=False), ReferenceRange(0.0, 0.5, flag_low=False)),
    # Erythroblasts are nucleated red cells: never part of the WBC denominator,
    # reported per 100 WBC and flagged when the whole confidence interval lies
    # above DEFAULT_ERYTHROBLAST_FLAG_PER_100_WBC.
    CellClass("erythroblast", "Erythroblast", ("erythroblast", "erythroblasts"), ("ERB",), False),
    # Immature granulocytes are white cells but have no normal range in adults:
    # flagged when the whole confidence interval lies above DEFAULT_IG_FLAG_PERCENT.
    CellClass("ig", "Immature granulocyte", ("ig", "immature_granulocyte", "immature_granulocytes"),
              ("IG", "MY", "PMY", "MMY"), True),
    CellClass("lymphocyte", "Lymphocyte", ("lymphocyte", "lymphocytes"), ("LY",), True,
              ReferenceRange(20.0, 40.0), ReferenceRange(1.0, 4.0)),
    CellClass("monocyte", "Monocyte", ("monocyte", "monocytes"), ("MO",), True,
              ReferenceRange(2.0, 8.0, flag_low=False), ReferenceRange(0.2, 1.0, flag_low=False)),
    CellClass("neutrophil", "Neutrophil", ("neutrophil", "neutrophils"), ("SNE", "BNE", "NEUTROPHIL"), True,
              ReferenceRange(40.0, 60.0), ReferenceRange(2.0, 7.5)),
    CellClass("platelet", "Platelet", ("platelet", "platelets", "thrombocyte", "thrombocytes"),
              ("PLATELET",), False),
)

CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CELL_CLASSES)
NUM_CLASSES: int = len(CELL_CLASSES)
CLASS_TO_INDEX: dict[str, int] = {c.name: i for i, c in enumerate(CELL_CLASSES)}
WBC_CLASSES: tuple[str, ...] = tuple(c.name for c in CELL_CLASSES if c.is_wbc)
# The five mature leukocytes of the classic manual differential, in the order
# hematology reports list them.
DIFFERENTIAL_CLASSES: tuple[str, ...] = ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil")

#: ig above this % of white cells (= per 100 WBC) is flagged (whole confidence interval above it).
DEFAULT_IG_FLAG_PERCENT: float = 0.9
#: erythroblasts above this many per 100 WBC are flagged (whole confidence interval above it).
DEFAULT_ERYTHROBLAST_FLAG_PER_100_WBC: float = 1.0
#: confidence level of the intervals that flags are judged on.
DEFAULT_FLAG_CONFIDENCE: float = 0.95
#: a differential on fewer white cells than this is flagged as unreliable.
DEFAULT_MIN_WBC_FOR_DIFFERENTIAL: int = 100

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

_BY_FOLDER = {f: c.name for c in CELL_CLASSES for f in c.folder_names}
_BY_PREFIX = {p: c.name for c in CELL_CLASSES for p in c.file_prefixes}
_PREFIX_RE = re.compile(r"^([A-Za-z]+)")


def cell_class(name: str) -> CellClass:
    """Return the :class:`CellClass` named ``name`` (canonical name)."""
    return CELL_CLASSES[CLASS_TO_INDEX[name]]


def class_from_folder(folder: str) -> str | None:
    """Map a class folder name (any case, PBC or plural spelling) to a class name."""
    return _BY_FOLDER.get(folder.strip().lower())


def class_from_filename(filename: str) -> str | None:
    """Map a PBC file name such as ``BNE_191112.jpg`` to a class via its prefix."""
    match = _PREFIX_RE.match(PurePosixPath(filename).name)
    return _BY_PREFIX.get(match.group(1).upper()) if match else None


def reference_ranges() -> dict[str, ReferenceRange]:
    """Default adult reference ranges (% of white cells) keyed by class name."""
    return {c.name: c.reference_range for c in CELL_CLASSES if c.reference_range is not None}


def absolute_reference_ranges() -> dict[str, ReferenceRange]:
    """Default adult reference ranges of absolute counts (10^9/L) keyed by class name."""
    return {c.name: c.absolute_range for c in CELL_CLASSES if c.absolute_range is not None}


def is_image_path(path: str) -> bool:
    """True when ``path`` has one of the supported image extensions."""
    return path.lower().endswith(IMAGE_EXTENSIONS)
