"""Both engines on real tiny data, one parametrised suite: results do not depend on how steps
are split into calls, a checkpoint taken anywhere resumes bit for bit, damaged or foreign
checkpoints are refused, and no checkpoint unpickles code."""
import os
import pickle

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from daemon import spec as specs
from daemon.errors import CheckpointInvalid, DeviceUnavailable
from engines import architecture, load_engine
from engines.data import prepare
from tests.conftest import WINE, classification_csv, regression_csv, same_weights


@pytest.fixture
def Engine(framework):
    return load_engine(framework)


def job(tmp_path, framework="pytorch", **raw) -> dict:
    raw = {"train_data_path": str(WINE), "target_column": "cultivar", "batch_size": 16,
           "algorithm_params": {"hidden_units": [32, 16], "dropout_rate": 0.3},
           "devices": "cpu", "framework": framework, **raw}
    return specs.normalise(specs.validate(raw), job_id="j", base_dir=tmp_path,
                           spool_root=tmp_path / "spool", allow_roots=[])


def weights(engine) -> dict:
    """Every model variable (weights, norm statistics; dropout RNG state for TensorFlow)."""
    if engine.framework == "pytorch":
        return {k: v.detach().numpy().copy() for k, v in engine.model.state_dict().items()}
    return {str(i): v.numpy().copy() for i, v in enumerate(engine.model.variables)}


def same(a: dict, b: dict) -> bool:
    return same_weights(a, b)


def forward(engine, x: np.ndarray) -> np.ndarray:
    """The engine's network on x in inference mode, as probabilities."""
    if engine.framework == "pytorch":
        engine.model.eval()
        with torch.no_grad():
            return torch.softmax(engine.model(torch.from_numpy(x)), dim=1).numpy()
    import tensorflow as tf
    return tf.nn.softmax(engine.model(x, training=False)).numpy()


def run(engine, epochs, chunks=None, lr=0.01):
    for e in range(1, epochs + 1):
        engine.start_epoch(e, 0)
        steps = engine.steps_per_epoch
        for n in (chunks or [steps]):
            n = min(n, steps - engine.step)
            if n > 0:
                engine.train_steps([lr] * n)
        if engine.step < steps:
            engine.train_steps([lr] * (steps - engine.step))
    return engine


# the PyTorch engine's hand-derived step covers the first network, autograd the second
NETWORKS = {"relu-dropout": {"hidden_units": [32, 16], "dropout_rate": 0.3},
            "batchnorm-gelu": {"hidden_units": [32, 16], "dropout_rate": 0.3, "batch_norm": True,
                               "activation": "gelu"}}


@pytest.mark.parametrize("network", NETWORKS)
def test_splitting_steps_into_calls_changes_nothing(tmp_path, framework, Engine, network):
    spec = job(tmp_path, framework, algorithm_params=NETWORKS[network])
    data = prepare(spec)
    a = run(Engine(spec, data, 1), 2)
    b = run(Engine(spec, data, 1), 2, chunks=[1, 2, 3, 1])
    assert same(weights(a), weights(b))
    assert a.train_metrics() == b.train_metrics()


@pytest.mark.parametrize("at_step, network", [(0, "relu-dropout"), (1, "relu-dropout"),
                                              (4, "batchnorm-gelu"), (8, "relu-dropout")])
def test_a_checkpoint_anywhere_resumes_bit_for_bit(tmp_path, at_step, framework, Engine, network):
    """Train 3 epochs straight; separately, stop in epoch 2 at `at_step`, checkpoint, load into a
    fresh engine (fresh process state) and finish: the final weights are identical."""
    spec = job(tmp_path, framework, algorithm_params=NETWORKS[network])
    data = prepare(spec)
    straight = run(Engine(spec, data, 1), 3)

    first = Engine(spec, data, 1)
    run(first, 1)
    first.start_epoch(2, 0)
    first.train_steps([0.01] * at_step)
    path = tmp_path / f"ckpt{Engine.checkpoint_suffix}"
    first.save_checkpoint(path)
    torch.manual_seed(12345)  # whatever happens to the RNG in between must not matter
    np.random.seed(12345)

    second = Engine(spec, data, 1)
    assert second.load_checkpoint(path) == (2, at_step)
    second.start_epoch(2, at_step)
    second.train_steps([0.01] * (second.steps_per_epoch - at_step))
    epoch2 = second.train_metrics()
    second.start_epoch(3, 0)
    second.train_steps([0.01] * second.steps_per_epoch)
    assert same(weights(straight), weights(second))
    reference = run(Engine(spec, data, 1), 2)
    assert epoch2 == reference.train_metrics()  # the epoch's running sums came back too


