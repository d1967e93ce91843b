"""The job file: the seed's body is valid verbatim; every bad input gets a message that says
what was received, what was expected, and (for unknown keys) the closest valid key."""
import json
from pathlib import Path

import pytest

from daemon import spec
from daemon.errors import BadJobFile


def errors_of(raw) -> list[str]:
    with pytest.raises(BadJobFile) as err:
        spec.validate(raw) if isinstance(raw, dict) else spec.validate(spec.parse_job_bytes(raw))
    return err.value.errors


def minimal(**extra) -> dict:
    return {"train_data_path": "data/train.csv", "target_column": "target"} | extra


def test_the_seed_request_body_is_valid_verbatim():
    s = spec.validate(spec.example_job())
    assert s.epochs == 100 and s.algorithm_params.hidden_units == [128, 64, 32]
    assert s.algorithm_params.learning_rate_scheduler.name == "step"


@pytest.mark.parametrize("optimizer", [
    {"name": "adam", "betas": [0.8, 0.99], "eps": 1e-7, "weight_decay": 0.01},
    {"name": "adamw", "betas": [0.9, 0.95], "eps": 1e-6, "weight_decay": 0.1},
    {"name": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"name": "rmsprop", "momentum": 0.5, "eps": 1e-6, "weight_decay": 0.0},
])
def test_each_optimizer_takes_the_parameters_it_uses(optimizer):
    assert spec.validate(minimal(optimizer=optimizer)).optimizer.name == optimizer["name"]


@pytest.mark.parametrize("extra, notes", [
    ({"algorithm_params": {"model_type": "linear", "hidden_units": [64], "dropout_rate": 0.2}},
     ['algorithm_params.hidden_units [64] is ignored: model_type "linear" has no hidden layers',
      'algorithm_params.dropout_rate 0.2 is ignored: model_type "linear" has no hidden layers']),
    ({"algorithm_params": {"model_type": "linear", "batch_norm": True}}, ["algorithm_params.batch_norm true"]),
    ({"optimizer": {"name": "adam", "momentum": 0.9}},
     ['optimizer.momentum 0.9 is ignored: "adam" does not use it (only "sgd" or "rmsprop" do, and '
      "Adam's momentum is its first beta"]),
    ({"optimizer": {"name": "sgd", "betas": [0.9, 0.99]}}, ['optimizer.betas [0.9, 0.99] is ignored: "sgd"']),
    ({"optimizer": {"name": "sgd", "eps": 1e-7}}, ['(only "adam", "adamw" or "rmsprop" do)']),
    ({"optimizer": {"name": "rmsprop", "momentum": 0.5, "nesterov": False}}, ["optimizer.nesterov false"]),
    ({"data": {"chunk_rows": 1000, "shuffle_chunks": 8}},
     ["data.chunk_rows 1000 is ignored: it sets streaming's order and memory",
      "data.shuffle_chunks 8 is ignored"]),
    # what matches what happens anyway is no news
    ({"algorithm_params": {"model_type": "linear", "hidden_units": [], "dropout_rate": 0.0,
                           "batch_norm": False}}, []),
    ({"algorithm_params": {"model_type": "mlp", "hidden_units": []}}, []),
    ({"data": {"streaming": True, "chunk_rows": 1000, "shuffle_chunks": 8}}, []),
    ({"optimizer": {"name": "sgd", "momentum": 0.9, "nesterov": True}}, []),
])
def test_settings_the_job_does_not_use_are_accepted_with_a_note(extra, notes):
    """Switching model_type, optimizer.name or data.streaming while leaving the rest as it was
    is a natural edit: such a file is valid, and what it sets in vain is noted."""
    found = spec.ignored_settings(spec.validate(minimal(**extra)))
    assert len(found) == len(notes) and all(n in f for n, f in zip(notes, found)), found


def test_defaults_are_filled_and_the_seeds_short_forms_moved(tmp_path):
    n = spec.normalise(spec.validate(spec.example_job()), job_id="j", base_dir=tmp_path,
                       spool_root=tmp_path / "spool", allow_roots=[])
    assert n["framework"] == "pytorch" and n["task"] == "auto" and n["seed"] == 42
    assert n["early_stopping"]["patience"] == 10 and n["early_stopping"]["monitor"] == "val_loss"
    assert n["learning_rate_scheduler"] == {"name": "step", "step_size": 30, "gamma": 0.1}
    assert n["algorithm_params"]["early_stopping_patience"] is None
    assert n["checkpoint"] == {"every_epochs": 1, "every_seconds": None, "keep_last": 3, "keep_best": True}
    assert n["optimizer"]["name"] == "adam" and n["optimizer"]["weight_decay"] == 0.0
    n2 = spec.normalise(spec.validate(minimal(optimizer="adamw")), job_id="j", base_dir=tmp_path,
                        spool_root=tmp_path / "spool", allow_roots=[])
    assert n2["optimizer"]["weight_decay"] == 0.01 and n2["name"] == "j"
    assert n2["learning_rate_scheduler"] == {"name": "none"}


