"""Every stage seglab runs, by name (= module = store group = manifest key)."""
from __future__ import annotations

from seglab.stages.base import Stage
from seglab.stages.calibrate import Calibrate
from seglab.stages.embed import Embed
from seglab.stages.ingest import Ingest
from seglab.stages.prompts import Prompts
from seglab.stages.refine import Refine
from seglab.stages.retrain import Retrain
from seglab.stages.select import Select

STAGES: dict[str, type[Stage]] = {
    "ingest": Ingest,
    "embed": Embed,
    "prompts": Prompts,
    "select": Select,
    "calibrate": Calibrate,
    "refine": Refine,
    "retrain": Retrain,
}
