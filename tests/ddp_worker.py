"""One rank of tests/test_train.py's DistributedDataParallel test, run as its own process:

    python tests/ddp_worker.py RANK WORLD PORT INIT_STATE BATCH OUT_DIR

The tiny GPT from INIT_STATE under DistributedDataParallel (gloo, rank 0's store on
127.0.0.1:PORT), fastgpt's native kernels, rows rank*B/WORLD .. (rank+1)*B/WORLD of BATCH;
rank 0 writes the all-reduced (averaged) gradients, every rank its loss, into OUT_DIR. A fresh
interpreter, not a multiprocessing child of pytest, so nothing of the test process's state
(threads, open pipes, environment set up by other tests) reaches it.
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastgpt
from fastgpt.model import GPT, GPTConfig


def main(rank: int, world: int, port: str, init_path: str, batch_path: str,
         out_dir: str) -> None:
    torch.set_num_threads(1)  # the ranks share a small machine
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = GPT(GPTConfig.from_preset("tiny"))
        model.load_state_dict(torch.load(init_path, weights_only=True))
        ddp = DistributedDataParallel(model)
        x, y = torch.load(batch_path, weights_only=True)  # (B, T) each
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        with fastgpt.use_backend("native"):
            _, loss = ddp(x[rows], y[rows])
            loss.backward()  # DDP averages the gradients over the ranks
        torch.save(loss.detach(), os.path.join(out_dir, f"loss{rank}.pt"))
        if rank == 0:
            grads = {name: p.grad for name, p in model.named_parameters()}
            torch.save(grads, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    rank, world = int(sys.argv[1]), int(sys.argv[2])
    main(rank, world, *sys.argv[3:7])
