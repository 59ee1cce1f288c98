"""selfmask.cascade: a root SMN, a router and expert SMNs with fused embeddings (METHOD.md section 4).

See docs/cascade.md for the recipe, the folder format and measured numbers.
"""

from selfmask.cascade.build import build_cascade, dispatcher_steps, evaluate_cascade, fit_fusion, time_inference
from selfmask.cascade.config import MODES, ROUTERS, CascadeConfig
from selfmask.cascade.fusion import FusionPCA, concat_parts
from selfmask.cascade.model import FORMAT_NAME, FORMAT_VERSION, Cascade, EmbedStats, read_manifest
from selfmask.cascade.router import Router, fit_pca, fit_router

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODES",
    "ROUTERS",
    "Cascade",
    "CascadeConfig",
    "EmbedStats",
    "FusionPCA",
    "Router",
    "build_cascade",
    "concat_parts",
    "dispatcher_steps",
    "evaluate_cascade",
    "fit_fusion",
    "fit_pca",
    "fit_router",
    "read_manifest",
    "time_inference",
]
