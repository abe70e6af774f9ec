"""kNN monitor, linear probe, soft nearest-neighbour classifier, fine-tuning."""

from tfssl.evaluation.callbacks import KNNMonitor, LinearProbeMonitor, TestAccuracy
from tfssl.evaluation.knn import extract, knn_accuracy, knn_predict
from tfssl.evaluation.linear_probe import fit_linear, linear_probe_accuracy
from tfssl.evaluation.finetune import fine_tune, finetune_model
from tfssl.evaluation.snn import SNNHead, SNNMonitor, snn_accuracy, snn_predict