@pytest.mark.parametrize("table", ["binary", "multiclass", "regression"])
def test_the_hand_derived_step_computes_autograds_gradients(tmp_path, table):
    """The PyTorch fast path's forward and backward against autograd on the same weights, batch
    and dropout masks, for each loss; and the engine takes that path for a plain ReLU MLP."""
    import torch.nn.functional as F
    path = tmp_path / "t.csv"
    if table == "regression":
        regression_csv(path, rows=300)
    else:
        classification_csv(path, rows=300, classes=2 if table == "binary" else 3)
    spec = job(tmp_path, train_data_path=str(path), target_column="target", batch_size=64,
               algorithm_params={"hidden_units": [32, 16], "dropout_rate": 0.25})
    engine = load_engine("pytorch")(spec, prepare(spec), 1)
    assert engine.fast is not None
    run(engine, 1)  # away from the initial weights
    engine.start_epoch(2, 0)
    x, y = engine.xs[:64], engine.ys[:64]
    masks = engine._step_masks(0, 64)
    assert {float(v) for m in masks for v in m.unique()} == {0.0, float(torch.tensor(1 / 0.75))}
    kept = torch.cat([(m > 0).float().reshape(-1) for m in masks]).mean()
    assert abs(float(kept) - 0.75) < 0.03

    def compare(x, y, masks, rtol, atol):
        loss, out, grads = engine.fast_grads(x, y, masks)
        params = [p for layer in engine.fast for p in (layer.weight, layer.bias)]
        h = x
        for layer, mask in zip(engine.fast[:-1], masks):
            h = F.relu(F.linear(h, layer.weight, layer.bias)) * mask
        reference_out = F.linear(h, engine.fast[-1].weight, engine.fast[-1].bias)
        reference_loss = engine.loss_fn(reference_out, y)
        reference = torch.autograd.grad(reference_loss, params)
        assert torch.allclose(out, reference_out, rtol=rtol, atol=atol)
        assert torch.allclose(loss, reference_loss, rtol=rtol, atol=atol)
        for mine, theirs in zip([g for pair in grads for g in pair], reference):
            assert mine.shape == theirs.shape and torch.allclose(mine, theirs, rtol=rtol, atol=atol)

    compare(x, y, masks, 1e-5, 1e-7)  # float32, as the engine trains
    for layer in engine.fast:  # float64: the same algebra, without float32's rounding
        layer.double()
    compare(x.double(), y if table == "multiclass" else y.double(), [m.double() for m in masks],
            1e-12, 1e-15)


def test_networks_outside_the_fast_path_take_autograd(tmp_path):
    for params in ({"batch_norm": True}, {"activation": "gelu"}, {"model_type": "resnet"}):
        spec = job(tmp_path, algorithm_params=params)
        assert load_engine("pytorch")(spec, prepare(spec), 1).fast is None
    spec = job(tmp_path, mixed_precision="bf16")
    assert load_engine("pytorch")(spec, prepare(spec), 1).fast is None


def test_a_malicious_pickle_is_never_executed(tmp_path, framework, Engine):
    """Neither engine unpickles a checkpoint (PyTorch loads weights_only, TensorFlow reads HDF5
    arrays): a planted payload is refused and its side effect never happens."""
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps(Exploit()))
    engine = Engine(job(tmp_path, framework), prepare(job(tmp_path, framework)), 1)
    with pytest.raises(CheckpointInvalid):
        engine.load_checkpoint(path)
    torch.save({"model": Exploit()}, tmp_path / "evil2")
    with pytest.raises(CheckpointInvalid):
        engine.load_checkpoint(tmp_path / "evil2")
    assert not marker.exists()


