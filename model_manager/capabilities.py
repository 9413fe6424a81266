"""What a stored folder is: its model family and the tasks it can run, as sdserve_core.families reads them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from sdserve_core import family_index
from sdserve_core.model_folder import MODEL_INDEX

# The extra task name of a refiner (it runs Edit, and serves as another model's second pass).
REFINE = "refine"


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """A folder's family (`sd15`, `sdxl`) and tasks (`generate`, `edit`, `inpaint`, and `refine` for a refiner);
    empty for a folder without a model_index.json (a corrupt variant)."""

    family: str = ""
    tasks: tuple[str, ...] = ()


def describe(folder: Path) -> Capabilities:
    """The family and tasks of the diffusers folder `folder`, from its configs (no weights are read).

    Reads JSON only (sdserve_core.family_index imports no torch)."""
    if not (folder / MODEL_INDEX).is_file():
        return Capabilities()
    traits = family_index.traits_of(folder)
    tasks = tuple(task.value for task in traits.tasks) + ((REFINE,) if traits.refiner else ())
    return Capabilities(family_index.family_name(folder), tasks)
