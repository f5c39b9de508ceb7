"""End to end: `python train.py` and `python bench.py` at their smallest sizes, as a user runs
them."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def test_train_at_a_tiny_budget_writes_a_valid_results_json(tmp_path):
    out = tmp_path / "out"
    done = run(["train.py", "--pretrain-steps", "15", "--steps", "3", "--images-per-round", "6",
                "--eval-images", "4", "--sample-seeds", "2", "--checkpoint-every", "2", "--out",
                str(out), "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert all(row in done.stdout for row in ("SEED reverse KL", "VCD decoding", "SEED + VCD"))
    results = json.loads((out / "results.json").read_text())
    for method in ("base", "vcd", "seed_forward", "seed_reverse", "seed_reverse_vcd"):
        for decoding in ("greedy", "sample"):
            for split in ("random", "popular", "adversarial"):
                metrics = results[method][decoding][split]
                assert set(metrics) >= {"accuracy", "precision", "recall", "f1", "yes_ratio"}
                assert all(0.0 <= metrics[k] <= 1.0
                           for k in ("accuracy", "precision", "recall", "f1", "yes_ratio"))
        assert results[method]["sample"]["random"]["f1_std"] >= 0
        assert set(results[method]["captions"]) == {"chair_i", "chair_s"}
        assert results[method]["seconds_per_answer"] > 0
    for method in ("seed_forward", "seed_reverse"):
        assert 0.0 <= results[method]["void_mass"][0] <= 1.0
        assert (out / method / "round0" / "adapter.safetensors").exists()
    assert "diagnostic" in results
    # SEED + VCD: VCD decoding (the run's contrast) on the merged reverse-KL model, the same as
    # eval_pope.py's answers
    import cli
    import eval_pope
    import toyworld

    model, processor = models.load_model(str(out / "seed_reverse" / "merged"))
    world_config = toyworld.WorldConfig(steps=15)
    _, world = toyworld.build(world_config, progress=False, shipped=True)
    pope_files, image_dir, _ = toyworld.eval_set(4, world, world_config)
    eval_pope.answer_questions(model, processor, pope_files["random"], image_dir,
                               str(tmp_path / "vcd.jsonl"), decoding="vcd-greedy", batch_size=64,
                               max_new_tokens=4, progress=False,
                               **eval_pope.contrast_options(cli.parse_config([])))
    row = eval_pope.read_answers(
        str(out / "seed_reverse_vcd" / "answers" / "vcd-greedy_random_seed0.jsonl"))
    assert [a["text"] for a in row] == [a["text"] for a in eval_pope.read_answers(
        str(tmp_path / "vcd.jsonl"))]
    from PIL import Image

    for picture in ("results.png", "scenes.png"):  # beside results.json
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_losses_py_prints_and_draws_the_void_picture(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "losses.py")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reverse KL (SEED)" in done.stdout
    from PIL import Image

    with Image.open(tmp_path / "void_picture.png") as image:
        assert image.format == "PNG" and image.size == (760, 420)


def test_train_help_explains_every_flag(tmp_path):
    done = run(["train.py", "--help"], tmp_path)
    assert done.returncode == 0
    for flag in ("--model", "--images", "--pope", "--pope-images", "--rounds", "--steps",
                 "--divergence", "--world-seed", "--seed", "--out", "--resume"):
        assert flag in done.stdout
    assert "default" in done.stdout


def test_a_renamed_flag_still_accepts_its_former_name():
    import cli

    former = cli.parse_config(["--loss", "forward", "--adapter-alpha", "4", "--unlabeled", "50"])
    assert (former.divergence, former.alpha_r, former.images_per_round) == ("forward", 4.0, 50)
    assert former == cli.parse_config(["--divergence", "forward", "--alpha-r", "4",
                                       "--images-per-round", "50"])


def test_train_with_a_model_but_no_data_is_a_clear_error(tmp_path):
    done = run(["train.py", "--model", str(tmp_path)], tmp_path)
    assert done.returncode != 0 and "--model needs --images" in done.stderr


def test_bench_at_its_smallest_size_produces_every_figure(tmp_path):
    done = run(["bench.py", "--repeats", "1", "--batch-size", "2", "--json",
                str(tmp_path / "bench.json")], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in ("train_step_ratio", "train_step_ratio_recorded", "answer_cost_ratio_seed",
                "answer_cost_ratio_vcd", "eval_batched_speedup", "decode_throughput_ratio",
                "decode_purified_throughput_ratio", "examples_record_ratio"):
        assert figures[key]["median"] > 0, key
    assert figures["peak_memory_ratio"] > 0 and figures["peak_memory_ratio_recorded"] > 0
    for key in ("train_step_seed_s", "train_step_recorded_s", "train_step_sft_s", "answer_base_s",
                "answer_seed_s", "answer_vcd_s", "decode_recording_s"):
        assert figures[key]["median"] > 0, key
    assert "train step: SEED online / plain adapter step" in done.stdout
    assert "train step: SEED recorded / plain adapter step" in done.stdout
    assert "decoding: our greedy loop / model.generate" in done.stdout


def test_merged_weights_are_the_merged_model_and_leave_the_model_as_it_was(llava, tmp_path):
    import copy

    import torch

    import adapter
    import report

    def trained_adapter(model, path, seed):
        adapter.add_adapter(model, rank=4)
        torch.manual_seed(seed)
        for layer in adapter.adapter_layers(model).values():
            torch.nn.init.normal_(layer.B)  # as if trained: B = 0 would merge to no change at all
        adapter.save_adapter(model, path)
        adapter.merge_adapter(model)

    scratch = copy.deepcopy(llava)
    trained_adapter(scratch, str(tmp_path / "round0"), seed=0)
    # two rounds, merged one after the other
    trained_adapter(scratch, str(tmp_path / "round1"), seed=1)
    before = {n: p.detach().clone() for n, p in llava.named_parameters()}
    merged = report.merged_weights(llava, [str(tmp_path / "round0"), str(tmp_path / "round1")])
    assert all(torch.equal(p, before[n]) for n, p in llava.named_parameters())  # put back as it was
    assert merged and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in merged)
    reference = dict(scratch.named_parameters())  # the base with both rounds merged the usual way
    assert all(torch.equal(weight, reference[name]) for name, weight in merged.items())
    assert all(torch.equal(p, before[n]) for n, p in scratch.named_parameters() if n not in merged)


def test_answer_costs_times_every_row_and_puts_the_base_weights_back(llava, processor, tmp_path):
    import torch
    from PIL import Image

    import eval_pope
    import report

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"im{i}.png")
    questions = [{"question_id": i, "image": f"im{i}.png", "text": "Is there a cat in the image?",
                  "label": "no"}
                 for i in range(2)]
    eval_pope.write_jsonl(questions, str(tmp_path / "q.json"))
    name = next(n for n, _ in llava.named_parameters() if n.endswith("q_proj.weight"))
    before = {n: p.detach().clone() for n, p in llava.named_parameters()}
    rows = {"base": ({}, False), "vcd": ({}, True),
            "seed": ({name: torch.zeros_like(before[name])}, False)}
    costs = report.answer_costs(llava, processor, str(tmp_path / "q.json"), str(tmp_path), 2, rows,
                                repeats=2)
    assert set(costs) == {"base", "vcd", "seed"} and all(seconds > 0 for seconds in costs.values())
    assert all(torch.equal(p, before[n]) for n, p in llava.named_parameters())


def test_vcd_rows_use_the_contrast_the_flags_set(llava, processor, tmp_path, generate_calls):
    """The VCD row and its captions contrast with --alpha / --beta / --noise-step, as SEED's teacher
    does."""
    from PIL import Image

    import cli
    import eval_pope
    import report

    for i in range(2):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"im{i}.png")
    questions = [{"question_id": i, "image": f"im{i}.png", "text": "Is there a cat in the image?",
                  "label": "no"}
                 for i in range(2)]
    eval_pope.write_jsonl(questions, str(tmp_path / "q.json"))
    config = cli.parse_config(["--alpha", "0.5", "--beta", "0.2", "--noise-step", "600",
                               "--sample-seeds", "1", "--no-progress", "--out",
                               str(tmp_path / "out")])
    report.evaluate(llava, processor, {"random": str(tmp_path / "q.json")}, str(tmp_path),
                    str(tmp_path / "answers"), config, contrast=True)
    report.caption_hallucination(llava, processor, str(tmp_path),
                                 {"im0.png": ["cat"], "im1.png": []}, ["cat"], contrast=True,
                                 **eval_pope.contrast_options(config))
    assert len(generate_calls) == 3  # greedy, one sampling seed, captions
    assert all(s == {"contrast": True, "alpha": 0.5, "beta": 0.2, "noise_step": 600}
               for s in generate_calls)


def real_run_flags(tmp_path):
    """The flags of a real run, naming folders laid out as train.py --model expects them."""
    for folder in ("model", "images", "pope", "val"):
        (tmp_path / folder).mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "processor_config.json").write_text("{}")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    Image.new("RGB", (8, 8)).save(tmp_path / "val" / "v.jpg")
    for split in ("random", "popular", "adversarial"):
        (tmp_path / "pope" / f"coco_pope_{split}.json").write_text(
            '{"question_id": 1, "image": "v.jpg", "text": "Is there a cat in the image?", "label": '
            '"yes"}\n')
    return ["--model", str(tmp_path / "model"), "--images", str(tmp_path / "images"), "--pope",
            str(tmp_path / "pope"), "--pope-images", str(tmp_path / "val"), "--out",
            str(tmp_path / "out"), "--batch-size", "2", "--no-progress"]


def test_noise_step_defaults_to_the_toy_worlds_or_vcds(tmp_path):
    import cli
    import toyworld

    out = ["--out", str(tmp_path / "toy")]
    assert cli.parse_config(out).noise_step == toyworld.NOISE_STEP == 700
    real = real_run_flags(tmp_path)
    assert cli.parse_config(real).noise_step == 500  # VCD's, on a real checkpoint
    assert cli.parse_config(real + ["--noise-step", "650"]).noise_step == 650
    assert cli.parse_config(out + ["--noise-step", "400"]).noise_step == 400


@pytest.mark.parametrize("flags,message", [
    (["--steps", "-3"], "--steps must be at least 1, got -3"),
    (["--noise-step", "5000"], "--noise-step must be at most 999, got 5000"),
    (["--beta", "0"], "--beta must be above 0, got 0.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--alpha", "inf"], "--alpha must be a finite number, got inf"),
    (["--alpha", "nan"], "--alpha must be a finite number, got nan"),
    (["--alpha-r", "-5"], "--alpha-r must be above 0, got -5.0"),
    (["--alpha-r", "nan"], "--alpha-r must be a finite number, got nan"),
    (["--void-eps", "1"], "--void-eps must be below 1, got 1.0"),
    (["--objects", "/nonexistent/names.txt"], "--objects is for a real run (--model)"),
    (["--images", "/data/coco"], "--images is for a real run (--model)"),
    (["--pope", "/data/pope"], "--pope is for a real run (--model)"),
    (["--resume", "--overwrite"],
     "--resume continues the run in --out, --overwrite replaces it: give one"),
])
def test_bad_flags_are_refused_in_one_line_before_any_work(flags, message, capsys, tmp_path):
    import cli

    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(flags + ["--out", str(tmp_path / "out")])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and message in error and error.count("\n") == 1


@pytest.mark.parametrize("break_it,message", [
    (lambda t: None, None),
    (lambda t: (t / "model" / "config.json").unlink(),
     "not a local checkpoint folder (no config.json"),
    (lambda t: (t / "model" / "processor_config.json").unlink(), "no processor in the folder"),
    (lambda t: (t / "pope" / "coco_pope_popular.json").unlink(), "no *_pope_popular.json"),
    (lambda t: (t / "images" / "a.jpg").unlink(), "no .jpg, .jpeg or .png files"),
    (lambda t: (t / "val" / "v.jpg").unlink(),
     "coco_pope_random.json:1: image v.jpg is not in --pope-images"),
    (lambda t: (t / "val" / "v.jpg").write_bytes(b"not a jpeg"),
     "coco_pope_random.json:1: cannot read image"),
    (lambda t: shutil.rmtree(t / "pope") or (t / "pope").write_text(""),
     "--pope {t}/pope: not a folder"),
    (lambda t: (t / "pope" / "coco_pope_random.json").write_bytes(
        b'{"question_id": 1, "image": "v.jpg", "text": "Is there a \xff in the image?", "label": '
        b'"yes"}\n'),
     "coco_pope_random.json:1: not UTF-8 text (byte 0xff at column 58)"),
    (lambda t: (t / "pope" / "coco_pope_random.json").write_text(
        '{"question_id": 1, "image": "v.jpg", "text": "Is there a cat in the image?"}\n'),
     "coco_pope_random.json:1: question_id 1 lacks ['label']"),
    (lambda t: (t / "out").write_text(""), "--out {t}/out: a file, not a folder"),
    (lambda t: (t / "pope" / "coco_pope_popular.json").write_text('{"image": "v.jpg"}\n'),
     "coco_pope_popular.json:1: question_id None lacks ['question_id', 'text', 'label']"),
    (lambda t: (t / "images" / "v.jpg").write_bytes(b""),
     "1 of its files are POPE test images (v.jpg, ...): SEED would train on the test set"),
])
def test_a_real_runs_paths_are_checked_before_any_work(tmp_path, capsys, break_it, message):
    import cli

    flags = real_run_flags(tmp_path)
    break_it(tmp_path)
    if message is None:
        assert cli.parse_config(flags).model == str(tmp_path / "model")
        return
    message = message.format(t=tmp_path)
    with pytest.raises(SystemExit):
        cli.parse_config(flags)
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
