"""Worker of tests/test_plans.py, run without ``TRITON_INTERPRET``: every op's CPU-sized benchmark
cases (tag ``cpu``: the tiny ones and a few more, varlen too) down the GPU route on CPU tensors (``benchmarks/gpu_standins.py``: launches end in a launcher that
records its arguments instead of running), forward without grad and forward+backward, each call
first with call plans off (the backend's Python, prepared launches), then with plans on until
calls replay their plan. Per (op, case, pass) it prints what the launcher received on the last call
of each: the kernel, the grid and every argument (a tensor as what a launcher reads of it: its dtype
and its data pointer, as a byte offset into which input's memory, or "new"), and what the call
returned (a tensor as its dtype, shape, strides, offset and whose memory).

``python _plan_worker.py cuda`` (with ``MMKERNELS_CUDA_EMULATE=1``): the same for the ``cuda``
backend on the CPU emulator of the CUDA C++ kernels (the tiny cases), whose results are real:
their values too."""
import json
import os
import sys

os.environ["MMKERNELS_AUTOTUNE"] = "0"
os.environ.setdefault("MMKERNELS_CUDA_EMULATE", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))

import torch  # noqa: E402

import gpu_standins  # noqa: E402

LOG = []


class Recording(gpu_standins.Compiled):
    """A compiled kernel whose launcher records the kernel's arguments."""

    def __init__(self, name, signature=None):
        super().__init__(signature)
        self.name = name

    def run(self, *args):
        LOG.append((self.name, args[:3], args[9:]))


def install():
    from triton.runtime import jit as tjit
    gpu_standins.install()

    def fake_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        kernel = self.device_caches[device][0][key] = Recording(self.fn.__name__, signature)
        return kernel
    tjit.JITFunction._do_compile = fake_compile


def describe(v, inputs, pointers=False):
    """``v`` as a comparable value; ``pointers``: a tensor as what a launcher reads of it (its dtype
    and data pointer: the byte offset into whose memory), not its shape and strides."""
    if isinstance(v, torch.Tensor):
        ptr = v.untyped_storage().data_ptr()
        role = next((i for i, t in enumerate(inputs) if t.untyped_storage().data_ptr() == ptr), "new")
        if pointers:
            return ["pointer", str(v.dtype), v.data_ptr() - ptr, role]
        return ["tensor", str(v.dtype), list(v.shape), list(v.stride()), v.storage_offset(), role]
    if isinstance(v, (list, tuple)):
        return [describe(x, inputs, pointers) for x in v]
    if isinstance(v, (int, float, bool, str)) or v is None:
        return v
    if isinstance(getattr(v, "base", None), torch.Tensor):      # a host TMA descriptor
        return ["descriptor", describe(v.base, inputs), list(v.shape), list(v.strides), list(v.block_shape)]
    return type(v).__name__


