"""Call plans: what a repeat call of an op on a GPU runs instead of its backend's Python.

The first call of an op's forward or backward with a given **signature** runs as usual: the
backend is selected, its Python computes strides, tiles and grids, allocates outputs and launches
kernels. The next call of that signature that launches every kernel through a prepared launch
(:mod:`mmkernels.runtime`: the kernel compiled and its launch plan made) is **recorded**: every
torch op it runs, through a ``TorchDispatchMode``, and every launch with the argument dict the
kernel's launcher takes (a call of the CUDA C++ library is one such op). Later calls with the same
signature **replay** the :class:`CallPlan`: the same torch ops (allocations, views) on this call's
tensors, then each launch with this call's pointers. Nothing else of the backend runs. A replay
leaves out what a Triton launcher does not read: a view that only launches take (a launcher reads
a tensor's data pointer; the shapes and strides are the signature's) is replaced by its source,
and an output allocated, launched into and returned as a view is allocated in the view's shape.

The signature (:func:`signature`) is everything the recorded Python could have read: per tensor
its dtype, device, shape, strides, storage offset, whether it requires grad and whether its address
is 16-byte aligned (what Triton specialises on); which arguments are the same tensor, and which
share one memory; every other argument's value; and the process-wide choices a backend reads
(the launch mode, forced kernel candidates, TF32 for fp32 products, :data:`generation`). Two calls with one signature make the
same choices, so the recorded launches are those the backend would make, with this call's tensors.

A call is not recorded where a replay could differ (see :meth:`Table.call`): tensors not on a GPU
(the CPU path, the Triton interpreter), a backend other than ``triton`` or ``cuda``, autocast, an
active dispatch mode or ``torch.func`` transform, CUDA-graph capture, a launch not prepared (a
first compile, autotuning, a profiler's launch hook), a device value read on the host (``.item()``,
a copy to the CPU), or a tensor from outside the call (a backend's cache). Nor where the replay would not be faster (:func:`_replay_cost`). A signature
whose recording fails :data:`ATTEMPTS` times is left to the backend's Python.

``MMKERNELS_PLANS=0`` (read at import) or :func:`set_enabled` turns plans off."""
from __future__ import annotations

import copy
import os
import threading
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ENABLED = os.environ.get("MMKERNELS_PLANS", "1").strip().lower() not in ("0", "false", "no")
PLANNED_BACKENDS = ("triton", "cuda")
ATTEMPTS = 4          # recordings tried per signature before it is left to the backend's Python
LIMIT = 512           # signatures kept per op and pass (a full table starts over)
generation = 0        # bumped by whatever makes the recorded choices stale (runtime.reset_plans)
stats: Dict[str, int] = {}

_aten = torch.ops.aten
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active
_autocast = torch._C._is_any_autocast_enabled
_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", lambda: torch.backends.cuda.matmul.allow_tf32)
_runtime = _candidates = None    # mmkernels.runtime and mmkernels.candidates (imported at the end)
_DATA_DEPENDENT = frozenset({torch.Tag.data_dependent_output, torch.Tag.dynamic_output_shape})
_HOST_READS = frozenset({_aten._local_scalar_dense.default, _aten.is_nonzero.default, _aten.equal.default})


def set_enabled(on: bool) -> None:
    """Plans on (default) or off for every later call."""
    global ENABLED
    ENABLED = bool(on)


def forget() -> None:
    """Make every recorded plan stale (the next call of each signature records again)."""
    global generation
    generation += 1


# --- the signature ---------------------------------------------------------------------------------

