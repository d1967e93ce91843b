"""The hand-optimised PyTorch loop epochd is measured against (PERFORMANCE.md's reference).

Data as one tensor, one randperm + index_select per epoch, batches as contiguous slices,
zero_grad(set_to_none=True), Adam(fused=True), the loss summed on a tensor with one .item()
per epoch, torch.set_num_threads(1) before any torch work. Prints one JSON line per epoch:
{"epoch", "samples", "seconds", "cpu_seconds"} for the training part only.

With `dataloader` as a fourth argument it is instead the plain loop most code has: batches from
a `DataLoader` over a `TensorDataset` with `shuffle=True` (per-sample indexing and collation).

Usage: python bench/handwritten.py CSV BATCH EPOCHS [dataloader]
"""
import json
import sys
import time

import torch

from peer_data import load


def seed_mlp(d_in: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.2),
        torch.nn.Linear(32, 1))


def main(csv: str, batch: int, epochs: int, dataloader: bool = False) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = load(csv)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    model = seed_mlp(X.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    n = len(X)
    loader = (torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=batch,
                                          shuffle=True) if dataloader else None)
    for epoch in range(1, epochs + 1):
        t, cpu = time.perf_counter(), time.process_time()
        if loader is None:
            perm = torch.randperm(n)
            xs, ys = X.index_select(0, perm), Y.index_select(0, perm)
            batches = ((xs[a:a + batch], ys[a:a + batch]) for a in range(0, n, batch))
        else:
            batches = loader
        total = torch.zeros(())
        model.train()
        for xb, yb in batches:
            out = model(xb)
            loss = loss_fn(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach()
        total.item()
        print(json.dumps({"epoch": epoch, "samples": n, "seconds": time.perf_counter() - t,
                          "cpu_seconds": time.process_time() - cpu}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["dataloader"])
