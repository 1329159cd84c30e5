"""Profile one captured GPU step (where does the capture's time go?). Prints the top ops."""
import sys


sys.argv = [sys.argv[0], "--device", "cuda"]
from bench.capture_overhead import gpu_case  # noqa: E402

step, label = gpu_case("1.5b", 8, 1024)
for _ in range(3):
    step(True), step(False)
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for on in (False, True):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(on)
    print("capture" if on else "plain", label)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=8))