@pytest.mark.parametrize("raw, needles", [
    (minimal(epoch=10), ['unknown key "epoch"', 'Did you mean "epochs"?']),
    (minimal(bach_size=10), ['Did you mean "batch_size"?']),
    # nearer by letters to "val_data_path", but the file lacks the required "train_data_path"
    ({"data_path": "d.csv", "target_column": "t"}, ['unknown key "data_path". Did you mean "train_data_path"?']),
    (minimal(algorithm_params={"hiden_units": [4]}), ['"algorithm_params.hiden_units"', '"hidden_units"']),
    (minimal(learning_rate_scheduler={"name": "step", "gama": 0.5}), ['Did you mean "gamma"?']),
    (minimal(early_stopping={"patiense": 3}), ['Did you mean "patience"?']),
    (minimal(epochs="ten"), ['"epochs"', 'Received: "ten"', "Expected: a whole number in [1, 1000000]"]),
    (minimal(epochs=0), ['"epochs"', "Received: 0"]),
    (minimal(epochs=2.5), ['"epochs"', "Received: 2.5"]),
    (minimal(batch_size=True), ['"batch_size"', "Received: true"]),
    (minimal(learning_rate=-1), ['"learning_rate"', "Received: -1", "Expected: a number in (0, 10]"]),
    (minimal(learning_rate="0.01"), ['"learning_rate"', 'Received: "0.01"']),
    (minimal(validation_split=1.5), ['"validation_split"', "Received: 1.5"]),
    (minimal(feature_columns=[]), ['"feature_columns"', "Received: []"]),
    (minimal(feature_columns="a,b"), ['"feature_columns"', 'Received: "a,b"']),
    (minimal(algorithm_params={"model_type": "transformer"}), ['"algorithm_params.model_type"', '"transformer"', '"mlp"']),
    (minimal(algorithm_params={"hidden_units": [8, 0]}), ['"algorithm_params.hidden_units[1]"', "Received: 0"]),
    (minimal(algorithm_params={"dropout_rate": 1.0}), ['"algorithm_params.dropout_rate"']),
    (minimal(algorithm_params={"activation": "swish"}), ['"algorithm_params.activation"', '"swish"']),
    (minimal(learning_rate_scheduler="stepp"), ['unknown schedule', 'Received: "stepp"', 'Did you mean "step"?']),
    (minimal(learning_rate_scheduler={"name": "multistep", "milestones": [5, 3]}), ["strictly increasing"]),
    (minimal(optimizer="adamx"), ['"optimizer.name"', 'Received: "adamx"']),
    (minimal(early_stopping={"monitor": "val_los"}), ['"early_stopping.monitor"', "unknown metric"]),
    (minimal(framework="jax"), ['"framework"', '"jax"']),
    (minimal(algorithm_type="random_forest"), ['"algorithm_type"', '"deep_learning"']),
    (minimal(task="clustering"), ['"task"']),
    (minimal(devices=[0, 1]), ['devices asks for 2 GPUs', '"processes": 2', '"replicas": 2']),
    (minimal(devices=3), ['devices asks for 3 GPUs', 'trains on one']),
    (minimal(devices=[]), ['"devices"', "an empty list"]),
    (minimal(devices=[1, 1]), ['"devices"', "more than once"]),
    (minimal(devices=65), ['"devices"', "Received: 65"]),
    (minimal(devices="gpu"), ['"devices"', 'Received: "gpu"']),
    (minimal(devices="cuda:x"), ['"devices"', 'Received: "cuda:x"', '"cuda:N"']),
    (minimal(devices="cuda:0,1"), ['"devices"', 'Received: "cuda:0,1"']),
    (minimal(devices=[0, 1], distributed={"processes": 3}), ["devices names 2 GPU(s) but distributed.processes is 3"]),
    (minimal(devices=4, distributed={"strategy": "mirrored", "replicas": 2}, framework="tf"),
     ["devices names 4 GPU(s) but distributed.replicas is 2"]),
    (minimal(distributed={"strategy": "horovod"}), ['"distributed.strategy"', 'Received: "horovod"']),
    (minimal(distributed={"processes": 0}), ['"distributed.processes"', "Received: 0"]),
    (minimal(distributed={"backend": "nccl"}), ['"nccl" runs between GPUs']),
    (minimal(distributed={"backend": "mpi"}), ['"distributed.backend"', 'Received: "mpi"']),
    (minimal(distributed={"process": 2}), ['"distributed.process"', 'Did you mean "processes"?']),
    (minimal(distributed={}, framework="tensorflow"), ['a tensorflow job uses {"strategy": "mirrored"']),
    (minimal(distributed={"strategy": "mirrored"}), ['a pytorch job uses {"strategy": "ddp"']),
    (minimal(distributed={"strategy": "mirrored", "processes": 2}, framework="tf"), ['give "replicas"']),
    (minimal(distributed={"replicas": 2}), ['DDP gives "processes"']),
    (minimal(distributed={"strategy": "mirrored", "replicas": 0}, framework="tf"), ['"distributed.replicas"', "Received: 0"]),
    (minimal(distributed={}, devices="cuda"), ["devices names 1 GPU(s) but distributed.processes is 2"]),
    (minimal(distributed={"nnodes": 2}), ['needs distributed.rdzv_endpoint']),
    (minimal(distributed={"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "a:1"}), ["node_rank in [0, 1]"]),
    (minimal(distributed={"nnodes": 2, "rdzv_endpoint": "10.0.0.1"}), ['"distributed.rdzv_endpoint"']),
    (minimal(distributed={"nnodes": 2, "rdzv_endpoint": "h:70000"}), ["no valid port"]),
    (minimal(distributed={"nnodes": 2, "rdzv_endpoint": "h:1", "strategy": "mirrored"}, framework="tf"),
     ['"mirrored" on 2 machines needs distributed.workers', 'rdzv_endpoint is for "ddp"']),
    (minimal(distributed={"workers": ["a:1", "b:1"]}), ['distributed.workers is for "mirrored"']),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "b:1"], "nnodes": 3}, framework="tf"),
     ["nnodes is 3 but distributed.workers names 2 machines"]),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "a:1"]}, framework="tf"),
     ["names an address more than once"]),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1"]}, framework="tf"),
     ['"distributed.workers"', 'Received: ["a:1"]']),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "b"]}, framework="tf"),
     ['"distributed.workers[1]"', 'Received: "b"']),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "b:0"]}, framework="tf"), ["no valid port"]),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "b:1"], "replicas": 2}, framework="tf"),
     ["one replica on each machine's CPU", "replicas 1"]),
    (minimal(distributed={"strategy": "mirrored", "workers": ["a:1", "b:1"], "node_rank": 2}, framework="tf"),
     ["spans 2 machine(s)", "node_rank in [0, 1]"]),
    (minimal(devices=2, distributed={"strategy": "mirrored", "workers": ["a:1", "b:1"], "replicas": 1}, framework="tf"),
     ["devices names 2 GPU(s) but distributed.replicas is 1"]),
    (minimal(data={"streaming": "yes"}), ['"data.streaming"', 'Received: "yes"']),
    (minimal(data={"chunk_rows": 0}), ['"data.chunk_rows"', "Received: 0"]),
    (minimal(data={"shuffle_chunk": 2}), ['"data.shuffle_chunk"', 'Did you mean "shuffle_chunks"?']),
    (minimal(gradient_accumulation_steps=0), ['"gradient_accumulation_steps"', "Received: 0", "[1, 4096]"]),
    (minimal(gradient_accumulation_steps=2.5), ['"gradient_accumulation_steps"', "Received: 2.5"]),
    (minimal(mixed_precision="fp8"), ['"mixed_precision"', '"fp8"']),
    (minimal(limits={"memory_mb": 10}), ['"limits.memory_mb"', "Received: 10", "megabytes in [64, 16777216]"]),
    (minimal(limits={"wall_seconds": 0}), ['"limits.wall_seconds"', "Received: 0"]),
    (minimal(limits={"wall_seconds": "1h"}), ['"limits.wall_seconds"', 'Received: "1h"']),
    (minimal(limits={"memory": 100}), ['"limits.memory"', 'Did you mean "memory_mb"?']),
    ({"target_column": "t"}, ['"train_data_path" is required', "Expected: path to a CSV"]),
    ({"train_data_path": "x"}, ['"target_column" is required']),
    (minimal(val_data_path="v.csv", validation_split=0.1),
     ["validation_split (0.1) are both given", "val_data_path or validation_split, not both"]),
    (minimal(feature_columns=["a", "a", "b"]), ['lists "a" more than once', "Expected: each column once"]),
    (minimal(feature_columns=["a", "target"]), ['target column "target" is also in feature_columns',
                                                 "Expected: the target out of the features"]),
    (minimal(feature_columns=["a"], categorical_columns=["c"]),
     ['categorical_columns names "c", which feature_columns does not list', "add them to feature_columns"]),
    (minimal(algorithm_params={"early_stopping_patience": 3}, early_stopping={"patience": 4}),
     ["early stopping is given twice", "early_stopping_patience 3", "Expected: one of them"]),
    (minimal(algorithm_params={"model_type": "resnet", "hidden_units": []}),
     ['hidden_units is [], but model_type "resnet"', "at least one width"]),
    (minimal(optimizer={"name": "sgd", "nesterov": True}),
     ["optimizer.nesterov is true but optimizer.momentum is 0", '"momentum": 0.9']),
    (minimal(algorithm_params={"learning_rate_scheduler": "step"}, learning_rate_scheduler="cosine"),
     ["the learning-rate schedule is given twice", "Expected: one of them"]),
    (minimal(validation_split=0, early_stopping={"monitor": "val_accuracy"}),
     ['early_stopping.monitor is "val_accuracy", but the job has no validation data',
      'a train_ metric such as "train_loss"']),
    (minimal(validation_split=0, learning_rate_scheduler={"name": "plateau", "monitor": "val_loss"}),
     ['learning_rate_scheduler.monitor is "val_loss", but the job has no validation data']),
])
def test_bad_fields_say_what_was_received_and_expected(raw, needles):
    message = "\n".join(errors_of(raw))
    for needle in needles:
        assert needle in message, message


