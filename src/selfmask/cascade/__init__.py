"""selfmask.cascade: a root SMN, a router and expert SMNs with fused embeddings (METHOD.md section 4).

See docs/cascade.md for the recipe, the folder format and measured numbers.
"""

from selfmask.cascade.build import Dispatcher, build_cascade, dispatcher_steps, read_dispatcher
from selfmask.cascade.config import MODES, ROUTERS, CascadeConfig
from selfmask.cascade.evaluate import evaluate_cascade, time_inference
from selfmask.cascade.fusion import FusionPCA, concat_parts, fit_fusion
from selfmask.cascade.model import FORMAT_NAME, FORMAT_VERSION, Cascade, EmbedStats, read_manifest
from selfmask.cascade.router import Router, fit_pca, fit_router

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MODES",
    "ROUTERS",
    "Cascade",
    "CascadeConfig",
    "Dispatcher",
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
    "read_dispatcher",
    "read_manifest",
    "time_inference",
]