def signature(args, device_type) -> Optional[Tuple[tuple, List[Tensor]]]:
    """The key of a call on ``args`` (schema arguments: tensors, lists of tensors, other values) and
    its tensors in argument order; None where the call is not planned (no tensor, the first one not
    on a GPU per ``device_type``, the seam the tests replace; or the launch mode "jit", which
    prepares no launch). Flat: a list argument adds its length, then its entries."""
    if _runtime._mode == "jit":
        return None
    first = args[0] if args else None         # every op's first argument: a tensor or a list of them
    if type(first) is list or type(first) is tuple:
        first = first[0] if first else None
    if isinstance(first, Tensor) and device_type(first.device) != "cuda":
        return None
    parts: List[object] = []
    tensors: List[Tensor] = []
    bases: List[int] = []
    add, keep, base = parts.append, tensors.append, bases.append
    for a in args:
        kind = type(a)
        if kind is list or kind is tuple:      # a list argument: its length, then its entries
            add(len(a))
            items = a
        else:
            items = (a,)
        for t in items:
            if isinstance(t, Tensor):
                keep(t)
                p, o = t.data_ptr(), t.storage_offset()
                base(p - o * t.itemsize)
                add((t.dtype, t.device, t.shape, t.stride(), o, t.requires_grad, p & 15))
            else:
                add(t)
    if not tensors or device_type(tensors[0].device) != "cuda":
        return None
    # which share one memory (a backend may view those as one strided tensor, from their storage
    # offsets), and which of those are one tensor (a recorded launch names its tensors by position)
    same = shared = False
    n = len(bases)
    if n > 1 and len(set(bases)) != n:
        shared = tuple(map(bases.index, bases))
        ids = list(map(id, tensors))
        if len(set(ids)) != n:
            same = tuple(map(ids.index, ids))
    forced = _candidates._forced
    return ((tuple(parts), same, shared, _runtime._mode, tuple(forced.items()) if forced else (), _tf32(),
             _runtime.launch_knobs(), generation), tensors)


def plannable() -> bool:
    """Whether this process state allows planning a call at all (see the module)."""
    return ENABLED and not (_dispatch_modes() or _functorch_active() or _autocast())


# --- recording -------------------------------------------------------------------------------------

class Recorder(TorchDispatchMode):
    """Records the torch ops and launches of one call (see :meth:`Table.call`)."""

    def __init__(self, inputs: List[torch.Tensor]):
        super().__init__()
        self.steps: List[tuple] = []
        self.refused: Optional[str] = None
        self.refs: Dict[int, tuple] = {}
        self.alive: List[object] = list(inputs)    # nothing recorded is freed (its id reused) meanwhile
        self.consts: List[torch.Tensor] = []
        for i, t in enumerate(inputs):
            self.refs.setdefault(id(t), ("in", i))

    def refuse(self, why: str) -> None:
        if self.refused is None:
            self.refused = why

    # a template: the value with every tensor replaced by its reference
    def template(self, v):
        if isinstance(v, torch.Tensor):
            ref = self.refs.get(id(v))
            if ref is None:                 # made outside the call (a module's constant): kept as it is
                self.alive.append(v)
                self.consts.append(v)
                ref = self.refs[id(v)] = ("const", v)
            return ref
        if type(v) is list or type(v) is tuple:
            items = [self.template(x) for x in v]
            return (type(v), items) if any(type(x) is tuple and x and x[0] in _KINDS for x in items) \
                else ("value", v)
        base = getattr(v, "base", None)
        if isinstance(base, torch.Tensor) and hasattr(v, "block_shape"):   # a host TMA descriptor
            proto = copy.copy(v)
            proto.base = None          # the recording call's tensor is not kept: each replay puts its own
            return ("desc", self.template(base), proto)
        if hasattr(v, "data_ptr"):
            self.refuse(f"an argument of type {type(v).__name__}")
        return ("value", v)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _HOST_READS:
            self.refuse(f"{func} reads a device value on the host")
        elif _DATA_DEPENDENT.intersection(func.tags):
            self.refuse(f"{func}: its output's shape depends on the values")
        flat, _ = tree_flatten(out)
        if any(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in flat) and any(
                isinstance(t, torch.Tensor) and t.device.type != "cpu" for t in tree_flatten((args, kwargs))[0]):
            self.refuse(f"{func} copies a device tensor to the host")
        step = len(self.steps)
        self.steps.append(("op", func, self.template(list(args)), {k: self.template(v) for k, v in kwargs.items()}))
        outs = out if isinstance(out, (list, tuple)) else (out,)
        for k, t in enumerate(outs):
            if isinstance(t, torch.Tensor):
                self.alive.append(t)
                self.refs[id(t)] = ("op", step, k, isinstance(out, (list, tuple)))
        return out

    def launch(self, plan, grid: Tuple[int, int, int], index: int, bound: dict) -> None:
        """A prepared launch of this call: ``plan(gx, gy, gz, stream, bound)`` on GPU ``index``."""
        subs, kept = [], {}
        for k, v in bound.items():
            t = self.template(v)
            if t[0] != "value":
                subs.append((k, t))
                v = None               # this call's tensors are not kept: each replay puts its own
            kept[k] = v
        self.steps.append(("launch", plan, grid, index, kept, tuple(subs)))

    def check_consts(self) -> None:
        """Refuse where the call used a tensor it neither received nor made through a torch op: a
        backend's cache (a padded weight, a reused buffer) decides per call whether it is still
        valid, which a replay would not ask."""
        if self.consts:
            self.refuse(f"a tensor from outside the call ({len(self.consts)}: a backend's cache, or memory made "
                        "outside torch's dispatch)")



