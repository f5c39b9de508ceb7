"""Nothing overwritten, nothing deleted, one run per output, and a resume after kill -9 that gives
the uninterrupted results.json: each case as a user meets it, refused in one line before any work
(or done right)."""
import json
import os
import struct
import subprocess
import sys
import zlib

import pytest

import eval_pope
import replica
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--pretrain-steps", "15", "--steps", "4", "--images-per-round", "6", "--eval-images", "4",
        "--sample-seeds", "1", "--batch-size", "4", "--probes-per-image", "2",
        "--description-tokens", "4", "--checkpoint-every", "1", "--no-progress"]


def run(args, cwd=ROOT, env=None, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """{"XDG_CACHE_HOME": a cache holding the tiny world TINY pretrains}, built once: the runs
    below then write only what a run writes."""
    folder = tmp_path_factory.mktemp("cache")
    env = {"XDG_CACHE_HOME": str(folder)}
    built = run(["-c", "import toyworld; toyworld.build(toyworld.WorldConfig(steps=15), "
                       "progress=False); toyworld.eval_set(4, toyworld.make_world(0), "
                       "toyworld.WorldConfig(steps=15))"], env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    return env


def refused(done, *says):
    """Exit status 2, one line on stderr, saying each of `says`."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    for text in says:
        assert text in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# convert_internvl2.py never deletes its source, nor an existing folder unasked

@pytest.mark.parametrize("where", ["src itself", "holds src", "inside src"])
def test_the_converter_refuses_a_destination_that_would_delete_its_source(tmp_path, where):
    holder = tmp_path / "out" / "c02"
    src = holder / "src"
    src.mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    dst = {"src itself": src, "holds src": holder, "inside src": src / "hf"}[where]
    done = run(["convert_internvl2.py", src, dst, "--overwrite"])
    refused(done, "choose a folder outside")
    assert (src / "model.safetensors").read_bytes() == b"weights"


def test_the_converter_refuses_an_existing_destination_without_overwrite(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "config.json").write_text("{}")
    dst.mkdir()
    (dst / "mine.txt").write_text("keep")
    refused(run(["convert_internvl2.py", src, dst]), f"dst {dst} exists: --overwrite replaces it")
    assert (dst / "mine.txt").read_text() == "keep"
    refused(run(["convert_internvl2.py", tmp_path / "nothing", dst]), "no config.json")


# ---------------------------------------------------------------------------------------------
# One writer an output

def test_a_second_train_run_on_an_out_in_use_is_refused_naming_the_process(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    held = runs.claim(str(out))  # as a run in progress holds it
    try:
        line = refused(run(["train.py", *TINY, "--out", out]),
                       f"is being written by another process (pid {os.getpid()})")
        assert "--out" in line
    finally:
        held.close()
    assert not (out / "run.json").exists()


def test_a_second_pope_answer_on_one_file_is_refused_naming_the_process(tmp_path, llava,
                                                                       processor):
    from PIL import Image

    llava.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "images" / "a.png")
    eval_pope.write_jsonl([{"question_id": 1, "image": "a.png",
                            "text": "Is there a cat in the image?", "label": "yes"}],
                          tmp_path / "q.json")
    out = tmp_path / "answers.jsonl"
    flags = ["eval_pope.py", "answer", "--model", tmp_path / "model", "--questions",
             tmp_path / "q.json", "--images", tmp_path / "images", "--out", out, "--device", "cpu",
             "--max-new-tokens", "2"]
    held = runs.claim(str(out))
    try:
        refused(run(flags), f"(pid {os.getpid()})")
    finally:
        held.close()
    assert run(flags).returncode == 0  # free again: the kernel dropped the claim with its holder
    assert len(out.read_text().splitlines()) == 1


def test_a_killed_holder_leaves_no_stale_claim(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", f"import sys, time; sys.path.insert(0, "
                               f"{ROOT!r}); import runs; runs.claim({str(out)!r}); "
                               f"print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(runs.InUse, match=f"pid {holder.pid}"):
        runs.claim(str(out))
    holder.kill()
    holder.wait()
    runs.claim(str(out)).close()


# ---------------------------------------------------------------------------------------------
# eval_pope.py build and score

def test_build_refuses_to_overwrite_question_files(tmp_path):
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps({f"{i}.jpg": ["cat", "dog", "cup", "key"][: 2 + i % 3]
                                   for i in range(12)} | {"x.jpg": ["hat"]}))
    folder = tmp_path / "pope"
    folder.mkdir()
    official = folder / "coco_pope_random.json"
    official.write_text('{"question_id": 1}\n')
    flags = ["eval_pope.py", "build", "--objects", objects, "--per-image", 1, "--prefix", "coco",
             "--out", folder]
    refused(run(flags), "coco_pope_random.json exists", "--overwrite")
    assert official.read_text() == '{"question_id": 1}\n'
    assert run(flags + ["--overwrite"]).returncode == 0
    assert official.read_text() != '{"question_id": 1}\n'


def test_score_keeps_a_row_for_each_answer_file_even_with_one_name(tmp_path):
    questions = [{"question_id": i, "image": "a.png", "text": "Is there a cat in the image?",
                  "label": "yes" if i % 2 else "no"} for i in range(1, 5)]
    eval_pope.write_jsonl(questions, tmp_path / "q.json")
    for row, texts in (("base", ["Yes"] * 4), ("seed_reverse", ["Yes", "No", "Yes", "No"])):
        (tmp_path / row).mkdir()
        eval_pope.write_jsonl([{"question_id": i, "text": t} for i, t in zip(range(1, 5), texts)],
                              tmp_path / row / "greedy_random_seed0.jsonl")
    done = run(["eval_pope.py", "score", "--questions", tmp_path / "q.json", tmp_path / "q.json",
                "--answers", tmp_path / "base" / "greedy_random_seed0.jsonl",
                tmp_path / "seed_reverse" / "greedy_random_seed0.jsonl"])
    assert done.returncode == 0, done.stderr
    rows = done.stdout.strip().splitlines()[1:]
    assert len(rows) == 2 and "base" in rows[0] and "seed_reverse" in rows[1]


# ---------------------------------------------------------------------------------------------
# Inputs that cannot work, refused before any work

def bomb_png(path, side=20_000):
    """A PNG whose header says side x side pixels (more than PIL's decompression-bomb limit):
    PIL refuses it at open, as it would a real one."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 8)) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return root, replica.build(str(root), unlabeled=4, pope_images=2, questions_per_image=2)


def real_flags(paths, out):
    return ["train.py", "--model", paths["llava-1.5-7b-replica"], "--images", paths["train2014"],
            "--pope", paths["pope"], "--pope-images", paths["val2014"], "--out", out,
            "--divergence", "reverse", "--steps", "1", "--batch-size", "2", "--probes-per-image",
            "1", "--description-tokens", "2", "--sample-seeds", "1", "--no-progress"]


def test_an_image_over_the_decompression_limit_is_refused_naming_it(real_folders, tmp_path):
    import shutil

    root, paths = real_folders
    images = tmp_path / "train2014"
    shutil.copytree(paths["train2014"], images)
    bomb_png(images / "COCO_train2014_000000000001.png")
    flags = real_flags({**paths, "train2014": str(images)}, tmp_path / "out")
    flags[flags.index("--images") + 1] = str(images)
    line = refused(run(flags + ["--images-per-round", "5"]), "COCO_train2014_000000000001.png")
    assert "decompression bomb" in line.lower()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("broken,says", [
    ("tokenizer", "cannot be loaded"),
    ("weights", "cannot be loaded"),
    ("text-only", "cannot be loaded"),
])
def test_a_model_folder_that_does_not_load_is_refused_before_anything_is_written(
        real_folders, tmp_path, broken, says):
    import shutil

    root, paths = real_folders
    model = tmp_path / "model"
    shutil.copytree(paths["llava-1.5-7b-replica"], model)
    if broken == "tokenizer":
        for name in os.listdir(model):
            if name.startswith("tokenizer"):
                os.remove(model / name)
    elif broken == "weights":
        data = (model / "model.safetensors").read_bytes()
        (model / "model.safetensors").write_bytes(data[:len(data) // 2])
    else:
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config["text_config"],
                                                       "model_type": "llama",
                                                       "architectures": ["LlamaForCausalLM"]}))
    flags = real_flags({**paths, "llava-1.5-7b-replica": str(model)}, tmp_path / "out")
    refused(run(flags), f"--model {model}: {says}")
    assert not (tmp_path / "out").exists()


def test_a_batch_larger_than_a_round_makes_is_refused_before_work(real_folders, tmp_path):
    _, paths = real_folders
    flags = real_flags(paths, tmp_path / "out")
    flags[flags.index("--batch-size") + 1] = "64"
    refused(run(flags), "--batch-size 64: a round makes at most 8 examples")
    toy = run(["train.py", *TINY, "--batch-size", "40", "--out", tmp_path / "toy"])
    refused(toy, "--batch-size 40: a round makes at most 18 examples")


@pytest.mark.parametrize("record,says", [
    ({"question_id": [1], "image": "x.jpg", "text": "Is there a cat?"},
     '"question_id" must be an integer'),
    ({"question_id": "1", "image": "x.jpg", "text": "Is there a cat?"},
     '"question_id" must be an integer'),
    ({"question_id": 1, "image": "x.jpg", "text": 7}, '"text" must be a string'),
    ({"question_id": 1, "image": None, "text": "Is there a cat?"}, '"image" must be a string'),
])
def test_pope_records_of_the_wrong_type_are_refused_naming_the_line(tmp_path, record, says):
    eval_pope.write_jsonl([{"question_id": 9, "image": "x.jpg", "text": "Is there a dog?"},
                           record], tmp_path / "q.json")
    with pytest.raises(ValueError, match=f"q.json:2: {says}"):
        eval_pope.load_questions(str(tmp_path / "q.json"))


# ---------------------------------------------------------------------------------------------
# Full disks and unwritable caches

def test_a_full_disk_stops_the_run_in_one_line_and_resume_finishes_it(tmp_path, cache):
    out = tmp_path / "out"
    # the file-size limit makes every write past 256 KB fail as a full disk does (EFBIG, where a
    # full disk says ENOSPC): here the merged model, the first large file
    limited = run(["-c", f"import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_FSIZE, "
                         f"(256 * 1024, resource.RLIM_INFINITY)); sys.argv = ['train.py'] + "
                         f"{[str(a) for a in TINY + ['--divergence', 'reverse', '--out', out]]!r}; "
                         f"runpy.run_path('train.py', run_name='__main__')"], env=cache)
    assert limited.returncode == 1, limited.stderr[-2000:]
    line = limited.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: cannot write ") and "--resume" in line
    leftovers = [p for p, _, names in os.walk(out) for n in names + [p] if ".tmp" in n]
    assert not leftovers
    resumed = run(["train.py", *TINY, "--divergence", "reverse", "--out", out, "--resume"],
                  env=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "seed_reverse" / "merged" / "model.safetensors").exists()


def test_an_unwritable_cache_is_one_line_naming_it(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    done = run(["train.py", *TINY, "--out", tmp_path / "out"],
               env={"XDG_CACHE_HOME": str(tmp_path / "file" / "cache")})
    line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "cannot write the toy world's cache" in line
    assert "XDG_CACHE_HOME" in line


# ---------------------------------------------------------------------------------------------
# Messages

def test_a_folder_given_for_a_file_says_so(tmp_path):
    (tmp_path / "answers").mkdir()
    eval_pope.write_jsonl([{"question_id": 1, "image": "a.png", "text": "Is there a cat?",
                            "label": "yes"}], tmp_path / "q.json")
    done = run(["eval_pope.py", "score", "--questions", tmp_path / "q.json", "--answers",
                tmp_path / "answers"])
    refused(done, "a folder, not a file")
    refused(run(["train.py", "--out", ""]), "--out is empty")


def test_bench_refuses_a_json_it_could_not_write_before_the_benchmark(tmp_path):
    refused(run(["bench.py", "--json", tmp_path]), "a folder, not a file")
    (tmp_path / "file").write_text("")
    refused(run(["bench.py", "--json", tmp_path / "file" / "b.json"]), "is a file")


# ---------------------------------------------------------------------------------------------
# kill -9 anywhere, then --resume: the uninterrupted run's results.json

KILLER = """# train.py, killed with SIGKILL (no handler runs) at the Nth call of a function
import os, signal, sys
sys.path.insert(0, {root!r})
import importlib
module_name, function, count = sys.argv.pop(1).split(":")
module = importlib.import_module(module_name)
real, calls = getattr(module, function), []
def killing(*args, **kwargs):
    calls.append(1)
    if len(calls) == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
setattr(module, function, killing)
import train
train.main(sys.argv[1:])
"""


def figures(results):
    """Every figure of a results.json but the timings (and the flags of the command itself)."""
    for row in results.values():
        if isinstance(row, dict):
            row.pop("seconds_per_answer", None)
    results.pop("config")
    return results


def test_kill_minus_nine_at_any_point_then_resume_gives_the_uninterrupted_results(tmp_path,
                                                                                 cache):
    whole = run(["train.py", *TINY, "--out", tmp_path / "whole"], env=cache)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(root=ROOT))
    out = tmp_path / "killed"
    # one run, killed again and again, each time a little further: while POPE answers are
    # appended, while round 0's examples are appended, between two checkpoints of a round, while
    # the merged model is written, before the rows are timed
    points = ["os:fsync:2", "os:fsync:9", "runs:save_checkpoint:3", "runs:write_merged:1",
              "report:time_rows:1"]
    for i, point in enumerate(points):
        done = run([killer, point, *TINY, "--out", out] + (["--resume"] if i else []), env=cache)
        assert done.returncode == -9, (point, done.stderr[-2000:])
    resumed = run(["train.py", *TINY, "--out", out, "--resume"], env=cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected = figures(json.loads((tmp_path / "whole" / "results.json").read_text()))
    assert figures(json.loads((out / "results.json").read_text())) == expected
    # and a resume of the finished run changes nothing
    again = run(["train.py", *TINY, "--out", out, "--resume"], env=cache)
    assert again.returncode == 0
    assert figures(json.loads((out / "results.json").read_text())) == expected
    assert not [p for p, _, names in os.walk(out) for n in names if n.endswith(".tmp")]
