"""``patch(model)`` / ``unpatch(model)``: the walk, the report and the checks every family shares.

A patched module keeps its class, its parameters (the very same tensors, with the same names) and
its hooks; only its ``forward`` is replaced, by an instance attribute bound to the family's
absorbed forward, so the state dict, optimizer state, ``.to()``, DDP/FSDP wrapping and
``torch.compile`` see the module as before. ``unpatch`` deletes that attribute.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..backend import BACKENDS

_MARK = "_mmkernels_patch"
OPTIONS = ("backend", "families")


@dataclasses.dataclass
class PatchReport:
    """``patched``: ``(qualified name, family)`` of every module whose forward was replaced;
    ``skipped``: ``(qualified name, class name, reason)`` of every candidate left alone."""
    patched: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"mmkernels.patch: {len(self.patched)} patched, {len(self.skipped)} left alone"]
        lines += [f"  patched {name or '<root>'} ({family})" for name, family in self.patched]
        lines += [f"  skipped {name or '<root>'} ({cls}): {why}" for name, cls, why in self.skipped]
        return "\n".join(lines)

    def reasons(self) -> List[str]:
        return [why for _, _, why in self.skipped]


# --- checks shared by the families ---------------------------------------------------------------

def linear_why_not(name: str, m) -> Optional[str]:
    """A projection the absorbed forward reads the weight and bias of, without calling it."""
    if m is None:
        return f"{name}: missing"
    if hasattr(m, "base_layer") or hasattr(m, "lora_A") or type(m).__module__.startswith("peft"):
        return f"LoRA/PEFT-wrapped projection ({name})"
    if not isinstance(m, nn.Linear):
        return f"{name} is {type(m).__name__}, not a plain nn.Linear (unrecognised projection)"
    return hooks_why_not(name, m)


def hooks_why_not(name: str, m: nn.Module) -> Optional[str]:
    """The absorbed forward never calls this module: its hooks would not run."""
    if m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None):
        return f"forward hooks on {name} (the absorbed forward does not call it)"
    return None


def identity_like(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def first(*reasons) -> Optional[str]:
    for r in reasons:
        if r:
            return r
    return None


def options_of(module) -> dict:
    return getattr(module, _MARK)[1]


def original_forward(module):
    """The class's own forward, bound to the module (what runs when a call is outside what the
    absorbed forward covers, e.g. a mask of another form)."""
    return functools.partial(type(module).forward, module)


# --- patch / unpatch -----------------------------------------------------------------------------

def _families():
    from . import aimv2, clip_resnet, timm_latent, transformers_siglip
    return (timm_latent, transformers_siglip, aimv2, clip_resnet)


def _candidate(module) -> bool:
    """Modules that look like an attention-pooling head, to be reported when no family knows them."""
    n = type(module).__name__.lower()
    return "attentionpool" in n or "attentionpooling" in n or "attentionalpool" in n or n.endswith("maphead")


def patch(model, **options) -> PatchReport:
    """Swap, in place, the forward of every attention-pooling head of ``model`` that mmkernels
    knows for its exact absorbed form; returns a :class:`PatchReport`.

    Options: ``backend`` (one of ``mmkernels.BACKENDS``, or None for the process-wide choice) for
    the latent_pool calls; ``families`` (names among ``timm_latent``, ``transformers_siglip``,
    ``aimv2``, ``clip_resnet``) to patch only those. Patching twice is harmless."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"options: unknown option(s) {', '.join(unknown)}; expected any of {', '.join(OPTIONS)}")
    backend = options.get("backend")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected None or one of {', '.join(BACKENDS)}, got {backend!r}")
    families = _families()
    names = {f.NAME for f in families}
    wanted = options.get("families")
    if wanted is not None:
        if isinstance(wanted, str) or not isinstance(wanted, Iterable) or not set(wanted) <= names:
            raise ValueError(f"families: expected a list of names among {', '.join(sorted(names))}, got {wanted!r}")
        families = tuple(f for f in families if f.NAME in set(wanted))
    report = PatchReport()
    for qname, module in model.named_modules():
        family = next((f for f in families if f.matches(module)), None)
        if family is None:
            if _candidate(module) and not any(f.matches(module) for f in _families()):
                report.skipped.append((qname, type(module).__name__, "unrecognised attention-pooling module"))
            continue
        reason = family.why_not(module)
        if reason:
            report.skipped.append((qname, type(module).__name__, reason))
            continue
        module.__dict__["forward"] = types.MethodType(family.forward, module)
        setattr(module, _MARK, (family.NAME, {"backend": backend}))
        report.patched.append((qname, family.NAME))
    return report


def unpatch(model) -> int:
    """Give every module :func:`patch` swapped its own forward back; returns how many."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    count = 0
    for module in model.modules():
        if _MARK in module.__dict__:
            module.__dict__.pop("forward", None)
            delattr(module, _MARK)
            count += 1
    return count


def is_patched(module: nn.Module) -> bool:
    return _MARK in module.__dict__
