"""The one registration helper: an op folder declares its schema, its backends, the shapes of its
outputs and which arguments are differentiable; :class:`Op` registers the rest with
``torch.library`` — the forward custom op and its fake, the backward custom op and its fake, and
the autograd formula that connects them — so ``torch.compile(fullgraph=True)`` sees one node per
pass and every backend is reached through :func:`mmkernels.backend.select`.

One call path per backend (:meth:`Op.__call__`):

* ``torch`` — the op's plain formulation (``cpu``: the fastest plain-PyTorch composition of the
  same result) runs as it is, differentiated by PyTorch's autograd; under ``torch.compile`` its
  traced form (``cpu_traced``, reading no value on the host) is what the graph holds, for inductor
  to fuse. ``auto`` takes it on CPU tensors, and on a GPU where the dispatch table's verdict is
  ``torch`` for an op that lists the GPU in ``plain_devices`` (the evidence timed that formulation
  there). Public functions reach it without building the schema's arguments
  (:meth:`Op.cpu_path`). Its non-differentiable extra outputs (a saved log-sum-exp) may be empty.
* ``triton``, ``cuda``, ``reference`` — eagerly, the backend's ``forward`` under one
  ``torch.autograd.Function`` (its C++ ``apply``; the backward on the backend the forward ran on,
  without selecting again; with nothing for autograd to record, the forward alone); when traced
  (``torch.compile``, ``make_fx``, fake tensors, ``torch.func``, ``torch.export``) or with
  ``direct=False``, the registered op, whose fake gives the shapes. On a GPU, a repeat forward or
  backward with the same signature replays its call plan (:mod:`mmkernels.plans`): the
  selection and the backend's Python are skipped.

A traced or transformed call that requests ``torch`` (or ``auto`` where ``torch`` is taken but its
traced form does not take the inputs) gets the registered op with the reference backend's bodies:
the same math with an explicit backward.

The contract with a backend module (``reference.py``, ``triton.py``, ``cuda.py``, ...):

* ``why_not(explicit, **inputs)``: ``None`` or the reasons it cannot take these inputs;
* ``forward(**inputs)`` returns the op's outputs (a tensor, or a tuple in the schema's order);
* ``backward(*grads, **inputs, **saved_outputs)``: ``grads`` are the gradients of the
  differentiable outputs (zeros where autograd has none), ``saved_outputs`` the outputs named in
  ``save_outputs``; it returns one gradient per ``differentiable`` argument, in that order (a list
  for a list argument, with None for entries that are absent; anything for an argument that is
  None).

``inputs`` are the schema's arguments by name, after ``to_backend`` (an op's own unpacking, e.g.
presence masks back into lists with None entries). Gradients of the registered backward op are
flat: the present differentiable tensors in argument order, each shaped like its input.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from .. import backend as _backend
from .. import plans as _plans
from .. import runtime as _runtime
from ._util import autocasting, fresh_outputs


def _kind(arg) -> str:
    """'tensor', 'optional', 'list' (of tensors) or 'other' for a parsed schema argument."""
    t = str(arg.type)
    if t == "Tensor":
        return "tensor"
    if t == "Tensor?":
        return "optional"
    if t in ("Tensor[]", "List[Tensor]"):
        return "list"
    return "other"


class Op:
    """One op of the package, registered as ``mmkernels::<name>`` and ``mmkernels::<name>_backward``.

    ``schema``: the forward's arguments and returns without the backend, e.g.
    ``"(Tensor h_pre, Tensor z, Tensor? modality_mask) -> Tensor"``; the helper appends
    ``str backend``. ``impls``: backend name -> module. ``fake(**args)``: the outputs' shapes (empty
    tensors) from the schema's arguments — the one declaration of them. ``differentiable``: the
    argument names that get gradients. ``save_outputs``: output names the backward needs (the rest
    are not kept alive). ``outputs``: names of the outputs, in order. ``non_differentiable``: output
    names that carry no gradient (e.g. a saved log-sum-exp). ``cpu(**inputs)``: the ``torch``
    backend's plain formulation (see the module's docstring), taken where ``cpu_takes(**inputs)``
    (default: always); under ``torch.compile`` ``cpu_traced(**inputs)`` (default: ``cpu``), where
    also ``cpu_traced_takes(**schema_arguments)`` (default: always). ``plain_devices``: the device
    types on which ``auto`` may take the ``torch`` backend (default: CPUs only; a GPU where the
    dispatch table's verdict for the op is ``torch``). A request for ``torch`` by name takes it on
    any device.
    """

    def __init__(self, name: str, schema: str, impls: Mapping[str, object], *, fake: Callable,
                 differentiable: Sequence[str], outputs: Sequence[str] = ("out",),
                 save_outputs: Sequence[str] = (), non_differentiable: Sequence[str] = (),
                 to_backend: Optional[Callable[[Dict], Dict]] = None, cpu: Optional[Callable] = None,
                 cpu_takes: Optional[Callable[..., bool]] = None, cpu_traced: Optional[Callable] = None,
                 cpu_traced_takes: Optional[Callable[..., bool]] = None, plain_devices: Sequence[str] = ("cpu",)):
        self.name = name
        self.impls = dict(impls)
        if cpu is not None:
            self.impls["torch"] = _TorchBackend(self)
        head, _, returns = schema.partition("->")
        head = head.strip()
        assert head.startswith("(") and head.endswith(")"), schema
        args = head[1:-1].strip()
        fwd_schema = f"({args}, str backend) -> {returns.strip()}"
        parsed = torch._C.parse_schema(f"mmkernels::{name}{fwd_schema}")
        self.arg_names = [a.name for a in parsed.arguments]
        self.kinds = {a.name: _kind(a) for a in parsed.arguments}
        self.outputs = tuple(outputs)
        assert len(self.outputs) == len(parsed.returns), (name, outputs)
        self.single = len(self.outputs) == 1 and not returns.strip().startswith("(")
        self.differentiable = tuple(differentiable)
        self.save_outputs = tuple(save_outputs)
        self.grad_outputs = tuple(o for o in self.outputs if o not in non_differentiable)
        self.to_backend = to_backend or (lambda a: a)
        self._fake = fake
        self.cpu, self.cpu_takes = cpu, cpu_takes
        self.cpu_traced, self.cpu_traced_takes = cpu_traced or cpu, cpu_traced_takes
        self.plain_devices = tuple(plain_devices)
        self.direct = True
        self._fwd_plans, self._bwd_plans = _plans.Table(), _plans.Table()   # call plans (mmkernels.plans)
        # the direct path's plan, by position (the schema's arguments without the backend)
        names = self.arg_names[:-1]
        self._arg_kinds = tuple(2 if self.kinds[n] == "list" else 1 if self.kinds[n] in ("tensor", "optional") else 0
                                for n in names)
        self._lists = tuple(k == 2 for k in self._arg_kinds) if 2 in self._arg_kinds else ()
        self._arg_diff = tuple(n in self.differentiable for n in names)
        self._out_nondiff = tuple(i for i, o in enumerate(self.outputs) if o not in self.grad_outputs)
        self._out_grad = tuple(self.outputs.index(o) for o in self.grad_outputs)
        self._out_saved = tuple(self.outputs.index(o) for o in self.save_outputs)

        self.forward_op = torch.library.custom_op(f"mmkernels::{name}", self._forward, mutates_args=(),
                                                  schema=fwd_schema)
        self.forward_op.register_fake(self._forward_fake)
        bwd_schema = f"(Tensor[] grads, {args}, Tensor[] saved_outputs, str backend) -> Tensor[]"
        self.backward_op = torch.library.custom_op(f"mmkernels::{name}_backward", self._backward, mutates_args=(),
                                                   schema=bwd_schema)
        self.backward_op.register_fake(self._backward_fake)
        self.forward_op.register_autograd(self._autograd_backward, setup_context=self._setup_context)

    # --- the call ----------------------------------------------------------------------------

    def __call__(self, *args, backend: Optional[str] = None):
        """Run the op on the schema's arguments (positional, in order); ``backend``: this call's
        backend (default: the process-wide choice, :func:`mmkernels.get_backend`)."""
        name = _backend.get_backend() if backend is None else backend
        if not self.direct:
            return self.forward_op(*args, name)
        if _tracing():
            if _is_dynamo_compiling():   # torch.compile: inductor sees the plain ops (see the module)
                out = self._plain(self.cpu_traced, args, name, self.cpu_traced_takes)
                if out is not None:
                    return out
            return self.forward_op(*args, name)
        out = self._plain(self.cpu, args, name)
        return self._direct(args, name) if out is None else out

    def _plain(self, fn, args, name: str, takes: Optional[Callable[..., bool]] = None):
        """``fn``'s outputs where the call takes the ``torch`` backend (requested by name, or
        ``auto`` on CPU tensors or on a GPU of ``plain_devices`` whose dispatch-table verdict is
        ``torch``; ``takes`` of the schema's arguments, ``cpu_takes`` of the backend-form
        inputs), else None."""
        if fn is None or (name != "auto" and name != "torch"):
            return None
        t = _backend.first_tensor(args)
        if t is None:
            return None
        device = t.device
        if name == "auto":
            kind = _device_type(device)
            if kind != "cpu" and (kind not in self.plain_devices or _auto_first(self.name, device) != "torch"):
                return None
        bound = self._bind(args)
        if takes is not None and not takes(**bound):
            return None
        inputs = self.to_backend(bound)
        if self.cpu_takes is not None and not self.cpu_takes(**inputs):
            return None
        if torch.is_autocast_enabled(device.type):   # the public function already cast its inputs
            with torch.autocast(device.type, enabled=False):
                return fn(**inputs)
        return fn(**inputs)

    def cpu_path(self, like: torch.Tensor, backend: Optional[str] = None) -> bool:
        """Whether a call whose first input is ``like`` takes the ``torch`` backend's plain
        formulation directly: ``torch`` requested, or ``auto`` on a CPU tensor; eager, outside
        ``torch.autocast``. A public function asks this after its argument checks and then calls
        its plain formulation on the checked arguments itself, skipping the schema's packing (the
        same function ``cpu`` names, or what it computes); any other answer goes through
        :meth:`__call__`. It costs about a microsecond."""
        name = _backend._requested if backend is None else backend
        if name == "auto":
            if not like.is_cpu:
                return False
        elif name != "torch":
            return False
        # _tracing() first: under torch.compile it is True before dynamo meets a C call it cannot trace
        return self.cpu is not None and self.direct and not (_tracing() or autocasting())

    def _direct(self, args, backend: str):
        """The registered op's forward and backward bodies under a ``torch.autograd.Function``
        (which sees only top-level tensors: list arguments travel flattened). Where autograd has
        nothing to record (grad mode off, or no input requiring grad, and no forward-mode AD
        level open), the forward body alone: the same outputs without the Function's host cost."""
        if not (_grad_enabled() and self._any_requires_grad(args)) and _forward_ad_level() < 0:
            return self._forward_on(*args, backend)[0]
        if self._lists:
            flat, layout = [], []
            for v, is_list in zip(args, self._lists):
                if is_list:
                    layout.append(len(v))
                    flat.extend(v)
                else:
                    layout.append(None)
                    flat.append(v)
        else:
            flat, layout = args, None
        outs = _direct_apply(self, backend, layout, *flat)
        return outs[0] if self.single else outs

    def _any_requires_grad(self, args) -> bool:
        for v, k in zip(args, self._arg_kinds):
            if k == 2:      # a list
                for t in v:
                    if t is not None and t.requires_grad:
                        return True
            elif k == 1 and v is not None and v.requires_grad:
                return True
        return False

    def select(self, backend: str, inputs: Dict):
        """``(name, module)`` of the backend that runs these (backend-form) inputs."""
        return _backend.select(self.name, self.impls, backend, **inputs)

    # --- bodies of the registered ops -----------------------------------------------------------

    def _bind(self, args) -> Dict:
        return dict(zip(self.arg_names, args))

    def _tensor_inputs(self, bound: Dict) -> List:
        out = []
        for n, k in self.kinds.items():
            if k == "list":
                out.extend(bound[n])
            elif k in ("tensor", "optional"):
                out.append(bound[n])
        return out

    def _forward(self, *args):
        return self._forward_on(*args)[0]

    def _forward_on(self, *args):
        """The forward's outputs and the name of the backend that ran it: on a GPU, a repeat call
        of a signature replays its call plan (:mod:`mmkernels.plans`)."""
        if _plans.ENABLED and self._fwd_plans.off != _plans.generation and _plans.plannable():
            signed = _plans.signature(args, _runtime._device_type)
            if signed is not None:
                return self._fwd_plans.call(signed, lambda: self._forward_body(args))
        return self._forward_body(args)

    def _forward_body(self, args):
        bound = self._bind(args)
        backend = bound.pop("backend")
        inputs = self.to_backend(bound)
        name, impl = self.select(backend, inputs)
        outs = impl.forward(**inputs)
        outs = fresh_outputs([outs] if self.single else list(outs), self._tensor_inputs(bound))
        return (outs[0] if self.single else tuple(outs)), name

    def _forward_fake(self, *args):
        bound = self._bind(args)
        bound.pop("backend")
        return self._fake(**bound)

    def _backward(self, grads, *rest, impl=None):
        """``impl``: the backend module the forward ran on (the direct path knows it; the registered
        backward selects again from the same inputs, which gives the same backend). On a GPU, a
        repeat call of a signature replays its call plan (:mod:`mmkernels.plans`)."""
        if _plans.ENABLED and self._bwd_plans.off != _plans.generation and _plans.plannable():
            signed = _plans.signature((grads, *rest, impl is None), _runtime._device_type)
            if signed is not None:
                return self._bwd_plans.call(signed, lambda: self._backward_body(grads, rest, impl))[0]
        return self._backward_body(grads, rest, impl)[0]

    def _backward_body(self, grads, rest, impl):
        """The backward's flat gradients and the name of the backend that ran it."""
        saved_outputs, backend = rest[-2], rest[-1]
        bound = self._bind(rest[:-2])
        inputs = self.to_backend(bound)
        name = backend
        if impl is None:
            name, impl = self.select(backend, inputs)
        result = impl.backward(*grads, **inputs, **dict(zip(self.save_outputs, saved_outputs)))
        if len(self.differentiable) == 1:
            result = (result,)
        flat = []
        for n, g in zip(self.differentiable, result):
            v, k = bound[n], self.kinds[n]
            if k == "list":
                present = [t for t in g if t is not None]
                assert len(present) == len(v), (self.name, n, len(present), len(v))
                flat.extend(present)
            elif v is not None:
                flat.append(g)
        return fresh_outputs(flat, [*grads, *self._tensor_inputs(bound), *saved_outputs]), name

    def _backward_fake(self, grads, *rest):
        bound = self._bind(rest[:-2])
        like = []
        for n in self.differentiable:
            v = bound[n]
            like.extend(v if self.kinds[n] == "list" else ([] if v is None else [v]))
        return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in like]

    # --- autograd --------------------------------------------------------------------------------

    def _setup_context(self, ctx, inputs, output):
        outs = (output,) if self.single else tuple(output)
        named = dict(zip(self.outputs, outs))
        ctx.mark_non_differentiable(*[named[o] for o in self.outputs if o not in self.grad_outputs])
        bound = self._bind(inputs)
        ctx.structure = {n: (len(bound[n]) if k == "list" else None) for n, k in self.kinds.items()
                         if k != "other"}
        ctx.others = {n: bound[n] for n, k in self.kinds.items() if k == "other"}
        ctx.out_like = [(o.shape, o.dtype, o.device) for o in (named[g] for g in self.grad_outputs)]
        ctx.save_for_backward(*self._tensor_inputs(bound), *[named[o] for o in self.save_outputs])

    def _autograd_backward(self, ctx, *grad_outs):
        saved = list(ctx.saved_tensors)
        bound, i = dict(ctx.others), 0
        for n, size in ctx.structure.items():
            if size is None:
                bound[n], i = saved[i], i + 1
            else:
                bound[n], i = saved[i:i + size], i + size
        saved_outputs = saved[i:]
        by_name = dict(zip(self.outputs, grad_outs))
        grads = []
        for g, (shape, dtype, device) in zip((by_name[o] for o in self.grad_outputs), ctx.out_like):
            grads.append(torch.zeros(shape, dtype=dtype, device=device) if g is None else g)
        args = [bound[n] for n in self.arg_names if n != "backend"]
        flat = self.backward_op(grads, *args, saved_outputs, bound["backend"])
        result, j = [], 0
        for n in self.arg_names:
            if n not in self.differentiable:
                result.append(None)
                continue
            v = bound[n]
            if self.kinds[n] == "list":
                result.append(list(flat[j:j + len(v)]))
                j += len(v)
            elif v is None:
                result.append(None)
            else:
                result.append(flat[j])
                j += 1
        return tuple(result)


