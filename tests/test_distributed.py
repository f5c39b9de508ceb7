"""torchrun: two processes (CPU, gloo) give what one process gives, with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--pretrain-steps", "15", "--steps", "4", "--images-per-round", "6", "--fresh-images",
         "--eval-images", "4", "--sample-seeds", "1", "--batch-size", "8", "--eval-batch-size", "8",
         "--checkpoint-every", "2", "--divergence", "reverse", "--no-progress"]


def train(out, cache, processes, *extra):
    env = dict(os.environ, XDG_CACHE_HOME=str(cache), OMP_NUM_THREADS="1")
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    done = subprocess.run(launcher + ["train.py", *FLAGS, "--out", str(out), *extra], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    one = train(root / "one", root / "cache", 1)
    two = train(root / "two", root / "cache", 2)
    return root, one, two


def test_two_processes_give_the_adapter_examples_and_answers_of_one(runs):
    from safetensors.torch import load_file

    root, _, _ = runs
    one, two = root / "one" / "seed_reverse", root / "two" / "seed_reverse"
    a, b = load_file(one / "round0" / "adapter.safetensors"), load_file(
        two / "round0" / "adapter.safetensors")
    assert sorted(a) == sorted(b)
    for name in a:
        # float rounding only: the gradients are summed over the processes in another order
        assert float((b[name] - a[name]).norm() / a[name].norm()) <= 1e-5, name
    # B has moved from zero
    assert all(float(t.abs().sum()) > 0 for n, t in a.items() if n.endswith(".B"))
    # round 0's examples, of the base model: the same file
    assert ((root / "one" / "base" / "examples.jsonl").read_bytes()
            == (root / "two" / "base" / "examples.jsonl").read_bytes())
    # round 1's, on fresh images, by models merged from adapters equal to float rounding: the same
    # prompts and answers
    answers = lambda path: [(r["kind"], r["image"], r["prompt"], r["response"])  # noqa: E731
                            for r in map(json.loads, path.read_text().splitlines())]
    assert answers(one / "round1" / "examples.jsonl") == answers(two / "round1" / "examples.jsonl")
    for method in ("base", "vcd", "seed_reverse"):
        names = sorted(os.listdir(root / "one" / method / "answers"))
        assert names == sorted(os.listdir(root / "two" / method / "answers")) and names
        for name in names:  # written once, by process 0, in one process's order
            assert ((root / "one" / method / "answers" / name).read_bytes()
                    == (root / "two" / method / "answers" / name).read_bytes()), (method, name)
    first, second = (json.loads((root / r / "results.json").read_text()) for r in ("one", "two"))
    for method in ("base", "vcd", "seed_reverse"):
        for decoding in ("greedy", "sample"):
            assert first[method][decoding] == second[method][decoding], (method, decoding)
        # CHAIR, split by batches
        assert first[method]["captions"] == second[method]["captions"], method
    # sums over processes: float rounding
    for figure in ("final_loss", "void_mass", "void_mass_at_start"):
        assert second["seed_reverse"][figure][0] == pytest.approx(first["seed_reverse"][figure][0],
                                                                  rel=1e-5)


def test_two_processes_train_from_the_online_teacher_as_one(runs):
    """--teacher online: the distortion drawn for the whole batch, each process its rows; one
    process's adapter. (The runs above train from the recorded teacher, the default: each process
    takes its rows' positions.)"""
    from safetensors.torch import load_file

    root, _, _ = runs
    for name, processes in (("online1", 1), ("online2", 2)):
        train(root / name, root / "cache", processes, "--teacher", "online")
    a, b = (load_file(root / name / "seed_reverse" / "round0" / "adapter.safetensors")
            for name in ("online1", "online2"))
    assert all(float((b[n] - a[n]).norm() / a[n].norm()) <= 1e-5 for n in a if n.endswith(".B"))
    recorded = load_file(root / "one" / "seed_reverse" / "round0" / "adapter.safetensors")
    # another teacher's noise
    assert any(not torch.allclose(a[n], recorded[n]) for n in a if n.endswith(".B"))
    first, second = (json.loads((root / name / "results.json").read_text())
                     for name in ("online1", "online2"))
    assert first["seed_reverse"]["greedy"] == second["seed_reverse"]["greedy"]


def test_two_processes_in_micro_batches_train_as_one_process_on_the_whole_batch(runs):
    """--micro-batch-size 2 under two processes: each splits its 4 rows of the global batch of 8
    into two micro-batches; the adapter is the one-process whole-batch one (float rounding)."""
    from safetensors.torch import load_file

    root, _, _ = runs
    train(root / "micro", root / "cache", 2, "--micro-batch-size", "2")
    for r in ("round0", "round1"):
        a = load_file(root / "one" / "seed_reverse" / r / "adapter.safetensors")
        b = load_file(root / "micro" / "seed_reverse" / r / "adapter.safetensors")
        assert all(float((b[n] - a[n]).norm() / a[n].norm()) <= 1e-5 for n in a), r


def test_only_process_zero_prints(runs):
    _, one, two = runs
    assert two.stdout.count("SEED reverse KL") == one.stdout.count("SEED reverse KL") == 1
    assert "2 process(es)" in two.stdout and "1 process(es)" in one.stdout


def test_a_resumed_two_process_run_redoes_nothing_and_ends_the_same(runs):
    root, _, _ = runs
    before = json.loads((root / "two" / "results.json").read_text())
    stamps = {p: os.stat(p).st_mtime_ns
              for p in (root / "two" / "seed_reverse" / "round0").iterdir() if p.is_file()}
    train(root / "two", root / "cache", 2, "--resume")
    after = json.loads((root / "two" / "results.json").read_text())
    for method in ("base", "vcd", "seed_reverse"):
        assert after[method]["greedy"] == before[method]["greedy"]
    # the finished round was replayed, not rewritten
    assert {p: os.stat(p).st_mtime_ns for p in stamps} == stamps


FAILING_PROCESS = """# train.py, but its second process fails when it reads one photo (the fault is
# injected, since train.py itself reads every photo once before it starts)
import os, sys
sys.path.insert(0, {root!r})
import decode, train
import models
real_open_image = models.open_image
def open_image(image):
    if os.environ["RANK"] == "1" and str(image).endswith({broken!r}):
        raise ValueError(f"{{image}}: cannot read the image (injected)")
    return real_open_image(image)
models.open_image = open_image
train.main(sys.argv[1:])
"""


def test_a_process_that_fails_takes_the_job_down_with_its_message(tmp_path):
    """A photo that the second process cannot read, in its share: the job ends (no hang) and says
    why."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import replica

    paths = replica.build(str(tmp_path), unlabeled=4, pope_images=2, questions_per_image=2)
    # the last of the first chunk: process 1 decodes it
    broken = sorted(os.listdir(paths["train2014"]))[3]
    script = tmp_path / "failing_train.py"
    script.write_text(FAILING_PROCESS.format(root=ROOT, broken=broken))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(script), "--model",
                           paths["llava-1.5-7b-replica"], "--images", paths["train2014"], "--pope",
                           paths["pope"], "--pope-images", paths["val2014"], "--out",
                           str(tmp_path / "out"), "--divergence", "reverse", "--steps", "1",
                           "--batch-size", "2", "--probes-per-image", "1", "--description-tokens",
                           "2", "--sample-seeds", "1", "--no-progress", "--dist-timeout", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert f"{broken}: cannot read the image (injected)" in done.stderr
