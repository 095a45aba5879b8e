"""Label transfer in the latent space: weighted kNN (paper eqs. 17-22) plus
calibrated novelty tests for cells of types the reference lacks (docs/LABELS.md).

Modules: ``weights`` (paper eqs. 17-21), ``knn`` (exact k-d tree and faiss IVF
search), ``calibration`` (per-label novelty thresholds), ``novelty`` (class
Gaussians), ``transfer`` (:class:`KNNLabelTransfer`, fit/predict/state).
"""

from fedarches.labels.novelty import ClassGaussianNovelty
from fedarches.labels.transfer import UNKNOWN, KNNLabelTransfer, LabelTransferResult
from fedarches.labels.weights import knn_weights

__all__ = ["UNKNOWN", "ClassGaussianNovelty", "KNNLabelTransfer", "LabelTransferResult", "knn_weights"]