class _TorchBackend:
    """The ``torch`` backend of an op as :func:`mmkernels.backend.select` sees it. Eager calls run
    the plain formulation itself (:meth:`Op._plain`); where the registered op or the autograd
    Function runs instead (traced calls, inputs the plain formulation does not take), its bodies
    are the reference backend's: the same math, with an explicit backward."""

    CAPABILITIES = _backend.Capabilities()     # every floating dtype, any device

    def __init__(self, op: "Op"):
        self._op = op

    def why_not(self, explicit: bool, **inputs):
        if explicit:
            return None
        t = _backend.first_tensor(inputs.values())
        if t is not None and _device_type(t.device) not in self._op.plain_devices:
            return (f"auto takes the plain formulation on {', '.join(self._op.plain_devices)} tensors only "
                    "(elsewhere where a measurement put it first)")
        return None

    def forward(self, **inputs):
        return self._op.impls["reference"].forward(**inputs)

    def backward(self, *grads, **inputs):
        return self._op.impls["reference"].backward(*grads, **inputs)


_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled


def _forward_ad_level() -> int:
    """The open forward-mode AD level (-1: none)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1)


_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_dispatch_modes = torch._C._len_torch_dispatch_stack
_functorch_active = torch._C._are_functorch_transforms_active


def _tracing() -> bool:
    """Whether the call is being traced or transformed — ``torch.compile``, a dispatch mode
    (``make_fx``, fake tensors) or a ``torch.func`` transform: then the registered op runs, so the
    trace holds it (and its fake implementation gives the shapes)."""
    return _is_compiling() or _dispatch_modes() > 0 or _functorch_active()


def _device_type(device: torch.device) -> str:
    """``device.type`` (a seam the tests use to route CPU tensors as if they were elsewhere)."""
    return device.type


_auto_first = _backend.auto_first


def _unflatten(layout, flat):
    args, i = [], 0
    for size in layout:
        if size is None:
            args.append(flat[i])
            i += 1
        else:
            args.append(list(flat[i:i + size]))
            i += size
    return args


class _Direct(torch.autograd.Function):
    """:meth:`Op._forward_on` / :meth:`Op._backward` as an autograd function, for eager calls.
    ``layout``: None (no list argument: ``flat`` are the arguments) or, per argument, None or the
    length of the list it was flattened from."""

    @staticmethod
    def forward(ctx, op, backend, layout, *flat):
        args = flat if layout is None else _unflatten(layout, flat)
        outs, ran = op._forward_on(*args, backend)
        outs = (outs,) if op.single else outs
        ctx.set_materialize_grads(False)               # absent gradients become zeros below, only where needed
        if op._out_nondiff:
            ctx.mark_non_differentiable(*[outs[i] for i in op._out_nondiff])
        ctx.op, ctx.backend, ctx.layout = op, ran, layout
        ctx.flat = [None if isinstance(v, torch.Tensor) else v for v in flat]     # the non-tensor arguments
        ctx.out_like = [(outs[i].shape, outs[i].dtype, outs[i].device) for i in op._out_grad]
        ctx.save_for_backward(*[v if isinstance(v, torch.Tensor) else None for v in flat],
                              *[outs[i] for i in op._out_saved])
        return outs

    @staticmethod
    def backward(ctx, *grad_outs):
        op = ctx.op
        saved = ctx.saved_tensors
        n = len(ctx.flat)
        flat = [o if t is None else t for t, o in zip(saved, ctx.flat)]
        grads = []
        for i, (shape, dtype, device) in zip(op._out_grad, ctx.out_like):
            g = grad_outs[i]
            grads.append(torch.zeros(shape, dtype=dtype, device=device) if g is None else g)
        layout = ctx.layout
        args = flat if layout is None else _unflatten(layout, flat)
        got = op._backward(grads, *args, saved[n:], ctx.backend, impl=op.impls[ctx.backend])
        result, j = [None, None, None], 0
        if layout is None:
            for v, diff in zip(args, op._arg_diff):
                if diff and v is not None:
                    result.append(got[j])
                    j += 1
                else:
                    result.append(None)
        else:
            for v, diff, size in zip(args, op._arg_diff, layout):
                if size is None:
                    if diff and v is not None:
                        result.append(got[j])
                        j += 1
                    else:
                        result.append(None)
                elif diff:
                    result.extend(got[j:j + size])
                    j += size
                else:
                    result.extend([None] * size)
        return tuple(result)


_direct_apply = super(torch.autograd.Function, _Direct).apply   # the C++ apply: see :meth:`Op._direct`
