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
    """Adult reference interval for a white-cell fraction, in % of white cells."""

    low: float
    high: float


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
    """

    name: str
    label: str
    folder_names: tuple[str, ...]
    file_prefixes: tuple[str, ...]
    is_wbc: bool
    reference_range: ReferenceRange | None = None


CELL_CLASSES: tuple[CellClass, ...] = (
    CellClass("basophil", "Basophil", ("basophil", "basophils"), ("BA",), True,
              ReferenceRange(0.5, 1.0)),
    CellClass("eosinophil", "Eosinophil", ("eosinophil", "eosinophils"), ("EO",), True,
              ReferenceRange(1.0, 4.0)),
    # Erythroblasts are nucleated red cells: never part of the WBC denominator,
    # reported per 100 WBC and flagged whenever present in adult blood.
    CellClass("erythroblast", "Erythroblast", ("erythroblast", "erythroblasts"), ("ERB",), False),
    # Immature granulocytes are white cells but have no normal range in adults:
    # any fraction above ~0.9 % is flagged (see DEFAULT_IG_FLAG_PERCENT).
    CellClass("ig", "Immature granulocyte", ("ig", "immature_granulocyte", "immature_granulocytes"),
              ("IG", "MY", "PMY", "MMY"), True),
    CellClass("lymphocyte", "Lymphocyte", ("lymphocyte", "lymphocytes"), ("LY",), True,
              ReferenceRange(20.0, 40.0)),
    CellClass("monocyte", "Monocyte", ("monocyte", "monocytes"), ("MO",), True,
              ReferenceRange(2.0, 8.0)),
    CellClass("neutrophil", "Neutrophil", ("neutrophil", "neutrophils"), ("SNE", "BNE", "NEUTROPHIL"), True,
              ReferenceRange(40.0, 60.0)),
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

#: ig above this % of white cells is flagged.
DEFAULT_IG_FLAG_PERCENT: float = 0.9
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


def is_image_path(path: str) -> bool:
    """True when ``path`` has one of the supported image extensions."""
    return path.lower().endswith(IMAGE_EXTENSIONS)
