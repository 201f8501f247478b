"""Every stage seglab runs, by name (= module = store group = manifest key), and the
instances of ``refine`` and ``retrain`` that rounds add (store groups 'refine.1', 'retrain.1', ...)."""

from __future__ import annotations

from functools import cache

from seglab.stages.base import ROUND_SEPARATOR, MapStage, round_name
from seglab.stages.calibrate import Calibrate
from seglab.stages.embed import Embed
from seglab.stages.ingest import Ingest
from seglab.stages.prompts import Prompts
from seglab.stages.refine import Refine
from seglab.stages.retrain import Retrain
from seglab.stages.select import Select

STAGES: dict[str, type[MapStage]] = {
    "ingest": Ingest,
    "embed": Embed,
    "prompts": Prompts,
    "select": Select,
    "calibrate": Calibrate,
    "refine": Refine,
    "retrain": Retrain,
}


def round_stages(rounds: int) -> dict[str, type[MapStage]]:
    """The stages ``rounds: R`` adds, in run order: per round r < R the segmenter trained on
    round r's refined labels (retrain of round r), then the refinement of round r + 1 that
    uses its mean teacher. Round 0's refine is the plain ``refine``."""
    added: dict[str, type[MapStage]] = {}
    for r in range(rounds):
        for stage in (Retrain.in_round(r), Refine.in_round(r + 1)):
            added[stage.name] = stage
    return added


@cache
def stage_class(name: str) -> type[MapStage]:
    """A stage by its name in the store, round instances included ('refine.2')."""
    base, _, r = name.partition(ROUND_SEPARATOR)
    if base not in STAGES or (r and not r.isdigit()):
        raise KeyError(f"no stage '{name}'; stages are {', '.join(STAGES)} (and their rounds, e.g. 'refine.1')")
    stage = STAGES[base].in_round(int(r or 0))
    if stage.name != name:  # 'refine.0' is spelt 'refine'
        raise KeyError(f"no stage '{name}'; round 0 of '{base}' is '{round_name(base, 0)}'")
    return stage
