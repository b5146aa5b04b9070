"""Saved models that are damaged, trained on another dataset, or caught by a kill mid-save.

Every damaged part of a real saved tiny model (dense and compressed) must end in a SavedModelError that names
the file and the job that rewrites it; a model trained on dataset A is refused for dataset B unless
allow_other_dataset; a directory save killed (SIGKILL, in a child process) at every step leaves the old or the
new model, and the next save or load cleans up.
"""

import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from odllm.compress.lowrank import LowRankLinear
from odllm.compress.pipeline import load_dense
from odllm.compress.saved import load_recommender, save_compression_config
from odllm.data.dataset import DatasetSource
from odllm.data.items import atomic_codes
from odllm.files import MARKER, recover_directory, write_directory_atomically
from odllm.model.backbone import BackboneSpec, build_model
from odllm.model.recommender import Recommender, SavedModelError

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}
ITEMS = [f"i{i}" for i in range(24)]


def tiny_recommender(meta: dict) -> Recommender:
    spec = BackboneSpec(source="scratch", path=None, finetune="full", tokenizer_vocab=300, config=TINY, lora={})
    torch.manual_seed(0)
    model, tok = build_model(spec, atomic_codes(ITEMS), ["The user has interacted with the following items."] * 5)
    return Recommender(model.eval(), tok, atomic_codes(ITEMS), meta)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, one_thread):
    """A dense and a compressed (one low-rank layer) tiny model, saved as train.py and compress.py save them."""
    root = tmp_path_factory.mktemp("saved")
    rec = tiny_recommender({"dataset": "toy", "item_tokens": "atomic"})
    rec.save(root / "dense")
    up = rec.model.model.layers[0].mlp.up_proj
    u, s, vh = torch.linalg.svd(up.weight.detach(), full_matrices=False)
    rec.model.model.layers[0].mlp.up_proj = LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8])
    compressed = Recommender(rec.model, rec.tokenizer, rec.item_codes,
                             {**rec.meta, "compression": {"method": "svd", "ratio": 0.5}})
    compressed.save(root / "compressed", extra=lambda d: save_compression_config(rec.model, d))
    return root


def truncate(name, keep=0.5):
    def damage(d):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[: int(len(data) * keep)])
    return damage


def remove(name):
    return lambda d: (d / name).unlink()


def write(name, text):
    return lambda d: (d / name).write_text(text)


def drop_weight(d):
    state = load_file(d / "model.safetensors")
    state.pop("model.layers.1.mlp.down_proj.weight")
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})


DENSE_DAMAGE = {
    "truncated weights": (truncate("model.safetensors"), "model.safetensors is damaged or incomplete"),
    "empty weights": (truncate("model.safetensors", 0), "model.safetensors is damaged or incomplete"),
    "weights missing": (remove("model.safetensors"), "model.safetensors is missing"),
    "a weight missing": (drop_weight, "lacks 1 weights .*down_proj"),
    "config.json cut": (truncate("config.json"), "config.json is damaged"),
    "config.json missing": (remove("config.json"), "config.json is missing"),
    "config.json no model_type": (write("config.json", "{}"), "config.json is damaged"),
    "tokenizer.json cut": (truncate("tokenizer.json"), "tokenizer.json is damaged"),
    "tokenizer.json missing": (remove("tokenizer.json"), "tokenizer.json is damaged or incomplete"),
    "tokenizer.json wrong": (write("tokenizer.json", '{"version": "1.0"}'), "tokenizer.json is damaged"),
    "tokenizer_config.json missing": (remove("tokenizer_config.json"), "tokenizer_config.json is missing"),
    "tokenizer_config.json cut": (truncate("tokenizer_config.json"), "tokenizer_config.json is damaged"),
    "generation_config.json cut": (truncate("generation_config.json"), "generation_config.json is damaged"),
    "item index cut": (truncate("item_index.json"), "item_index.json is not valid JSON"),
    "item index missing": (remove("item_index.json"), "item_index.json is missing"),
    "item index no codes": (write("item_index.json", '{"kind": "atomic"}'), "item_index.json is damaged"),
    "item index uneven": (write("item_index.json", '{"kind": "semantic", "codes": {"a": ["<x>"], "b": ["<x>", "<y"]}}'),
                          "item_index.json is damaged: every item code must have the same"),
    "item index blank id": (write("item_index.json", '{"kind": "atomic", "codes": {" ": ["<x>"]}}'),
                            "item_index.json is damaged: 1 items"),
    "odllm.json cut": (truncate("odllm.json"), "odllm.json is damaged"),
    "odllm.json missing": (remove("odllm.json"), "odllm.json is missing"),
    "odllm.json a list": (write("odllm.json", "[]"), "odllm.json must hold a JSON object"),
}
COMPRESSED_DAMAGE = {
    "compression.json cut": (truncate("compression.json"), "compression.json is damaged"),
    "compression.json a list": (write("compression.json", "[]"), "compression.json must map module names"),
    "compression.json unknown module": (write("compression.json", '{"model.nope": 8}'), "names 'model.nope'"),
    "compression.json unknown kind": (write("compression.json", '{"model.layers.0.mlp.up_proj": {"kind": "zip"}}'),
                                      "neither a rank nor a spec"),
    "compression.json wrong module": (write("compression.json", '{"model.layers.1.mlp.up_proj": 8}'),
                                      "does not match compression.json"),
    "compression.json missing": (remove("compression.json"), "lacks 1 weights .*up_proj.*needs its compression.json"),
    "truncated weights": (truncate("model.safetensors", 0.9), "model.safetensors is damaged or incomplete"),
}


