import json
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# A model small enough that a step takes milliseconds; the shape still has GQA and several layers. Pinned to the
# CPU (and so to fp32): the trainer would pick CUDA and bf16 on a GPU host, which these tests do not expect.
SMALL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-heads", "4",
         "--num-kv-heads", "2", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
         "--device", "cpu"]


def shard_blocks(p):
    """(index into this rank's shard `p`, index into the dense tensor) of the real (unpadded) part it holds."""
    from engine.parallel.layers import valid_slice
    _, offset, local = valid_slice(p)
    return tuple(slice(0, n) for n in local), tuple(slice(o, o + n) for o, n in zip(offset, local))


def pytest_configure(config):
    # The trainer tokenizes text --data into $XDG_CACHE_HOME/engine/tokens (--data-cache auto): the tests' own
    # directory, inherited by every process they launch, keeps the user's cache out of it.
    # torch builds C++/CUDA extensions under the same XDG directory: that one stays where it was.
    from torch.utils.cpp_extension import get_default_build_root
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="engine-tests-cache-")
    config.addinivalue_line("markers", "e2e: slow multi-process training runs (torchrun launches or spawned trainer "
                                       "pools); `-m 'not e2e'` leaves them out for a quick pass")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ["XDG_CACHE_HOME"], ignore_errors=True)


def write_corpus(root) -> str:
    """Fills the directory `root` with a small corpus of real text (a slice of the standard library's sources)."""
    from engine.data.datasets import stdlib_sources
    for i, path in enumerate(stdlib_sources()[:40]):
        with open(path, "rb") as src, open(os.path.join(root, f"doc{i:03d}.py"), "wb") as dst:
            dst.write(src.read())
    return str(root)


@pytest.fixture
def corpus(tmp_path):
    """A small directory of real text for one test."""
    (tmp_path / "corpus").mkdir()
    return write_corpus(tmp_path / "corpus")


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """The same corpus, shared by a module's tests."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def read_metrics(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def step_losses(path):
    """{step: loss} of the step lines (a later line for the same step wins, as after a rollback)."""
    return {r["step"]: r["loss"] for r in read_metrics(path) if "event" not in r}


def traced(path) -> tuple[list[int], int]:
    """(the steps, ascending, of the `train step N` ranges in a --profile-steps Chrome trace; how many allocation
    events it holds)."""
    events = json.load(open(path))["traceEvents"]
    steps = sorted(int(e["name"].split()[-1]) for e in events if e.get("name", "").startswith("train step "))
    return steps, sum(e.get("name") == "[memory]" for e in events)


def trajectory(path, keys=("loss", "grad_norm")):
    """{(step, key): value} of the step lines, and (step, "eval_loss") of the eval events: what two runs that
    should train identically are compared on (a later line for the same step wins, as after a rollback)."""
    out = {}
    for r in read_metrics(path):
        if r.get("event") == "eval":
            out[(r["step"], "eval_loss")] = r["eval_loss"]
        elif "event" not in r:
            out.update({(r["step"], k): r[k] for k in keys})
    return out
