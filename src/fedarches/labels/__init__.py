"""Label transfer in the latent space: weighted kNN (paper eqs. 17-22) plus
calibrated novelty tests for cells of types the reference lacks."""

from fedarches.labels.novelty import ClassGaussianNovelty
from fedarches.labels.transfer import UNKNOWN, KNNLabelTransfer, LabelTransferResult, knn_weights

__all__ = ["UNKNOWN", "ClassGaussianNovelty", "KNNLabelTransfer", "LabelTransferResult", "knn_weights"]