CASES = [("dense", c) for c in DENSE_DAMAGE] + [("compressed", c) for c in COMPRESSED_DAMAGE]


@pytest.mark.parametrize("kind,case", CASES)
def test_damaged_saved_model_names_the_file_and_the_fix(saved, tmp_path, kind, case):
    damage, message = (DENSE_DAMAGE if kind == "dense" else COMPRESSED_DAMAGE)[case]
    directory = tmp_path / "m"
    shutil.copytree(saved / kind, directory)
    load_recommender(directory)  # intact, it loads
    damage(directory)
    with pytest.raises(SavedModelError, match=message) as e:
        load_recommender(directory)
    fix = "re-run compress.py" if kind == "compressed" else "re-run train.py"
    assert str(directory) in str(e.value) and fix in str(e.value)


def test_compressed_model_through_the_dense_loader_is_refused_not_mislabelled(saved):
    with pytest.raises(ValueError, match="holds a compressed model: load it with"):
        Recommender.load(saved / "compressed")


# --- provenance -------------------------------------------------------------------------------------------------

def write_csv(path: Path, users: int, items: list[str]) -> DatasetSource:
    rows = [f"u{u},{items[(u + t) % len(items)]},{t}" for u in range(users) for t in range(4)]
    lines = ["user,item,timestamp", *rows]
    path.write_text("\n".join(lines) + "\n")
    return DatasetSource(name=path.stem, format="csv", path=str(path))


def test_a_model_of_dataset_a_is_refused_for_dataset_b_unless_allowed(saved, tmp_path):
    other = write_csv(tmp_path / "other.csv", 6, ITEMS[:10])  # its items are a subset of the model's
    with pytest.raises(ValueError, match=r"trained on dataset 'toy'.*not on 'other'.*allow_other_dataset=true"):
        load_dense(saved / "dense", other, 20)
    with pytest.raises(ValueError, match="allow_other_dataset must be true or false"):
        load_dense(saved / "dense", other, 20, allow_other_dataset="yes")
    dense, split = load_dense(saved / "dense", other, 20, allow_other_dataset=True)
    # the compressed model is named after 'other': its odllm.json says so and keeps where the weights come from
    assert dense.meta["dataset"] == "other" and dense.meta["trained_on_dataset"] == "toy" and len(split.test) == 6
    same = write_csv(tmp_path / "toy.csv", 6, ITEMS[:10])
    assert load_dense(saved / "dense", same, 20)[0].meta["dataset"] == "toy"


def test_models_without_a_recorded_dataset_fall_back_to_item_coverage(saved, tmp_path):
    legacy = tmp_path / "legacy"
    shutil.copytree(saved / "dense", legacy)
    (legacy / "odllm.json").write_text(json.dumps({"item_tokens": "atomic"}))
    covered = write_csv(tmp_path / "covered.csv", 5, ITEMS[:6])
    assert load_dense(legacy, covered, 20)[0].meta.get("dataset") is None
    foreign = write_csv(tmp_path / "foreign.csv", 5, ["x1", "x2", "x3", "x4", "x5"])
    with pytest.raises(ValueError, match="not in the model's item index"):
        load_dense(legacy, foreign, 20)


def test_evaluate_checks_provenance(saved, tmp_path, tiny_run_overrides, one_thread):
    from conftest import compose_config

    from odllm.runner.evaluate import evaluate

    overrides = [*tiny_run_overrides, f"model_dir={saved / 'dense'}", "dataset.name=mine"]
    with pytest.raises(ValueError, match="trained on dataset 'toy'"):
        evaluate(compose_config(overrides), tmp_path / "out")
    assert not (tmp_path / "out" / "metrics.json").exists()
    payload = evaluate(compose_config([*overrides, "allow_other_dataset=true"]), tmp_path / "out")
    assert payload["dataset"] == "mine" and payload["model_dataset"] == "toy"
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["model_dataset"] == "toy"


# --- crash safety of directory saves ---------------------------------------------------------------------------

def write_version(text: str):
    def write(d: Path) -> None:
        d.mkdir()
        for name in ("a", "b", "c"):
            (d / name).write_text(text)
    return write


