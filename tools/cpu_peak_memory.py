"""CPU fwd+bwd time and peak RSS of one benchmark case and provider:
``python tools/cpu_peak_memory.py OP CASE PROVIDER`` (each provider in its own process, so the
high-water mark is its own)."""
import resource, sys, time, torch
torch.set_num_threads(2)
from mmkernels.ops import bench_specs
op, case_name, prov = sys.argv[1:4]
spec = bench_specs()[op]
case = [c for c in spec.cases if c.name == case_name][0]
inp = spec.make_inputs(case, torch.float32, torch.device("cpu"))
leaves = [t.requires_grad_() for t in inp.leaves]
f = spec.providers[prov]
def run():
    out = f(*inp.args)
    g = torch.autograd.grad(out, leaves, inp.grad_out)
    return g
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ts = []
for _ in range(3):
    t = time.perf_counter(); run(); ts.append(time.perf_counter() - t)
print(f"{op} {case_name} {prov}: fwd+bwd median {sorted(ts)[1]*1e3:.0f} ms, peak RSS above inputs {(peak-base)/1024:.0f} MB")