def test_a_foreign_or_truncated_checkpoint_is_invalid(tmp_path, framework, Engine):
    engine = Engine(job(tmp_path, framework), prepare(job(tmp_path, framework)), 1)
    name = {"pytorch": "PyTorch", "tensorflow": "TensorFlow"}[framework]
    foreign = tmp_path / f"foreign{Engine.checkpoint_suffix}"
    if framework == "pytorch":
        torch.save({"some": torch.zeros(2)}, foreign)
    else:
        with h5py.File(foreign, "w") as f:
            f.attrs["epochd"] = '{"format": "something-else"}'
    with pytest.raises(CheckpointInvalid, match=f"not an epochd {name} checkpoint"):
        engine.load_checkpoint(foreign)
    good = tmp_path / f"good{Engine.checkpoint_suffix}"
    engine.save_checkpoint(good)
    data = good.read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointInvalid, match="does not load"):
        engine.load_checkpoint(tmp_path / "cut")
    # a checkpoint of another network (one more hidden unit) is refused before anything changes
    other = Engine(job(tmp_path, framework, algorithm_params={"hidden_units": [33, 16]}),
                   prepare(job(tmp_path, framework)), 1)
    other.save_checkpoint(tmp_path / "other")
    before = weights(engine)
    with pytest.raises(CheckpointInvalid):
        engine.load_checkpoint(tmp_path / "other")
    assert same(before, weights(engine))


@pytest.mark.parametrize("model_type", ["mlp", "resnet", "linear"])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_the_parameter_count_the_worker_checks_memory_with_is_what_each_engine_builds(model_type, batch_norm):
    from engines import parameter_count, tf_engine, torch_engine
    arch = {"input_dim": 7, "output_dim": 3, "hidden_units": [16, 8], "batch_norm": batch_norm,
            "model_type": model_type, "activation": "relu", "dropout_rate": 0.1}
    built = torch_engine.build_model(arch)
    assert parameter_count(arch) == sum(p.numel() for p in built.parameters())  # the trained ones
    keras_model = tf_engine.build_model(arch)
    assert parameter_count(arch) == sum(int(np.prod(w.shape)) for w in keras_model.trainable_weights)


def test_the_exported_model_predicts_what_the_engine_computes(tmp_path, framework, Engine):
    spec = job(tmp_path, framework)
    data = prepare(spec)
    engine = run(Engine(spec, data, 1), 2)
    path = tmp_path / Engine.weights_file
    engine.save_weights(tmp_path / "tmp-name")  # the worker hands engines a temp name to fill
    os.replace(tmp_path / "tmp-name", path)
    predict = Engine.predictor(tmp_path, architecture(spec, data), path)
    assert np.allclose(predict(data.x_val), forward(engine, data.x_val), atol=1e-6)


def test_regression_metrics_are_in_the_targets_units(tmp_path, framework, Engine):
    regression_csv(tmp_path / "reg.csv", rows=300)
    spec = job(tmp_path, framework, train_data_path=str(tmp_path / "reg.csv"), target_column="target",
               algorithm_params={"hidden_units": [32]})
    engine = run(Engine(spec, prepare(spec), 1), 30, lr=0.01)
    val = engine.evaluate()
    assert set(val) == {"val_loss", "val_mae", "val_rmse", "val_r2"}
    assert val["val_r2"] > 0.9 and val["val_rmse"] < 5.0  # target std is ~11
    assert set(engine.train_metrics()) == {"train_loss", "train_mae", "train_rmse"}


@pytest.mark.parametrize("params", [
    {"model_type": "linear"},
    {"model_type": "mlp", "batch_norm": True, "activation": "gelu"},
    {"model_type": "resnet", "hidden_units": [32, 64], "dropout_rate": 0.1},
])
def test_model_types_learn_binary_data(tmp_path, params, framework, Engine):
    classification_csv(tmp_path / "bin.csv", rows=300)
    spec = job(tmp_path, framework, train_data_path=str(tmp_path / "bin.csv"), target_column="target",
               algorithm_params=params)
    engine = run(Engine(spec, prepare(spec), 1), 15, lr=0.01)
    assert engine.evaluate()["val_accuracy"] > 0.8