def state(target: Path) -> str:
    """'old' or 'new' when the target holds one whole version; anything else fails the test."""
    contents = {(target / n).read_text() for n in ("a", "b", "c")}
    assert len(contents) == 1, f"mixed directory: {contents}"
    return contents.pop()


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name != target.name)


CHILD = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import odllm.files as files
    target, function, nth, exchange = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    calls = [0]
    if function != "write":
        owner, name = (files, "_exchange") if function == "_exchange" else (os, function)
        original = getattr(owner, name)
        def killed_at_nth(*args, **kwargs):
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)  # a real kill: no finally, no except runs
            return original(*args, **kwargs)
        setattr(owner, name, killed_at_nth)
    if not exchange:
        files._exchange = lambda a, b: False  # the two-rename path of file systems without RENAME_EXCHANGE
    def write(d):
        d.mkdir()
        for n in ("a", "b", "c"):
            (d / n).write_text("new")
            if function == "write" and n == "b" and nth == 1:
                os.kill(os.getpid(), signal.SIGKILL)
    files.write_directory_atomically(target, write)
""")


def kill_points():
    """(function, nth call, exchange): every call of every step a save makes, on both swap paths."""
    points = [("write", 1, ex) for ex in (True, False)]
    points += [("_exchange", 1, True)]
    points += [(f, n, ex) for f in ("replace", "unlink", "rmdir") for n in range(1, 6) for ex in (True, False)]
    return points


@pytest.mark.parametrize("function,nth,exchange", kill_points())
def test_a_kill_at_any_step_leaves_old_or_new(tmp_path, function, nth, exchange):
    target = tmp_path / "model"
    write_directory_atomically(target, write_version("old"))
    run = subprocess.run([sys.executable, "-c", CHILD, str(target), function, str(nth), "1" if exchange else "0"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode in (0, -signal.SIGKILL), run.stderr
    if run.returncode == 0:
        assert state(target) == "new" and siblings(target) == []  # fewer calls than nth: the save finished
        return
    if not exchange and function == "replace" and nth == 2:  # killed between the two renames: no target yet
        assert not target.exists()
    recover_directory(target)  # what the next load does (Recommender.load); the next save does it too
    assert state(target) in ("old", "new") and siblings(target) == []
    if function == "write" or (function == "_exchange") or (function == "replace" and nth == 1):
        assert state(target) == "old"  # killed before the swap
    write_directory_atomically(target, write_version("newer"))
    assert state(target) == "newer" and siblings(target) == []


def test_kill_between_the_two_renames_is_restored_on_load(saved, tmp_path):
    """The worst instant without an exchange: the target is gone, old and new are complete copies beside it."""
    target = tmp_path / "dense"
    shutil.copytree(saved / "dense", target)
    new = tmp_path / ".dense.tmp-999999999-abcdef12"
    shutil.copytree(saved / "compressed", new)
    target.rename(tmp_path / ".dense.old-999999998-abcdef12")
    rec = load_recommender(target)  # restores the newer complete copy (the one the save had finished writing)
    assert rec.meta.get("compression") and siblings(target) == []


def test_failed_saves_roll_back_without_a_kill(tmp_path, monkeypatch):
    """An exception (disk full ...) at the second rename puts the old directory back at once."""
    import odllm.files as files

    target = tmp_path / "model"
    write_directory_atomically(target, write_version("old"))
    monkeypatch.setattr(files, "_exchange", lambda a, b: False)
    real, calls = files.os.replace, []

    def second_fails(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(files.os, "replace", second_fails)
    with pytest.raises(OSError, match="No space"):
        write_directory_atomically(target, write_version("new"))
    assert state(target) == "old" and siblings(target) == []


def test_leftovers_are_cleaned_but_live_saves_and_unverified_copies_are_kept(tmp_path):
    target = tmp_path / "m"
    write_directory_atomically(target, write_version("old"))
    dead_tmp = tmp_path / ".m.tmp-999999999-00000000"  # a kill mid-write: no marker
    write_version("half")(dead_tmp)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live_tmp = tmp_path / f".m.tmp-{live.pid}-11111111"  # another process saving right now
        write_version("other")(live_tmp)
        recover_directory(target)
        assert siblings(target) == [live_tmp.name] and state(target) == "old"
    finally:
        live.kill()
        live.wait()
    recover_directory(target)
    assert siblings(target) == []
    # an earlier odllm version's .old copy (no marker) with no target: kept, and named by the load error
    shutil.rmtree(target)
    legacy = tmp_path / ".m.old-2468ace0"
    write_version("old")(legacy)
    with pytest.raises(FileNotFoundError, match=r"\.m\.old-2468ace0 beside it .* rename it to m"):
        Recommender.load(target)
    assert legacy.exists()


def test_a_finished_save_carries_the_marker(tmp_path):
    target = tmp_path / "m"
    write_directory_atomically(target, write_version("v"))
    assert (target / MARKER).is_file() and json.loads((target / MARKER).read_text())["written"] > 0