_KINDS = frozenset({"in", "op", "const", "desc", list, tuple})


class _Recording(threading.local):
    """The recorder of the call this thread is recording, if any: :mod:`mmkernels.runtime` reports
    each launch to it (a dispatch mode sees only its own thread's ops; so do the launches)."""
    recorder: Optional[Recorder] = None


recording = _Recording()


class CallPlan:
    """One recorded call: its steps, each compiled to a function of ``(inputs, made)`` (this call's
    input tensors in argument order, the results of the steps before it), and its result's."""
    __slots__ = ("steps", "result", "name", "recorded")

    def __init__(self, steps, result, name):
        # what was recorded, for diagnostics: each torch op's name, or "launch"
        self.recorded = tuple(s[1].__name__ if s[0] == "op" else "launch" for s in steps)
        steps, result = _elide_views(*_fold_views_of_empties(*_elide_views(list(steps), result)))
        self.steps = tuple(_compile_step(s) for s in steps)
        self.result, self.name = _resolver(result), name

    def run(self, inputs: List[Tensor]):
        made: List[object] = []
        for step in self.steps:
            made.append(step(inputs, made))
        return self.result(inputs, made)


# views that keep their source's data pointer (no storage offset of their own)
_SAME_POINTER = frozenset({_aten.view.default, _aten._unsafe_view.default, _aten.permute.default,
                           _aten.transpose.int, _aten.t.default, _aten.unsqueeze.default, _aten.squeeze.dim,
                           _aten.squeeze.default, _aten.expand.default, _aten.detach.default,
                           _aten.alias.default})


def _uses(t, out: List[tuple]) -> None:
    """Every tensor reference (``("in", i)``, ``("op", s, k, multi)``) inside template ``t``."""
    kind = t[0]
    if kind == "in" or kind == "op":
        out.append(t)
    elif kind == "desc":
        _uses(t[1], out)
    elif kind is list or kind is tuple:
        for x in t[1]:
            _uses(x, out)


def _rewrite(t, ref):
    """Template ``t`` with every ``("op", ...)`` reference replaced by ``ref(reference)``."""
    kind = t[0]
    if kind == "op":
        return ref(t)
    if kind == "desc":
        return ("desc", _rewrite(t[1], ref), t[2])
    if kind is list or kind is tuple:
        return (kind, [_rewrite(x, ref) for x in t[1]])
    return t


def _elide_views(steps: List[tuple], result):
    """Steps and result without the views a replay need not make: a detach or alias of a tensor
    the call made (the tensor itself serves), and a view that keeps its source's data pointer
    where nothing uses it or only Triton launches take it (a launcher reads a tensor's pointer
    alone: its shapes and strides are the signature's, baked into the recorded arguments), the
    launches taking the source instead. A chain of such views goes whole."""
    gone = set()
    for s in range(len(steps) - 1, -1, -1):
        step = steps[s]
        if step[0] != "op" or step[1] not in _SAME_POINTER or step[3] or step[2][0] is not list:
            continue
        src = step[2][1][0]
        if src[0] not in ("in", "op") or (src[0] == "op" and src[3]):
            continue
        if not (step[1] in _IDENTITY and src[0] == "op"):      # only launches may take it
            elsewhere: List[tuple] = []
            for i in range(s + 1, len(steps)):
                later = steps[i]
                if i in gone:
                    continue
                if later[0] == "launch":
                    for _, t in later[5]:
                        if t[0] != "op":
                            _uses(t, elsewhere)
                else:
                    _uses(later[2], elsewhere)
                    for v in later[3].values():
                        _uses(v, elsewhere)
            _uses(result, elsewhere)
            if any(t[0] == "op" and t[1] == s for t in elsewhere):
                continue
        gone.add(s)

        def subst(t, s=s, src=src):
            return src if t[1] == s else t
        steps[s + 1:] = [_rewrite_step(later, subst) for later in steps[s + 1:]]
        result = _rewrite(result, subst)
    if not gone:
        return steps, result
    index = {}                                    # old step -> new step
    for s in range(len(steps)):
        if s not in gone:
            index[s] = len(index)

    def renumber(t):
        return (t[0], index[t[1]]) + tuple(t[2:])
    return ([_rewrite_step(step, renumber) for s, step in enumerate(steps) if s not in gone],
            _rewrite(result, renumber))