@pytest.mark.parametrize("model_type", ["mlp", "resnet"])
def test_batch_norm_trains_when_the_rows_leave_one_over_for_the_last_batch(tmp_path, model_type,
                                                                           framework, Engine):
    """33 training rows at batch 32: the last batch is one row, of which torch's BatchNorm1d
    cannot take a batch variance (it raised, failing the job). That batch is normalised with
    the running statistics; the statistics stay finite and the model still learns."""
    table = pd.read_csv(classification_csv(tmp_path / "all.csv", rows=300))
    table.head(33).to_csv(tmp_path / "t.csv", index=False)
    table.tail(100).to_csv(tmp_path / "v.csv", index=False)
    spec = job(tmp_path, framework, train_data_path=str(tmp_path / "t.csv"), val_data_path=str(tmp_path / "v.csv"),
               target_column="target", batch_size=32,
               algorithm_params={"model_type": model_type, "hidden_units": [16], "batch_norm": True})
    engine = Engine(spec, prepare(spec), 1)
    assert engine.steps_per_epoch == 2
    run(engine, 30, lr=0.01)
    assert all(np.isfinite(v).all() for v in weights(engine).values())
    assert np.isfinite(engine.train_metrics()["train_loss"]) and engine.evaluate()["val_accuracy"] > 0.7


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "rmsprop", {"name": "sgd", "momentum": 0.9, "nesterov": True}])
def test_optimizers(tmp_path, optimizer, framework, Engine):
    spec = job(tmp_path, framework, optimizer=optimizer)
    engine = run(Engine(spec, prepare(spec), 1), 3)
    assert np.isfinite(engine.train_metrics()["train_loss"])


@pytest.mark.parametrize("optimizer", [{"name": "sgd", "momentum": 0.9, "nesterov": True},
                                       {"name": "rmsprop", "momentum": 0.9}], ids=["sgd", "rmsprop"])
def test_an_optimisers_state_resumes_bit_for_bit(tmp_path, optimizer, framework, Engine):
    """The momentum and running averages come back from a mid-epoch checkpoint: the weights
    after it equal those of a run that never stopped."""
    spec = job(tmp_path, framework, optimizer=optimizer)
    data = prepare(spec)
    straight = run(Engine(spec, data, 1), 2)
    first = run(Engine(spec, data, 1), 1)
    first.start_epoch(2, 0)
    first.train_steps([0.01] * 3)
    path = tmp_path / f"ckpt{Engine.checkpoint_suffix}"
    first.save_checkpoint(path)
    second = Engine(spec, data, 1)
    assert second.load_checkpoint(path) == (2, 3)
    second.start_epoch(2, 3)
    second.train_steps([0.01] * (second.steps_per_epoch - 3))
    assert same(weights(straight), weights(second))


@pytest.mark.parametrize("network", [{"hidden_units": [32, 16], "dropout_rate": 0.0},
                                     {"hidden_units": [32, 16], "dropout_rate": 0.0, "activation": "gelu"}])
def test_gradient_accumulation_gives_the_larger_batchs_training(tmp_path, framework, Engine, network):
    """Micro-batches of 16 accumulated 3 times against batches of 48, on 142 rows: three
    updates an epoch, the last over 46 rows (16 + 16 + 14). The same weights and metrics, up
    to float rounding of the sums in a different order."""
    big = job(tmp_path, framework, batch_size=48, algorithm_params=network)
    acc = job(tmp_path, framework, batch_size=16, gradient_accumulation_steps=3, algorithm_params=network)
    data = prepare(big)
    a, b = Engine(big, data, 1), Engine(acc, data, 1)
    assert a.steps_per_epoch == b.steps_per_epoch == 3 and b.batch_size == 48
    run(a, 3), run(b, 3, chunks=[1, 2])
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6, err_msg=k)
    ma, mb = a.train_metrics(), b.train_metrics()
    assert ma["train_accuracy"] == mb["train_accuracy"]
    assert ma["train_loss"] == pytest.approx(mb["train_loss"], rel=1e-5)
    single = run(Engine(job(tmp_path, framework, batch_size=16, algorithm_params=network), data, 1), 3)
    assert not np.allclose(weights(single)[next(iter(wa))], wa[next(iter(wa))], atol=1e-4)  # it matters


