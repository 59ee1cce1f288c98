"""selfmask.evaluation: frozen-feature protocols (weighted k-NN, linear probe) of METHOD.md section 3."""

from selfmask.evaluation.features import extract_features, pixel_features
from selfmask.evaluation.knn import DEFAULT_K, DEFAULT_TEMPERATURE, KNNResult, knn_accuracy, knn_classify
from selfmask.evaluation.linear_probe import DEFAULT_C_GRID, ProbeResult, linear_probe
from selfmask.evaluation.views import ViewAgreement, view_agreement

__all__ = [
    "DEFAULT_C_GRID",
    "DEFAULT_K",
    "DEFAULT_TEMPERATURE",
    "KNNResult",
    "ProbeResult",
    "ViewAgreement",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "linear_probe",
    "pixel_features",
    "view_agreement",
]
