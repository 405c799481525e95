"""``mmkernels.patch(model)``: swap the attention-pooling heads of a model you already have (timm
``AttentionPoolLatent`` and ``AttentionPool2d``, transformers SigLIP / SigLIP2 / AIMv2 heads,
CLIP / open_clip ``AttentionPool2d``) for their exact absorbed form on :func:`mmkernels.latent_pool`.
One file per family; :mod:`._core` walks the model and writes the report.

This package is callable: ``mmkernels.patch(model, **options)`` is
:func:`mmkernels.patch.patch`, so both spellings work."""
import sys
import types

from ._core import PatchReport, is_patched, patch, unpatch

__all__ = ["patch", "unpatch", "PatchReport", "is_patched"]


class _CallablePackage(types.ModuleType):
    def __call__(self, model, **options) -> PatchReport:
        return patch(model, **options)


sys.modules[__name__].__class__ = _CallablePackage
