"""PyTorch Lightning, the way its docs teach it, as a peer of epochd's PyTorch engine.

The seed's MLP as a LightningModule (Adam 1e-3, BCE with logits), `Trainer` on the CPU with no
logger, checkpointing, progress bar or model summary, one torch thread. Two ways to feed it:
- `defaults`: a `DataLoader` over a `TensorDataset` with `shuffle=True` (per-sample indexing
  and collation, what most Lightning code does);
- `inmemory`: an iterable that yields contiguous slices of the epoch's shuffled tensor (the
  hand-optimised loop's batching inside Lightning).
Prints one JSON line per epoch: {"epoch", "samples", "seconds", "cpu_seconds"}, training only.

Usage: python bench/lightning_fit.py CSV BATCH EPOCHS [defaults|inmemory]
"""
import json
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")  # Lightning's advice about workers and logging, every run

import lightning as L  # noqa: E402
from torch.utils.data import DataLoader, IterableDataset, TensorDataset  # noqa: E402

from handwritten import seed_mlp  # noqa: E402
from peer_data import load  # noqa: E402


class SeedMLP(L.LightningModule):
    def __init__(self, d_in: int):
        super().__init__()
        self.net = seed_mlp(d_in)
        self.loss = torch.nn.BCEWithLogitsLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        return self.loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


class ShuffledSlices(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int):
        self.x, self.y, self.batch = x, y, batch

    def __iter__(self):
        perm = torch.randperm(len(self.x))
        xs, ys = self.x.index_select(0, perm), self.y.index_select(0, perm)
        for a in range(0, len(xs), self.batch):
            yield xs[a:a + self.batch], ys[a:a + self.batch]


class EpochTimer(L.Callback):
    def __init__(self, samples: int):
        self.samples = samples

    def on_train_epoch_start(self, trainer, module):
        self.t, self.cpu = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, module):
        print(json.dumps({"epoch": trainer.current_epoch + 1, "samples": self.samples,
                          "seconds": time.perf_counter() - self.t,
                          "cpu_seconds": time.process_time() - self.cpu}), flush=True)


def main(csv: str, batch: int, epochs: int, mode: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = load(csv)
    X, Y = torch.from_numpy(x), torch.from_numpy(y)
    if mode == "inmemory":
        loader = DataLoader(ShuffledSlices(X, Y, batch), batch_size=None)
    else:
        loader = DataLoader(TensorDataset(X, Y), batch_size=batch, shuffle=True)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[EpochTimer(len(X))])
    trainer.fit(SeedMLP(X.shape[1]), loader)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else "defaults")