def main():
    backend = sys.argv[1] if len(sys.argv) > 1 else "triton"
    tag = "cpu" if backend == "triton" else "overhead"     # the emulator runs every CUDA thread: tiny cases
    install()
    from mmkernels import plans, runtime
    from mmkernels.ops import bench_specs
    runtime.set_launch_mode("prepared")
    out = {}
    cases = [(name, provider, spec, case, dtype) for name, spec in bench_specs().items()
             for provider in (backend, backend + "_varlen") if provider in spec.providers
             for case in spec.cases if tag in case.tags for dtype in (torch.float32, torch.bfloat16)]
    for name, provider, spec, case, dtype in cases:
            inp = spec.make_inputs(case, dtype, "cpu")
            f = spec.providers[provider]
            inputs = [t for t in torch.utils._pytree.tree_flatten(inp.args)[0] if isinstance(t, torch.Tensor)]

            def fwd():
                with torch.no_grad():
                    return f(*inp.args)

            def fwd_bwd():
                for leaf in inp.leaves:
                    leaf.requires_grad_(True)
                got = f(*inp.args)
                first = got[0] if isinstance(got, tuple) else got
                grads = torch.autograd.grad(first, inp.leaves, inp.grad_out, allow_unused=True)
                for leaf in inp.leaves:
                    leaf.requires_grad_(False)
                return got, grads

            try:
                fwd()
            except ValueError:        # a backend that cannot take the case (a BackendError): not this op
                continue
            for mode, call in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                seen = {}
                for planned in (False, True):
                    plans.set_enabled(planned)
                    before = dict(plans.stats)
                    for _ in range(plans.ATTEMPTS + 2):
                        LOG.clear()
                        result = call()
                    flat = [t for t in torch.utils._pytree.tree_flatten(result)[0] if isinstance(t, torch.Tensor)]
                    seen[planned] = dict(launches=describe([list(x) for x in LOG], inputs, pointers=True),
                                         result=describe(result, inputs),
                                         values=[t.double().flatten().tolist() for t in flat] if backend == "cuda" else [],
                                         replayed=plans.stats.get("replayed", 0) - before.get("replayed", 0))
                out[f"{name}/{provider}/{case.name}/{str(dtype)[6:]}/{mode}"] = seen
                plans.set_enabled(True)
    # GatedFusion on modality slices of one buffer: its projections view them as one strided tensor
    if backend == "triton":
        from mmkernels.ops.gated_fusion import fusion_projections
        buf = torch.randn(64, 3, 32)
        xs = [buf[:, i] for i in range(3)]
        pw = [torch.randn(16, 32) for _ in range(3)]
        pb = [torch.randn(16) for _ in range(3)]
        gw, gb = torch.randn(48, 96), torch.randn(48)
        inputs = [buf, *pw, *pb, gw, gb]
        seen = {}
        for planned in (False, True):
            plans.set_enabled(planned)
            before = plans.stats.get("replayed", 0)
            for _ in range(plans.ATTEMPTS + 2):
                LOG.clear()
                with torch.no_grad():
                    result = fusion_projections(xs, pw, pb, gw, gb, backend="triton")
            seen[planned] = dict(launches=describe([list(x) for x in LOG], inputs, pointers=True), result=describe(result, inputs),
                                 values=[t.flatten().tolist() for t in result][:1],
                                 replayed=plans.stats.get("replayed", 0) - before)
        plans.set_enabled(True)
        out["gated_fusion/slices of one buffer/float32/fwd"] = seen
    if backend != "triton":
        print(json.dumps(dict(rows=out, stats=plans.stats, last_refusal=plans.last_refusal[0])))
        return
    # a repeat call with bad input: the named ValueError, before any launch
    import mmkernels
    xs = [torch.randn(8, d) for d in (64, 32, 48)]
    ws = [torch.randn(d) for d in (64, 32, 48)]
    for _ in range(plans.ATTEMPTS + 2):
        mmkernels.norm_concat(xs, ws, backend="triton")
    replays = plans.stats.get("replayed", 0)
    LOG.clear()
    try:
        mmkernels.norm_concat(xs, ws[:2] + [torch.randn(47)], backend="triton")
        bad = "accepted"
    except ValueError as exc:
        bad = str(exc)
    bad_input = dict(error=bad, launches=len(LOG), replayed_before=replays)
    # the launch knobs in the signature
    from triton import knobs
    key = plans.signature(([xs[0]], 1.0), lambda device: "cuda")[0]
    knobs.runtime.launch_enter_hook.add(lambda metadata: None)
    hook = plans.signature(([xs[0]], 1.0), lambda device: "cuda")[0] != key
    knobs.runtime.launch_enter_hook.calls.clear()
    debug = knobs.runtime.debug
    knobs.runtime.debug = not debug
    changed = plans.signature(([xs[0]], 1.0), lambda device: "cuda")[0] != key
    knobs.runtime.debug = debug
    after = plans.signature(([xs[0]], 1.0), lambda device: "cuda")[0] != key
    print(json.dumps(dict(rows=out, bad_input=bad_input, knobs=dict(hook=hook, debug=changed, after=after), stats=plans.stats, last_refusal=plans.last_refusal[0])))


if __name__ == "__main__":
    main()
