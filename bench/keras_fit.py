"""The Keras loop epochd's TensorFlow engine is measured against: `model.fit` as its docs teach.

The seed's MLP in Keras 3 layers, Adam(1e-3), binary cross-entropy from logits with an accuracy
metric (epochd reports accuracy too), inputs standardised once, `fit(..., shuffle=True)` on
NumPy arrays, one intra-op thread (as the epochd engine uses for this model), and
`steps_per_execution` as given (1 is Keras' default; larger values run several steps per graph
call). Prints one JSON line per epoch: {"epoch", "samples", "seconds", "cpu_seconds"} for the
training part only, measured by a callback.

Usage: python bench/keras_fit.py CSV BATCH EPOCHS [STEPS_PER_EXECUTION]
"""
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from peer_data import load  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def __init__(self, samples: int):
        super().__init__()
        self.samples = samples

    def on_epoch_begin(self, epoch, logs=None):
        self.t, self.cpu = time.perf_counter(), time.process_time()

    def on_epoch_end(self, epoch, logs=None):
        print(json.dumps({"epoch": epoch + 1, "samples": self.samples,
                          "seconds": time.perf_counter() - self.t,
                          "cpu_seconds": time.process_time() - self.cpu}), flush=True)


def main(csv: str, batch: int, epochs: int, steps_per_execution: int) -> None:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    keras.utils.set_random_seed(0)
    x, y = load(csv)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(128, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(64, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(32, activation="relu"), keras.layers.Dropout(0.2),
        keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.BinaryCrossentropy(from_logits=True),
                  metrics=["accuracy"], steps_per_execution=steps_per_execution)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=True, verbose=0,
              callbacks=[EpochTimer(len(x))])


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
         int(sys.argv[4]) if len(sys.argv) > 4 else 1)
