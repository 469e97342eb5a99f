"""Run under torchrun by tests/test_process_group.py: join the group, make one optimizer step
(its first call imports torch._dynamo), leave the group, and report the threads still running."""
import os
import sys

import torch

from fastsupernet.distributed import process_group_from_env


def thread_names() -> list[str]:
    return [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]


group = process_group_from_env("cpu")
net = torch.nn.Linear(4, 2)
opt = torch.optim.SGD(net.parameters(), lr=0.1)
net(torch.randn(3, 4)).sum().backward()
opt.step()
total = sum(group.all_gather(group.rank))
group.barrier()
group.close()
left = [n for n in thread_names() if "gloo" in n]
print(f"rank {group.rank}: sum {total}, gloo threads after close: {left}", file=sys.stderr, flush=True)
sys.exit(3 if left else 0)
