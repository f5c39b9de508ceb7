"""Bad inputs are refused in one line before any work, and resumed or appended files never mix
settings.

The decoding loop refuses the batches it would decode wrongly; every flag of the four scripts is
checked for range and finiteness; files are checked before the model loads; every file a run appends
to (POPE answers, SEED's examples log, the checkpoint, the run's own run.json) records what it was
made with, and a resume or append with anything different is refused, naming the setting.
"""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import decode
import eval_pope
import models
import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(args, cwd=ROOT, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line(done, message):
    """The command failed with exit code 2 and printed `message` on one line, nothing else."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert message in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


# ---------------------------------------------------------------------------------------------
# The decoding loop refuses what it would decode wrongly

def test_generate_refuses_right_padding_text_only_and_video_batches(llava, processor):
    images = [Image.new("RGB", (32, 32), (200, 40, 40)), Image.new("RGB", (32, 32), (40, 40, 200))]
    prompts = [models.chat_prompt(processor, "Is there a cat in the image?"),
               models.chat_prompt(processor, "Hi.")]
    right = processor(images=images, text=prompts, return_tensors="pt", padding=True,
                      padding_side="right")
    assert not bool(right["attention_mask"][:, -1].all())  # a row really ends in padding
    with pytest.raises(ValueError, match="a right-padded batch: pad on the left"):
        decode.generate(llava, right, 2)
    left = processor(images=images, text=prompts, return_tensors="pt", padding=True,
                     padding_side="left")
    assert len(decode.generate(llava, left, 2)) == 2  # the supported layout still decodes
    text_only = {k: v for k, v in left.items() if k != "pixel_values"}
    with pytest.raises(ValueError, match="a text-only batch"):
        decode.generate(llava, text_only, 2)
    video = {**text_only, "pixel_values_videos": torch.zeros(4, 3 * 2 * 8 * 8),
             "video_grid_thw": torch.ones(1, 3)}
    with pytest.raises(ValueError, match="video inputs are not supported"):
        decode.generate(llava, video, 2)


# ---------------------------------------------------------------------------------------------
# eval_pope.py: flags, question files, images and answers files, before any work

@pytest.fixture
def pope_setup(llava, processor, tmp_path):
    """A saved toy model, two images and a two-question file: the folders eval_pope.py answer
    takes."""
    llava.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    (tmp_path / "images").mkdir()
    for name, colour in (("a.png", (200, 40, 40)), ("b.png", (40, 40, 200))):
        Image.new("RGB", (32, 32), colour).save(tmp_path / "images" / name)
    questions = [{"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?",
                  "label": "yes"},
                 {"question_id": 2, "image": "b.png", "text": "Is there a dog in the image?",
                  "label": "no"}]
    eval_pope.write_jsonl(questions, tmp_path / "q.json")
    return tmp_path, ["answer", "--model", str(tmp_path / "model"), "--questions",
                      str(tmp_path / "q.json"), "--images", str(tmp_path / "images"), "--device",
                      "cpu", "--max-new-tokens", "2"]


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--beta", "1.5"], "--beta must be at most 1, got 1.5"),
    (["--noise-step", "1000"], "--noise-step must be at most 999, got 1000"),
    (["--device", "cuda:3"], "--device cuda:3: no such device here"),
])
def test_answer_flags_are_refused_before_the_model_loads(pope_setup, extra, message):
    tmp_path, answer = pope_setup
    one_line(cli(["eval_pope.py", *answer, "--out", str(tmp_path / "a.jsonl"), *extra]), message)
    assert not (tmp_path / "a.jsonl").exists()  # no empty answers file left behind


def test_answer_files_are_checked_before_the_model_loads(pope_setup):
    tmp_path, answer = pope_setup
    out = ["--out", str(tmp_path / "a.jsonl")]
    one_line(cli(["eval_pope.py", *answer, "--out", str(tmp_path / "images")]),
             f"--out {tmp_path / 'images'}: a folder, not a file")
    (tmp_path / "images" / "b.png").write_bytes(b"\x89PNG broken")
    one_line(cli(["eval_pope.py", *answer, *out]),
             f"q.json:2: cannot read image {tmp_path / 'images' / 'b.png'}")
    (tmp_path / "images" / "b.png").unlink()
    one_line(cli(["eval_pope.py", *answer, *out]), "q.json:2: image b.png is not in")
    assert not (tmp_path / "a.jsonl").exists()
    model = answer.index("--model") + 1
    one_line(cli(["eval_pope.py", *answer[:model], str(tmp_path), *answer[model + 1:], *out]),
             "not a local checkpoint folder")


def test_answers_made_with_another_decoding_are_refused_not_mixed(pope_setup):
    tmp_path, answer = pope_setup
    out = ["--out", str(tmp_path / "a.jsonl")]
    done = cli(["eval_pope.py", *answer, *out, "--decoding", "greedy"])
    assert done.returncode == 0, done.stderr
    before = (tmp_path / "a.jsonl").read_bytes()
    records = [json.loads(line) for line in before.splitlines()]
    assert all(r["made_with"]["decoding"] == "greedy" for r in records)
    for decoding in ("vcd-sample", "vcd"):  # "vcd": the former name of vcd-sample
        one_line(cli(["eval_pope.py", *answer, *out, "--decoding", decoding]),
                 "a.jsonl:1: made with --decoding 'greedy', but this run has 'vcd-sample'")
    one_line(cli(["eval_pope.py", *answer, *out, "--seed", "3"]),
             "made with --seed 0, but this run has 3")
    assert (tmp_path / "a.jsonl").read_bytes() == before  # untouched
    # the same settings: resumed, nothing new
    again = cli(["eval_pope.py", *answer, *out, "--decoding", "greedy"])
    assert again.returncode == 0 and (tmp_path / "a.jsonl").read_bytes() == before


def test_scoring_refuses_another_question_files_answers(pope_setup):
    tmp_path, answer = pope_setup
    assert cli(["eval_pope.py", *answer, "--out", str(tmp_path / "a.jsonl")]).returncode == 0
    other = [{"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?",
              "label": "yes"},
             {"question_id": 2, "image": "b.png", "text": "Is there a bus in the image?",
              "label": "no"}]
    eval_pope.write_jsonl(other, tmp_path / "popular.json")
    done = cli(["eval_pope.py", "score", "--questions", str(tmp_path / "popular.json"), "--answers",
                str(tmp_path / "a.jsonl")])
    one_line(done, "a.jsonl: made for a question file of sha256")
    # as from another tool
    for record in (records := [json.loads(l) for l in open(tmp_path / "a.jsonl")]):
        del record["made_with"]
    eval_pope.write_jsonl(records, tmp_path / "plain.jsonl")
    with pytest.raises(ValueError, match=r"question_id 2 answers 'Is there a dog in the "
                                         r"image\?.*', but .*popular.json:2 asks 'Is there a bus "
                                         r"in the image\?': another question file's answers"):
        eval_pope.score_files(str(tmp_path / "popular.json"), str(tmp_path / "plain.jsonl"))
    assert 0 <= eval_pope.score_files(str(tmp_path / "q.json"),
                                      str(tmp_path / "plain.jsonl"))["f1"] <= 1


@pytest.mark.parametrize("answers,message", [
    ('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "text": "No"}\n{"question_id": 1, '
     '"text": "No"}\n', "a.jsonl:3: a second answer to question_id 1 (the first on line 1)"),
    ('{"question_id": 1, "text": "Yes"}\n{"question_id": 2, "answer": "No"}\n',
     "a.jsonl:2: an answer needs a question_id and a \"text\" string"),
    ('{"question_id": 1, "text": "Yes"}\n[2, "No"]\n', "a.jsonl:2: a JSON list, not an object"),
    ('{"question_id": 1, "text": "Yes"}\n{"question_id": 7, "text": "No"}\n',
     "no answer for question_id 2 (1 missing); question_id 7 is not a question there (1 stray)"),
])
def test_score_refuses_bad_answers_files_naming_the_line(tmp_path, answers, message):
    eval_pope.write_jsonl([{"question_id": i, "image": "x.png",
                            "text": "Is there a cat in the image?",
                            "label": "yes"} for i in (1, 2)], tmp_path / "q.json")
    (tmp_path / "a.jsonl").write_text(answers)
    one_line(cli(["eval_pope.py", "score", "--questions", str(tmp_path / "q.json"), "--answers",
                  str(tmp_path / "a.jsonl")]), message)


def test_score_refuses_a_question_file_without_labels(tmp_path):
    eval_pope.write_jsonl([{"question_id": 1, "image": "x.png",
                            "text": "Is there a cat in the image?"}],
                          tmp_path / "q.json")
    (tmp_path / "a.jsonl").write_text('{"question_id": 1, "text": "Yes"}\n')
    one_line(cli(["eval_pope.py", "score", "--questions", str(tmp_path / "q.json"), "--answers",
                  str(tmp_path / "a.jsonl")]), "q.json:1: question_id 1 lacks ['label']")


@pytest.mark.parametrize("objects,extra,message", [
    ('{"a.jpg": ["cat", "dog"]', [],
     "objects.json:1:25: Expecting ',' delimiter (not a JSON file)"),
    ('["cat"]', [], "must map each image file name to a list of object names"),
    ('{"a.jpg": ["cat", "dog"]}', ["--per-image", "0"], "--per-image must be at least 1, got 0"),
    ('{"a.jpg": ["cat", "dog"]}', ["--per-image", "-2"], "--per-image must be at least 1, got -2"),
    ('{"a.jpg": ["cat", "dog"]}', ["--per-image", "3"],
     "no image has 3 objects and 3 absent ones: no questions"),
])
def test_build_refuses_bad_objects_and_counts(tmp_path, objects, extra, message):
    (tmp_path / "objects.json").write_text(objects)
    done = cli(["eval_pope.py", "build", "--objects", str(tmp_path / "objects.json"), "--out",
                str(tmp_path / "q"), *extra])
    one_line(done, message)
    assert not (tmp_path / "q").exists()  # no empty question files


# ---------------------------------------------------------------------------------------------
# train.py: --resume and reruns never mix settings; unreadable images; Ctrl-C

def toy_flags(tmp_path, *extra):
    return ["--out", str(tmp_path / "out"), "--no-progress", *extra]


def test_a_resume_with_other_settings_is_refused_naming_the_flag_and_both_values(tmp_path, capsys):
    import cli

    config = cli.parse_config(toy_flags(tmp_path, "--steps", "40"))
    cli.start_run(config, None)  # what a started run leaves: run.json with its settings
    recorded = json.loads((tmp_path / "out" / "run.json").read_text())["settings"]
    assert recorded["noise_step"] == 700 and recorded["lr"] == 5.7e-4 and recorded["steps"] == 40
    for flags, message in ((["--steps", "40", "--noise-step", "500"],
                            "was made with --noise-step 700, this run has 500"),
                           (["--steps", "40", "--lr", "0.05"],
                            "was made with --lr 0.00057, this run has 0.05"),
                           ([], "was made with --steps 40, this run has 600")):
        with pytest.raises(SystemExit):
            cli.parse_config(toy_flags(tmp_path, "--resume", *flags))
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    resumed = cli.parse_config(
        toy_flags(tmp_path, "--resume", "--steps", "40", "--eval-batch-size", "8"))
    assert resumed.eval_batch_size == 8  # a flag that changes no answer may change
    # so may the micro-batch and checkpointing of a run that stopped on an out-of-memory error
    resumed = cli.parse_config(toy_flags(tmp_path, "--resume", "--steps", "40",
                                         "--micro-batch-size", "2", "--gradient-checkpointing"))
    assert resumed.micro_batch_size == 2 and resumed.gradient_checkpointing


def test_a_fresh_run_over_an_earlier_one_is_refused_without_overwrite(tmp_path, capsys):
    import cli

    cli.start_run(cli.parse_config(toy_flags(tmp_path)), None)
    (tmp_path / "out" / "base" / "answers").mkdir(parents=True)
    (tmp_path / "out" / "base" / "answers" / "greedy_random_seed0.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit):
        cli.parse_config(toy_flags(tmp_path))
    error = capsys.readouterr().err
    assert ("holds an earlier run (run.json, base): --resume continues it, --overwrite replaces it"
            in error)
    config = cli.parse_config(toy_flags(tmp_path, "--overwrite", "--lr", "0.01"))
    cli.start_run(config, None)
    assert "--overwrite: replacing the earlier run" in capsys.readouterr().out
    assert not (tmp_path / "out" / "base").exists()
    assert json.loads((tmp_path / "out" / "run.json").read_text())["settings"]["lr"] == 0.01


def test_the_checkpoint_and_examples_log_refuse_other_settings(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "progress.json").write_text(json.dumps(
        {"round": 0, "step": 4, "scalars": {},
         "made_with": {"run": "aaaa", "divergence": "reverse"}}))
    assert runs.resume_point(str(tmp_path / "checkpoint"),
                             {"run": "aaaa", "divergence": "reverse"}) == (0, 4)
    with pytest.raises(ValueError,
                       match="written with the run's settings .* 'aaaa', this run has 'bbbb'"):
        runs.resume_point(str(tmp_path / "checkpoint"), {"run": "bbbb", "divergence": "reverse"})
    log = tmp_path / "examples.jsonl"
    log.write_text(json.dumps({"kind": "description", "image": 0, "prompt": "Describe.",
                               "response": [5], "made_with": {"noise_step": 700}}) + "\n")
    with pytest.raises(ValueError,
                       match=r"examples.jsonl:1: made with --noise-step 700, but this run has 500"):
        runs.read_examples_log(str(log), {"noise_step": 500})


def test_unreadable_images_stop_a_real_run_before_work_or_are_skipped(tmp_path, capsys):
    import cli

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (64, 48), (90, 20, 20)).save(tmp_path / "images" / name, quality=90)
    whole = (tmp_path / "images" / "b.jpg").read_bytes()
    # a truncated JPEG: its header reads
    (tmp_path / "images" / "b.jpg").write_bytes(whole[:len(whole) // 2])
    config = cli.Config(images=str(tmp_path / "images"), progress=False, images_per_round=3,
                        rounds=1)
    with pytest.raises(SystemExit) as exit_:
        cli.sampled_images(config)
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "--images: cannot read" in error and "b.jpg (Truncated File Read)" in error
    config.skip_unreadable = True
    sample, paths = cli.sampled_images(config)
    assert sorted(sample[0]) == ["a.jpg", "c.jpg"]
    assert sorted(paths[0]) == [str(tmp_path / "images" / n) for n in ("a.jpg", "c.jpg")]
    assert "--skip-unreadable: left out 1 unreadable --images files (b.jpg" in capsys.readouterr(
    ).out


def test_an_unreadable_image_stops_a_real_run_before_it_writes_anything(tmp_path, capsys):
    import replica
    import train

    paths = replica.build(str(tmp_path), unlabeled=3, pope_images=1)
    (tmp_path / "train2014" / "COCO_train2014_000000999999.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(SystemExit) as exit_:
        train.main(["--model", paths["llava-1.5-7b-replica"], "--images", paths["train2014"],
                    "--pope", paths["pope"], "--pope-images", paths["val2014"], "--out",
                    str(tmp_path / "out"), "--batch-size", "2", "--images-per-round", "4",
                    "--no-progress"])  # every file sampled: the broken one too
    assert exit_.value.code == 2 and "COCO_train2014_000000999999.jpg" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # no run.json, no empty examples log


def test_ctrl_c_says_what_was_kept_and_how_to_resume(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="2", XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "train.py", "--out", str(tmp_path / "out"), "--steps", "5",
               "--eval-images", "20", "--sample-seeds", "1", "--no-progress"]
    # A shell that starts its jobs in the background (CI's may) hands them SIGINT ignored, and
    # Python then installs no Ctrl-C handler: give the run the default disposition a terminal would
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # the plan first, then main's first line of the work
    assert next(line for line in process.stdout if not line.startswith(("plan", "  "))).startswith(
        "device ")  # the work has started
    stderr = ""
    # A KeyboardInterrupt raised inside a finaliser is printed and dropped by Python itself, so
    # press Ctrl-C again, as a user would; but not while the first press is still exiting (a loaded
    # machine takes seconds), or that press kills it
    for _ in range(8):
        process.send_signal(signal.SIGINT)
        try:
            _, stderr = process.communicate(timeout=15)
            break
        except subprocess.TimeoutExpired:
            continue
    assert process.returncode == 1, stderr
    # the stop itself: one message
    assert "Traceback" not in stderr[stderr.index("stopped:") - 200:], stderr
    assert "stopped: the answers and examples written so far" in stderr
    assert stderr.strip().endswith(f"python train.py --out {tmp_path / 'out'} --steps 5 "
                                   f"--eval-images 20 --sample-seeds 1 --no-progress --resume")


def test_bench_and_toyworld_refuse_bad_flags_in_one_line():
    one_line(cli(["bench.py", "--layers", "0"]), "--layers must be at least 1, got 0")
    if not torch.cuda.is_available():
        one_line(cli(["bench.py", "--device", "cuda"]), "--device cuda: no such device here")
    one_line(cli(["toyworld.py", "--noise-step", "5000"]),
             "--noise-step must be in 0..999, got 5000")
    one_line(cli(["toyworld.py", "--ship", "--world-seed", "3"]),
             "--ship writes the default world only")
