"""kNN monitor, linear probe."""

from tfssl.evaluation.callbacks import KNNMonitor, LinearProbeMonitor, TestAccuracy
from tfssl.evaluation.knn import extract, knn_accuracy, knn_predict
from tfssl.evaluation.linear_probe import fit_linear, linear_probe_accuracy
