"""Property-based fuzzing of the job-file path the daemon runs on every drop: bytes -> JSON object
-> JobSpec -> normalised spec. Whatever a user drops, the answer is a spec or BadJobFile with a
reason per problem; never another exception (which would be a daemon bug, not a user error).

The default run tries a few hundred examples per property; `make test-slow` tries thousands."""
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon import spec as specs
from daemon.errors import BadJobFile, PathNotAllowed

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SEED = specs.example_job()
KEYS = sorted(specs.JobSpec.model_fields) + ["epoch", "lr", "framwork", ""]
NESTED = {"algorithm_params": sorted(specs.AlgorithmParams.model_fields),
          "optimizer": sorted(specs.Optimizer.model_fields),
          "early_stopping": sorted(specs.EarlyStopping.model_fields),
          "checkpoint": sorted(specs.CheckpointPolicy.model_fields),
          "data": sorted(specs.DataOptions.model_fields),
          "learning_rate_scheduler": ["name", "step_size", "gamma", "milestones", "t_max", "mode"]}

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30)
           | st.sampled_from(["auto", "cpu", "cuda", "tf", "pytorch", "relu", "adam", "step",
                              "cosine", "plateau", "val_loss", "accuracy", "bf16", "fp16", "mlp"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def nested_object(key: str):
    names = NESTED.get(key)
    if names is None:
        return json_values
    return st.dictionaries(st.sampled_from(names + ["bogus"]), json_values, max_size=len(names))


job_objects = st.dictionaries(st.sampled_from(KEYS), json_values, max_size=12).flatmap(
    lambda d: st.fixed_dictionaries({k: nested_object(k) if k in NESTED else st.just(v)
                                     for k, v in d.items()}))


def seed_with(key_values: dict) -> dict:
    job = json.loads(json.dumps(SEED))
    for path, value in key_values.items():
        target = job
        *parents, last = path.split(".")
        for p in parents:
            target = target.setdefault(p, {}) if isinstance(target.get(p), dict) else target
        target[last] = value
    return job


seed_mutations = st.dictionaries(
    st.sampled_from(sorted(SEED) + [f"algorithm_params.{k}" for k in SEED["algorithm_params"]]),
    json_values, min_size=1, max_size=3).map(seed_with)


def full_path(raw: dict, tmp: Path):
    """What the daemon does with a parsed object: validate, then normalise against a spool."""
    spec = specs.validate(raw)
    return specs.normalise(spec, job_id="fuzz", base_dir=tmp, spool_root=tmp / "spool",
                           allow_roots=[tmp])


def check_outcome(raw: dict, tmp: Path) -> None:
    try:
        out = full_path(raw, tmp)
    except BadJobFile as e:
        assert e.errors and all(isinstance(m, str) and len(m) > 10 for m in e.errors), e.errors
        return
    except PathNotAllowed as e:
        assert "Expected" in str(e) or "allowed" in str(e)
        return
    json.dumps(out)  # an accepted spec is plain JSON, as job_accepted records it
    assert out["train_data_path"] and out["target_column"]


def check_bytes(data: bytes, tmp: Path) -> None:
    try:
        raw = specs.parse_job_bytes(data)
    except BadJobFile as e:
        assert len(e.errors) == 1 and "Expected" in e.errors[0]
        return
    assert isinstance(raw, dict)
    check_outcome(raw, tmp)


def test_any_object_is_a_spec_or_a_reasoned_rejection(tmp_path):
    FAST(given(job_objects)(lambda raw: check_outcome(raw, tmp_path)))()


def test_any_change_to_the_seed_job_is_a_spec_or_a_reasoned_rejection(tmp_path):
    FAST(given(seed_mutations)(lambda raw: check_outcome(raw, tmp_path)))()


def test_any_bytes_are_a_spec_or_a_reasoned_rejection(tmp_path):
    dumped = job_objects.map(lambda o: json.dumps(o).encode())
    FAST(given(st.binary(max_size=300) | dumped | dumped.map(lambda b: b[: len(b) // 2]))(
        lambda data: check_bytes(data, tmp_path)))()


def test_a_bad_value_is_named_in_its_rejection(tmp_path):
    """A wrong type for one seed key: the rejection names that key."""
    @FAST
    @given(st.sampled_from(["epochs", "batch_size", "learning_rate", "train_data_path",
                            "target_column", "feature_columns"]),
           st.sampled_from([{"x": 1}, [[1]], True, -5, "", None]))
    def check(key, value):
        raw = {**SEED, key: value}
        try:
            specs.validate(raw)
        except BadJobFile as e:
            assert any(f'"{key}' in m for m in e.errors), e.errors  # "key" or "key[0]"
    check()


# ------------------------------------------------------------------ data files

CELLS = (st.floats(allow_nan=True, allow_infinity=True, width=32) | st.integers(-3, 3)
         | st.sampled_from(["", "abc", "1e400", "-inf", "NaN", "true", "2024-01-02", "ünï", " 3 ",
                            "1,5", "0x10", 10**30, -(10**30), None]))
TARGETS = st.integers(0, 2) | st.floats(-5, 5) | st.sampled_from(["x", "y", "", None, "inf", 7.5])


@st.composite
def tables(draw):
    rows = draw(st.integers(1, 30))
    column = lambda cells: draw(st.lists(cells, min_size=rows, max_size=rows))  # noqa: E731
    numbers = st.floats(-3, 3, width=32)
    table = {f"f{i}": column(numbers | CELLS if draw(st.booleans()) else numbers) for i in range(3)}
    table["target"] = column(draw(st.sampled_from(
        [TARGETS, st.integers(0, 1), st.floats(-5, 5) | st.just(float("inf"))])))
    raw = {"target_column": "target", "epochs": 1}
    if draw(st.booleans()):
        raw["data"] = {"streaming": True}
    if draw(st.booleans()):
        raw["task"] = draw(st.sampled_from(["classification", "regression"]))
    if draw(st.booleans()):
        raw["categorical_columns"] = ["f1"]
    return table, raw


def check_table(table, raw, tmp: Path) -> None:
    """A table is prepared into finite matrices, or it is a DataError: never another exception,
    never a NaN or an infinity passed on to training."""
    import numpy as np
    import pandas as pd

    from daemon.errors import DataError
    from engines.data import prepare
    path = tmp / "t.csv"
    pd.DataFrame(table).to_csv(path, index=False)
    spec = specs.normalise(specs.validate({**raw, "train_data_path": str(path)}), job_id="j",
                           base_dir=tmp, spool_root=tmp / "spool", allow_roots=[])
    try:
        data = prepare(spec, tmp / "stream")
    except DataError as e:
        assert "Expected" in str(e) or "Columns found" in str(e), str(e)
        return
    if data.stream is None:
        for a in (data.x_train, data.x_val, data.y_train, data.y_val):
            assert a is None or np.isfinite(a.astype(float)).all()


def test_any_small_table_trains_on_finite_numbers_or_is_a_data_error(tmp_path):
    FAST(given(tables())(lambda t: check_table(*t, tmp_path)))()


@pytest.mark.slow
def test_fuzz_long_run(tmp_path):
    SLOW(given(job_objects | seed_mutations)(lambda raw: check_outcome(raw, tmp_path)))()
    dumped = job_objects.map(lambda o: json.dumps(o).encode())
    SLOW(given(st.binary(max_size=2000) | dumped)(lambda data: check_bytes(data, tmp_path)))()
