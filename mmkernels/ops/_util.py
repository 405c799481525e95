"""Small helpers shared by the op folders' registration code."""
from __future__ import annotations

from typing import Iterable, List

import torch


def fresh_outputs(outputs: Iterable[torch.Tensor], inputs: Iterable) -> List[torch.Tensor]:
    """What a custom op may return: contiguous (the layout every fake promises) and sharing no
    storage with its inputs or with each other (torch.library forbids aliases; a reference
    backend's ``torch.func`` gradients can be views of ``grad_out`` or slices of one tensor). No copy for fresh contiguous tensors (Triton's)."""
    storages = {t.untyped_storage()._cdata for t in inputs if isinstance(t, torch.Tensor)}
    out = []
    for o in outputs:
        if o.numel() == 0 or o.untyped_storage()._cdata in storages:
            o = o.clone(memory_format=torch.contiguous_format)
        o = o.contiguous()
        storages.add(o.untyped_storage()._cdata)  # nor with each other (slices of one gradient)
        out.append(o)
    return out