def _fold_views_of_empties(steps: List[tuple], result):
    """Steps where a fresh contiguous ``empty`` whose one other use than Triton launches is a view
    of a constant size is made in that size instead (the view of a contiguous tensor is that
    tensor with another shape; a launcher reads the pointer alone): the view's uses take the
    empty, and the view is not made."""
    for s, step in enumerate(steps):
        if step[0] != "op" or step[1] is not _aten.empty.memory_format or step[2][0] != "value":
            continue
        kw = step[3]
        if any(v[0] != "value" for v in kw.values()) or \
                kw.get("memory_format", ("value", None))[1] not in (None, torch.contiguous_format):
            continue
        size = list(step[2][1][0])
        views, other = [], False
        for i in range(s + 1, len(steps)):
            later = steps[i]
            if later[0] == "launch":
                other = other or any(t[0] != "op" and _mentions(t, s) for _, t in later[5])
                continue
            if (later[1] is _aten.view.default and later[2][0] is list and len(later[2][1]) == 2
                    and later[2][1][0] == ("op", s, 0, False) and later[2][1][1][0] == "value" and not later[3]):
                views.append(i)
            elif _mentions(later[2], s) or any(_mentions(v, s) for v in later[3].values()):
                other = True
        if other or len(views) != 1 or _mentions(result, s):
            continue
        v = views[0]
        shape = list(steps[v][2][1][1][1])
        if shape.count(-1) == 1:           # the one inferred size
            known = 1
            for d in shape:
                known *= d if d != -1 else 1
            numel = 1
            for d in size:
                numel *= d
            if known == 0:
                continue
            shape[shape.index(-1)] = numel // known
        steps[s] = ("op", step[1], ("value", [shape]), kw)
        # the view becomes a detach of the empty, which _elide_views drops
        steps[v] = ("op", _aten.detach.default, (list, [("op", s, 0, False)]), {})
    return steps, result


def _mentions(t, s) -> bool:
    """Whether template ``t`` refers to step ``s``'s result."""
    found: List[tuple] = []
    _uses(t, found)
    return any(r[0] == "op" and r[1] == s for r in found)


def _rewrite_step(step, ref):
    """A recorded step with every ``("op", ...)`` reference of its arguments replaced by ``ref``'s."""
    if step[0] == "launch":
        return step[:5] + (tuple((k, _rewrite(t, ref)) for k, t in step[5]),)
    return (step[0], step[1], _rewrite(step[2], ref), {k: _rewrite(v, ref) for k, v in step[3].items()})


def _resolver(t):
    """A function of ``(inputs, made)`` giving the value a template stands for."""
    kind = t[0]
    if kind == "in":
        i = t[1]
        return lambda inputs, made: inputs[i]
    if kind == "op":
        s, k, multi = t[1], t[2], t[3]
        if multi:
            return lambda inputs, made: made[s][k]
        return lambda inputs, made: made[s]
    if kind == "value" or kind == "const":
        v = t[1]
        if type(v) is list:            # a fresh list per call (the caller may append to it)
            return lambda inputs, made: list(v)
        return lambda inputs, made: v
    if kind == "desc":
        base, proto = _resolver(t[1]), t[2]
        fields = getattr(proto, "__dict__", None)
        if fields is None:                 # a descriptor class with slots: the generic copy

            def desc(inputs, made):
                d = copy.copy(proto)
                d.base = base(inputs, made)
                return d
            return desc
        cls, fields = type(proto), dict(fields)
        new = object.__new__

        def desc_fast(inputs, made):       # the recorded descriptor's fields (checked when it was made)
            d = new(cls)
            d.__dict__.update(fields)
            d.base = base(inputs, made)
            return d
        return desc_fast
    items = t[1]
    if all(x[0] == "in" for x in items):             # the common case: a tuple of input tensors
        idx = tuple(x[1] for x in items)
        if kind is tuple:
            return lambda inputs, made: tuple([inputs[i] for i in idx])
        return lambda inputs, made: [inputs[i] for i in idx]
    parts = tuple(_resolver(x) for x in items)
    if kind is tuple:
        return lambda inputs, made: tuple([r(inputs, made) for r in parts])
    return lambda inputs, made: [r(inputs, made) for r in parts]


