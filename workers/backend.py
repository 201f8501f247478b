"""The factory that builds the promptable backend a manifest names (workers/promptable.py
is the interface). SAM and SAM 2 are imported only when asked for: they load torch, which
the weight-free backend and the driver's planning never need."""

from __future__ import annotations

from seglab.workers.promptable import PromptableBackend
from seglab.workers.tiling import TiledBackend, TilingConfig
from seglab.workers.weightfree import WeightFreeBackend


def build_backend(config, tiling=None) -> PromptableBackend:
    """The backend a manifest's ``backend`` section names, wrapped for large-image tiling
    (cheap: models load on first use)."""
    return TiledBackend(_build_plain(config), tiling or TilingConfig())


def _build_plain(config) -> PromptableBackend:
    if config.name == "weightfree":
        return WeightFreeBackend(config)
    if config.name == "sam":
        from seglab.workers.sam import SamBackend  # noqa: PLC0415 (torch loads only for a SAM backend)

        return SamBackend(config)
    if config.name == "sam2":
        from seglab.workers.sam2 import Sam2Backend  # noqa: PLC0415 (torch loads only for a SAM 2 backend)

        return Sam2Backend(config)
    raise ValueError(f"unknown backend '{config.name}'")


def feature_names(config, tiling=None) -> tuple[str, ...]:
    """Names of the arrays the ``embed`` stage stores for this backend (driver side)."""
    return build_backend(config, tiling).feature_names()


def backend_signature(config, tiling=None) -> dict[str, str]:
    """Model name, checkpoint sha256, preprocessing and tiling of this backend (driver side)."""
    return build_backend(config, tiling).signature()