def test_without_validation_data_the_policies_watch_the_training_loss(tmp_path):
    """The seed's early_stopping_patience (or a plateau schedule) with validation_split 0: the
    default monitor, val_loss, cannot be had, so train_loss is watched (it used to fail the
    job once its data was read). With validation data the default stays val_loss."""
    def normalised(**extra):
        return spec.normalise(spec.validate(spec.example_job() | extra), job_id="j", base_dir=tmp_path,
                              spool_root=tmp_path / "spool", allow_roots=[])
    n = normalised(validation_split=0, learning_rate_scheduler="plateau",
                   algorithm_params={"early_stopping_patience": 5})
    assert n["early_stopping"]["monitor"] == "train_loss" and n["learning_rate_scheduler"]["monitor"] == "train_loss"
    assert normalised(validation_split=0, algorithm_params={}, early_stopping={"monitor": "train_accuracy"})[
        "early_stopping"]["monitor"] == "train_accuracy"
    assert normalised()["early_stopping"]["monitor"] == "val_loss"
    assert normalised(val_data_path=str(tmp_path / "v.csv"))["early_stopping"]["monitor"] == "val_loss"


def test_every_problem_in_a_file_is_listed_at_once():
    errors = errors_of(minimal(epoch=3, batch_size="x", learning_rate=0, algorithm_params={"dropout": 0.1}))
    assert len(errors) == 4