_FACTORIES = {_aten.empty.memory_format: torch.empty, _aten.zeros.default: torch.zeros}
# torch ops replayed through their tensor method (a fraction of an operator call's cost); each takes
# the aten overload's positional arguments in its order
_METHODS = {_aten.view.default: Tensor.view, _aten.select.int: Tensor.select, _aten.permute.default: Tensor.permute,
            _aten.unsqueeze.default: Tensor.unsqueeze, _aten.t.default: Tensor.t,
            _aten.transpose.int: Tensor.transpose, _aten.sum.dim_IntList: Tensor.sum,
            _aten.clone.default: Tensor.clone, _aten.squeeze.dim: Tensor.squeeze,
            _aten.mm.default: torch.mm, _aten.bmm.default: torch.bmm, _aten.empty_like.default: torch.empty_like}
_IDENTITY = frozenset({_aten.detach.default, _aten.alias.default})   # of a fresh tensor: the tensor itself


def _is_launch(step) -> bool:
    """A Triton launch, or a call of the CUDA C++ library (its ops' namespace is the package's)."""
    return step[0] == "launch" or getattr(step[1], "namespace", None) in _CUDA_NAMESPACES


_CUDA_NAMESPACES = frozenset({"mmkernels", "mmkernels_emu"})


def _replay_cost(steps) -> int:
    """A replay's cost beyond the backend's own calls of the same torch ops, in units of about
    half a microsecond: 1 per op replayed through its tensor method or indexing, 4 per op replayed
    through the dispatcher (allocations and aliases: nothing). A plan is kept where this is at most
    16 per launch plus 8 (what the backend's Python around a launch and the selection cost, at
    least; measured with ``benchmarks/host_path.py``: low_rank_fusion's forward, 26 torch ops
    around one launch, replayed slower than it runs; gated_fusion's, 14 around one, twice as
    fast). A call with no launch (an empty batch, torch ops only) is not planned."""
    cost = 0
    for step in steps:
        if _is_launch(step) or step[1] in _FACTORIES or step[1] in _IDENTITY:
            continue
        cost += 1 if step[1] in _METHODS or step[1] is _aten.slice.Tensor else 4
    return cost


def _compile_step(step):
    if step[0] == "launch":
        _, plan, (gx, gy, gz), index, base, subs = step
        ins = tuple((k, t[1]) for k, t in subs if t[0] == "in")          # this call's input tensors
        mades = tuple((k, t[1]) for k, t in subs if t[0] == "op" and not t[3])     # a step's tensor
        rest = tuple((k, _resolver(t)) for k, t in subs if not (t[0] == "in" or (t[0] == "op" and not t[3])))

        def launch(inputs, made):
            bound = dict(base)
            for k, i in ins:
                bound[k] = inputs[i]
            for k, i in mades:
                bound[k] = made[i]
            for k, r in rest:
                bound[k] = r(inputs, made)
            _launch(plan, gx, gy, gz, index, bound)
        return launch
    _, func, a, kw = step
    if func in _IDENTITY and a[0] is list and not kw and a[1][0][0] == "op":   # of a tensor the call made
        return _resolver(a[1][0])
    method = _METHODS.get(func)
    if method is not None and a[0] is list and not kw and a[1] and all(x[0] == "value" for x in a[1][1:]):
        # the common case: a method of one tensor with constant arguments (a view's size)
        src, consts = a[1][0], tuple(x[1] for x in a[1][1:])
        if src[0] == "in":
            i = src[1]
            return lambda inputs, made: method(inputs[i], *consts)
        if src[0] == "op" and not src[3]:
            i = src[1]
            return lambda inputs, made: method(made[i], *consts)
    if method is not None and a[0] is list:
        args_r = _resolver(a)
        if not kw:
            return lambda inputs, made: method(*args_r(inputs, made))
        kw_r = {k: _resolver(v) for k, v in kw.items()}
        return lambda inputs, made: method(*args_r(inputs, made), **{k: r(inputs, made) for k, r in kw_r.items()})
    if func is _aten.slice.Tensor and a[0] is list and not kw and all(x[0] == "value" for x in a[1][1:]):
        src = _resolver(a[1][0])
        dim, start, end, step_ = ([x[1] for x in a[1][1:]] + [0, None, None, 1][len(a[1]) - 1:])[:4]
        if dim >= 0:
            index = (slice(None),) * dim + (slice(start, end, step_),)
            return lambda inputs, made: src(inputs, made)[index]
    factory = _FACTORIES.get(func)
    if factory is not None and a[0] == "value" and all(v[0] == "value" for v in kw.values()):
        kwargs = {k: v[1] for k, v in kw.items()}
        if kwargs.pop("layout", torch.strided) in (None, torch.strided) and not kwargs.pop("pin_memory", False) \
                and kwargs.pop("memory_format", None) in (None, torch.contiguous_format):
            size = a[1][0]
            return lambda inputs, made: factory(size, **kwargs)
    args_r, kw_r = _resolver(a), {k: _resolver(v) for k, v in kw.items()}
    return lambda inputs, made: func(*args_r(inputs, made), **{k: r(inputs, made) for k, r in kw_r.items()})