def test_fp16_with_a_gradient_scaler_trains_and_resumes_bit_for_bit(tmp_path):
    """PyTorch fp16 autocast with its GradScaler (on the CPU here): it learns, its scale comes
    back from a checkpoint with everything else, and a resumed run ends bit for bit."""
    from engines.torch_engine import TorchEngine
    spec = job(tmp_path, mixed_precision="fp16")
    data = prepare(spec)
    straight = run(TorchEngine(spec, data, 1), 3)
    assert straight.evaluate()["val_accuracy"] > 0.8 and straight.scaler.is_enabled()
    first = TorchEngine(spec, data, 1)
    run(first, 1)
    first.start_epoch(2, 0)
    first.train_steps([0.01] * 3)
    first.scaler.update(1024.0)  # a scale no fresh scaler has: it must come back from the file
    path = tmp_path / "fp16.pt"
    first.save_checkpoint(path)
    saved_scaler = first.scaler.state_dict()
    finish = lambda engine: (engine.train_steps([0.01] * (engine.steps_per_epoch - 3)),
                             engine.start_epoch(3, 0), engine.train_steps([0.01] * engine.steps_per_epoch))
    finish(first)  # the run that went on; then one resumed from the file (the RNG is global)
    second = TorchEngine(spec, data, 1)
    second.load_checkpoint(path)
    assert second.scaler.state_dict() == saved_scaler and second.scaler.get_scale() == 1024.0
    second.start_epoch(2, 3)
    finish(second)
    assert same(weights(first), weights(second))


def test_tensorflow_fp16_with_a_loss_scale_trains_and_resumes_bit_for_bit(tmp_path):
    """TensorFlow fp16 (float16 layers, Keras' LossScaleOptimizer; on the CPU here): it learns,
    the loss scale comes back from a checkpoint with everything else, and a run resumed from
    the middle of an epoch ends bit for bit (L2 decay on, which joins the scaled gradients)."""
    Engine = load_engine("tensorflow")
    spec = job(tmp_path, "tensorflow", mixed_precision="fp16", optimizer={"name": "adam", "weight_decay": 1e-3})
    data = prepare(spec)
    straight = run(Engine(spec, data, 1), 3)
    assert straight.evaluate()["val_accuracy"] > 0.8
    assert straight.model.layers[1].compute_dtype == "float16"
    first = run(Engine(spec, data, 1), 1)
    first.start_epoch(2, 0)
    first.train_steps([0.01] * 3)
    first.optimizer.dynamic_scale.assign(1024.0)  # a scale no fresh optimizer has
    path = tmp_path / "fp16.h5"
    first.save_checkpoint(path)
    finish = lambda engine: (engine.train_steps([0.01] * (engine.steps_per_epoch - 3)),
                             engine.start_epoch(3, 0), engine.train_steps([0.01] * engine.steps_per_epoch))
    finish(first)
    second = Engine(spec, data, 1)
    assert float(second.optimizer.dynamic_scale) != 1024.0
    second.load_checkpoint(path)
    assert float(second.optimizer.dynamic_scale) == 1024.0
    second.start_epoch(2, 3)
    finish(second)
    assert same(weights(first), weights(second))


def test_auto_precision_is_full_precision_on_the_cpu(tmp_path, framework, Engine):
    spec = job(tmp_path, framework, mixed_precision="auto")
    a = run(Engine(spec, prepare(spec), 1), 2)
    plain = job(tmp_path, framework, mixed_precision="no")
    b = run(Engine(plain, prepare(plain), 1), 2)
    assert same(weights(a), weights(b))


def test_bf16_mixed_precision_trains(tmp_path, framework, Engine):
    spec = job(tmp_path, framework, mixed_precision="bf16")
    engine = run(Engine(spec, prepare(spec), 1), 5, lr=0.01)
    assert engine.evaluate()["val_accuracy"] > 0.8


def test_asking_for_a_gpu_without_one_is_a_clear_error(tmp_path, framework, Engine):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(DeviceUnavailable, match="none is visible"):
        Engine(job(tmp_path, framework, devices="cuda"), prepare(job(tmp_path, framework)), 1)