@pytest.mark.parametrize("data, needle", [
    (b"", "the file is empty"),
    (b"   \n", "the file is empty"),
    (b"\xef\xbb\xbf{}", "byte-order mark"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b"{'epochs': 3}", "single quotes: JSON's keys and strings take double quotes"),
    (b'{"epochs": 3,}', "a comma before a closing brace or bracket: JSON allows none"),
    (b'{"epochs": 3, // three\n "seed": 1}', "a comment: JSON has none"),
    (b'{"epochs": 3 "seed": 1}', "(line 1, column 14):\n        {\"epochs\": 3 \"seed\": 1}\n"
                                  "                     ^\n    Expected: one JSON object; check for a missing comma"),
    (b'{"epochs": 3} trailing', "not valid JSON"),
    (b'{"learning_rate": NaN}', "NaN"),
    (b'{"learning_rate": Infinity}', "not valid JSON"),
    (b'{"epochs": 1, "epochs": 2}', 'the key "epochs" appears twice'),
    (b"[1, 2]", "holds a JSON list"),
    (b'"just a string"', "holds a JSON string, not an object"),
    (b"null", "holds a JSON null, not an object"),
    (b"42", "holds a JSON number, not an object"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"a":' * 40 + b"1" + b"}" * 40, "nested more than"),
    (b'{"epochs": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b" " * (spec.MAX_JOB_FILE_BYTES + 1), "bytes. Expected: a job file under"),
])
def test_malformed_bytes_are_rejected_with_a_reason(data, needle):
    assert needle in "\n".join(errors_of(data))


def test_a_trailing_comma_is_shown_on_its_own_line_with_a_caret_under_it():
    text = '{\n  "epochs": 3,\n\t"seed": 1,\n}\n'
    assert errors_of(text.encode()) == [
        "the file is not valid JSON: Expecting property name enclosed in double quotes (line 3, column 11):\n"
        '         "seed": 1,\n'
        "                  ^\n"
        "    Expected: one JSON object; a comma before a closing brace or bracket: JSON allows none; remove "
        "that comma."]


def test_huge_numbers_are_rejected_by_the_schema():
    assert '"epochs"' in "\n".join(errors_of(minimal(epochs=10**30)))
    assert '"learning_rate"' in "\n".join(errors_of(minimal(learning_rate=1e308)))


def test_aliases():
    assert spec.validate(minimal(framework="torch")).framework == "pytorch"
    for alias in ("tf", "TensorFlow", "keras"):
        assert spec.validate(minimal(framework=alias)).framework == "tensorflow"
    assert spec.validate(minimal(learning_rate_scheduler="ReduceLROnPlateau")).learning_rate_scheduler.name == "plateau"
    assert spec.validate(minimal(early_stopping={"monitor": "accuracy"})).early_stopping.monitor == "train_accuracy"
    assert spec.validate(minimal(devices="cuda:3")).devices == [3]  # torch's name for one GPU


@pytest.mark.parametrize("devices, replicas", [("cpu", 1), (2, 2)])
def test_mirrored_on_several_machines_counts_them_from_workers(tmp_path, devices, replicas):
    raw = minimal(framework="tf", devices=devices,
                  distributed={"strategy": "mirrored", "workers": ["a:1", "b:1", "c:1"], "node_rank": 2})
    n = spec.normalise(spec.validate(raw), job_id="j", base_dir=tmp_path, spool_root=tmp_path / "spool",
                       allow_roots=[tmp_path])
    assert n["distributed"]["nnodes"] == 3 and n["distributed"]["replicas"] == replicas
    one = spec.normalise(spec.validate(minimal(framework="tf", distributed={"strategy": "mirrored"})),
                         job_id="j", base_dir=tmp_path, spool_root=tmp_path / "spool", allow_roots=[tmp_path])
    assert one["distributed"]["nnodes"] == 1 and one["distributed"]["replicas"] == 2


def test_relative_paths_resolve_against_the_base_folder(tmp_path):
    n = spec.normalise(spec.validate(minimal(output_path="out/model")), job_id="j", base_dir=tmp_path,
                       spool_root=tmp_path / "spool", allow_roots=[])
    assert n["train_data_path"] == str(tmp_path / "data" / "train.csv")
    assert n["output_path"] == str(tmp_path / "out" / "model")


@pytest.mark.parametrize("key, value", [
    ("train_data_path", "/etc/passwd"),
    ("train_data_path", "../outside/data.csv"),
    ("output_path", "/tmp/elsewhere"),
    ("val_data_path", "allowed/../../outside.csv"),
])
def test_paths_outside_the_allowed_roots_are_refused(tmp_path, key, value):
    root = tmp_path / "allowed"
    root.mkdir()
    raw = {**minimal(train_data_path="allowed/train.csv"), key: value}
    with pytest.raises(BadJobFile) as err:
        spec.normalise(spec.validate(raw), job_id="j", base_dir=tmp_path, spool_root=tmp_path / "spool",
                       allow_roots=[root])
    assert f'"{key}" is outside the folders this daemon may use' in err.value.errors[0]
    assert "--allow-root" in err.value.errors[0]


def test_a_symlink_leading_out_of_the_allowed_roots_is_refused(tmp_path):
    root = tmp_path / "allowed"
    root.mkdir()
    (root / "sneaky").symlink_to("/etc")
    with pytest.raises(BadJobFile, match="resolves to /etc"):
        spec.normalise(spec.validate(minimal(train_data_path="allowed/sneaky/passwd")), job_id="j",
                       base_dir=tmp_path, spool_root=tmp_path / "spool", allow_roots=[root])


def test_output_inside_the_spool_is_refused(tmp_path):
    with pytest.raises(BadJobFile, match="points inside the spool"):
        spec.normalise(spec.validate(minimal(output_path="spool/jobs/other/model")), job_id="j",
                       base_dir=tmp_path, spool_root=tmp_path / "spool", allow_roots=[])


def test_spec_hash_ignores_key_order():
    a = {"b": 1, "a": [1, 2]}
    assert spec.spec_sha256(a) == spec.spec_sha256(json.loads(json.dumps(dict(reversed(a.items())))))


def test_the_example_job_files_are_valid():
    for path in Path(__file__).resolve().parent.parent.glob("examples/*.json"):
        spec.validate(spec.parse_job_bytes(path.read_bytes()))