def _launch(plan, gx, gy, gz, index, bound):
    if index == _runtime._current_device():
        plan(gx, gy, gz, _runtime._current_stream(index), bound)
    else:
        with torch.cuda.device(index):
            plan(gx, gy, gz, _runtime._current_stream(index), bound)


class Table(dict):
    """The plans of one op and pass, by signature; a value is a :class:`CallPlan` or the number of
    recordings that failed for that signature. ``refusal``: why the last one failed. ``off``:
    :data:`generation` where the table stopped trying (a Triton or CUDA call was refused as not
    worth replaying before any was planned: tensor_fusion's cuBLAS path, low_rank_fusion's
    projections); then calls skip the signature. ``planned``: the generation of its last plan."""
    refusal: Optional[str] = None
    off: int = -1
    planned: int = -1

    def call(self, signed, body):
        """``body()``'s result for this call: replayed from the plan of its signature (``signed``:
        what :func:`signature` returned), or run (and recorded, until a plan exists or
        :data:`ATTEMPTS` recordings failed). ``body`` returns ``(result, backend name)``."""
        key, inputs = signed
        got = self.get(key)
        if type(got) is CallPlan:
            stats["replayed"] = stats.get("replayed", 0) + 1
            return got.run(inputs), got.name
        if got is None:                # a first sighting: recorded only if the signature comes back
            if len(self) >= LIMIT:
                self.clear()
            self[key] = 0
            return body()
        if got >= ATTEMPTS or recording.recorder is not None:
            return body()
        if _runtime._capturing_graph():
            return body()
        rec = Recorder(inputs)
        recording.recorder = rec
        try:
            with rec:
                result, name = body()
            result_t = rec.template(result)
            rec.check_consts()
        finally:
            recording.recorder = None
        launches = sum(map(_is_launch, rec.steps))
        unworthy = False       # refused for what the backend does, not for this call's state
        if rec.refused is None and name not in PLANNED_BACKENDS:
            rec.refuse(f"the {name} backend is not planned")
            self[key] = ATTEMPTS
        elif rec.refused is None and _replay_cost(rec.steps) > 16 * launches + 8:
            rec.refuse(f"{len(rec.steps) - launches} torch ops for {launches} launches: a replay would not be faster")
            unworthy = True
        elif rec.refused is None and not launches:
            rec.refuse("no launch (an empty batch)")
        if rec.refused is None:
            self[key] = CallPlan(tuple(rec.steps), result_t, name)
            self.planned = generation
            stats["recorded"] = stats.get("recorded", 0) + 1
        else:
            stats["refused"] = stats.get("refused", 0) + 1
            last_refusal[0] = self.refusal = rec.refused
            self[key] = max(self[key], got + 1)
            if unworthy:
                self[key] = ATTEMPTS
                if self.planned != generation:      # a backend whose calls are not worth replaying
                    self.off = generation
        return result, name


last_refusal: List[Optional[str]] = [None]


from . import candidates as _candidates  # noqa: E402  (both import this module)
from . import runtime as _runtime  # noqa: E402
