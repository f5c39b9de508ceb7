"""train.py --model on a local replica of llava-1.5-7b-hf (tests/replica.py): the real run's path,
end to end."""
import json
import os

import pytest
import torch

import models
import replica


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One smallest-budget `train.py --model` run on the replica; returns (paths, out folder,
    results)."""
    import train

    root = str(tmp_path_factory.mktemp("real"))
    paths = replica.build(root, unlabeled=4, pope_images=3, questions_per_image=2)
    out = os.path.join(root, "out")
    flags = ["--model", paths["llava-1.5-7b-replica"], "--images", paths["train2014"], "--pope",
             paths["pope"], "--pope-images", paths["val2014"], "--out", out, "--divergence",
             "reverse", "--rounds", "1", "--steps", "2", "--batch-size", "2", "--probes-per-image",
             "1", "--images-per-round", "4", "--description-tokens", "3", "--sample-seeds", "1",
             "--eval-batch-size", "4",
             "--checkpoint-every", "1", "--no-progress"]
    results = train.main(flags)
    return paths, out, results


def test_the_replica_is_shaped_like_llava_15_where_the_code_cares(tmp_path):

    processor = replica.make_processor(["traffic light", "hair drier", "cat"])
    tokenizer = processor.tokenizer
    assert len(tokenizer(" traffic light").input_ids) > 1 and len(
        tokenizer(" hair drier").input_ids) > 1
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    # <pad> and <image> come after it, as 32000 / 32001 in the real one
    vocabulary = len(tokenizer) - 2
    assert {tokenizer.pad_token_id, processor.image_token_id} == {vocabulary, vocabulary + 1}
    from PIL import Image

    batch = models.prompt_batch(processor, [Image.new("RGB", (640, 480))],
                                ["Is there a cat in the image?"])
    assert batch["pixel_values"].shape == (1, 3, 336, 336)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 576
    text = tokenizer.decode(
        batch["input_ids"][0][batch["input_ids"][0] != processor.image_token_id])
    assert text.startswith("USER: \n") and text.endswith("Is there a cat in the image? ASSISTANT:")


def test_a_real_run_writes_results_a_merged_checkpoint_and_a_peft_adapter(real_run):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import adapter

    paths, out, results = real_run
    saved = json.load(open(os.path.join(out, "results.json")))
    # the table's one order
    assert list(saved["seed_reverse"]["greedy"]) == ["random", "popular", "adversarial"]
    for method in ("base", "vcd", "seed_reverse"):
        for decoding in ("greedy", "sample"):
            assert all(0 <= saved[method][decoding][s]["f1"] <= 1
                       for s in ("random", "popular", "adversarial"))
    examples = [json.loads(line)
                for line in open(os.path.join(out, "base", "examples.jsonl"))]
    assert [e["kind"] for e in examples] == ["description"] * 4 + ["probe"] * 4

    # The merged model: an ordinary checkpoint, equal to the base with the round's adapter merged
    # into it here.
    merged_dir = os.path.join(out, "seed_reverse", "merged")
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir).eval()
    processor = AutoProcessor.from_pretrained(merged_dir)
    base, _ = models.load_model(paths["llava-1.5-7b-replica"])
    round_dir = os.path.join(out, "seed_reverse", "round0")
    ours, _ = models.load_model(paths["llava-1.5-7b-replica"])
    adapter.load_adapter(ours, round_dir)
    pictures = [os.path.join(paths["val2014"], n) for n in sorted(os.listdir(paths["val2014"]))[:2]]
    inputs = models.prompt_batch(processor, pictures, ["Is there a traffic light in the image?",
                                                       "Describe this image in detail."])
    with torch.no_grad():
        unmerged = ours(**inputs).logits
        plain = base(**inputs).logits
        from_disk = merged(**inputs).logits
        peft_model = PeftModel.from_pretrained(base, os.path.join(round_dir, "peft")).eval()
        from_peft = peft_model(**inputs).logits
    assert not torch.allclose(unmerged, plain, atol=1e-4)  # two SEED steps have moved the model
    torch.testing.assert_close(from_disk, adapter.merge_adapter(ours)(**inputs).logits.detach(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_peft, unmerged, rtol=1e-5, atol=1e-5)
    peft_config = json.load(open(os.path.join(round_dir, "peft", "adapter_config.json")))
    assert peft_config["base_model_name_or_path"] == paths["llava-1.5-7b-replica"]
    assert not any("vision_tower" in t for t in peft_config["target_modules"])


def test_a_finished_real_run_resumes_without_redoing_anything(real_run, monkeypatch):
    import decode
    import train

    paths, out, results = real_run
    calls = []
    real_generate = decode.generate
    monkeypatch.setattr(decode, "generate", lambda *a,
                        **k: calls.append(1) or real_generate(*a, **k))
    flags = json.load(open(os.path.join(out, "results.json")))["config"]
    again = train.main([f"--{k.replace('_', '-')}={v}" for k, v in flags.items()
                        if v is not None and not isinstance(v, bool)]
                       + ["--resume", "--no-progress"])
    # every answer file was complete:
    for method in ("base", "vcd", "seed_reverse", "seed_reverse_vcd"):
        assert again[method]["greedy"] == results[method]["greedy"]  # nothing answered again
    # The only decoding left: the answer-cost timing, 21 rounds of the four rows (measured anew)
    assert len(calls) == 21 * 4


# ---------------------------------------------------------------------------------------------
# The run at scale: images sampled per round, fresh in round 1, round 0 made once, CHAIR on COCO

def scale_flags(paths, out, coco):
    return ["--model", paths["llava-1.5-7b-replica"], "--images", paths["train2014"], "--pope",
            paths["pope"], "--pope-images", paths["val2014"], "--out", out, "--rounds", "2",
            "--images-per-round", "3", "--fresh-images", "--steps", "2", "--batch-size", "2",
            "--probes-per-image", "1", "--description-tokens", "2", "--sample-seeds", "1",
            "--eval-batch-size", "4", "--checkpoint-every", "1", "--chair-annotations", coco,
            "--chair-images", paths["val2014"], "--chair-tokens", "3", "--chair-batch-size", "2",
            "--no-progress"]


@pytest.fixture(scope="module")
def scale_run(tmp_path_factory):
    """`train.py --model` with both divergences, two rounds of three fresh images out of eight,
    and CHAIR: (paths, the COCO annotations folder, out folder, results, what it printed)."""
    import contextlib
    import io

    import train

    root = str(tmp_path_factory.mktemp("scale"))
    paths = replica.build(root, unlabeled=8, pope_images=3, questions_per_image=2)
    coco = replica.write_coco_annotations(os.path.join(root, "annotations"), paths["val2014"])
    out = os.path.join(root, "out")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = train.main(scale_flags(paths, out, coco))
    return paths, coco, out, results, printed.getvalue()


def records(path):
    return [json.loads(line) for line in open(path)]


def test_each_round_makes_examples_of_its_own_sample_and_round_0_once(scale_run):
    import loading

    paths, _, out, _, printed = scale_run
    sample = json.load(open(os.path.join(out, "run.json")))["image_sample"]
    assert [len(names) for names in sample] == [3, 3] and not set(sample[0]) & set(sample[1])
    assert set(sample[0] + sample[1]) <= set(os.listdir(paths["train2014"]))
    # round 0: the base model's, made once, read by both rows; round 1: each row's own
    logs = {"base": os.path.join(out, "base", "examples.jsonl")}
    logs.update({d: os.path.join(out, f"seed_{d}", "round1", "examples.jsonl")
                 for d in ("forward", "reverse")})
    assert not any(os.path.exists(os.path.join(out, f"seed_{d}", "round0", "examples.jsonl"))
                   for d in ("forward", "reverse"))
    for name, path in logs.items():
        made = records(path)
        # a description and one probe of each of the round's three images
        assert [r["kind"] for r in made] == ["description"] * 3 + ["probe"] * 3, name
        round_index = 0 if name == "base" else 1
        images = [os.path.join(paths["train2014"], n) for n in sample[round_index]]
        assert made[0]["made_with"]["image_sample"] == loading.sample_id(images)
        assert ("divergence" in made[0]["made_with"]) == (name != "base")
    forward, reverse = records(logs["forward"]), records(logs["reverse"])
    assert [r["response"] for r in forward] != [r["response"] for r in reverse] or \
        [r["teacher"] for r in forward] != [r["teacher"] for r in reverse]
    # the plan, printed before the first forward pass
    plan_at, device_at = printed.index("plan: 2 round(s) x 3 unlabeled images (6 distinct)"), \
        printed.index("device cpu")
    assert plan_at < device_at and "examples of round 0 (the base model's)" in printed


def test_chair_columns_are_measured_on_every_row(scale_run):
    _, _, out, results, printed = scale_run
    for method in ("base", "vcd", "seed_forward", "seed_reverse", "seed_reverse_vcd"):
        chair = results[method]["chair"]
        assert set(chair) >= {"chair_s", "chair_i", "recall", "len"} and chair["descriptions"] == 3
        decoding = "vcd-greedy" if "vcd" in method else "greedy"
        assert len(records(os.path.join(out, method, "chair", f"{decoding}.jsonl"))) == 3
    header = next(line for line in printed.splitlines() if line.startswith("POPE %"))
    assert all(column in header for column in ("CHAIRs", "CHAIRi", "Recall", "Len"))


def test_a_stopped_scale_run_resumes_to_the_uninterrupted_results(scale_run, tmp_path,
                                                                   monkeypatch):
    import contextlib
    import io

    import seed
    import train

    paths, coco, out, results, _ = scale_run
    again = str(tmp_path / "out")
    real, calls = seed.purified_batch, []

    def stop_in_reverse_round_1(*args, **kwargs):  # the second row's round 1 examples
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(seed, "purified_batch", stop_in_reverse_round_1)
    with pytest.raises(KeyboardInterrupt), contextlib.redirect_stdout(io.StringIO()):
        train.main(scale_flags(paths, again, coco))
    monkeypatch.setattr(seed, "purified_batch", real)
    with contextlib.redirect_stdout(io.StringIO()):
        resumed = train.main(scale_flags(paths, again, coco) + ["--resume"])
    for method in ("base", "vcd", "seed_forward", "seed_reverse", "seed_reverse_vcd"):
        for key in ("greedy", "sample", "chair", "void_mass", "void_mass_at_start", "final_loss"):
            assert resumed[method].get(key) == results[method].get(key), (method, key)
    for log in ("base/examples.jsonl", "seed_forward/round1/examples.jsonl",
                "seed_reverse/round1/examples.jsonl"):
        assert records(os.path.join(again, log)) == records(os.path.join(out, log)), log


def test_the_plan_is_printed_in_a_second_without_loading_weights(scale_run):
    import subprocess
    import sys
    import time

    paths, coco, out, _, _ = scale_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "train.py", "--plan",
                           *scale_flags(paths, out + "-plan", coco)], cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("plan: 2 round(s) x 3 unlabeled images (6 distinct), 6 examples "
                               "made a round")
    # 3 images x 2 questions x 3 splits, greedy and one sampling seed
    assert "POPE, seed_reverse_vcd: 36 POPE answers, VCD" in done.stdout
    assert "CHAIR, base: 3 CHAIR descriptions" in done.stdout
    assert not os.path.exists(out + "-plan")  # nothing written
    print(f"--plan took {time.perf_counter() - began:.1f} s")


# ---------------------------------------------------------------------------------------------
# InternVL and Qwen2.5-VL folders as the hub ships them, loaded by the project's own install

HUB_FOLDERS = {"InternVL3-1B-hf": replica.internvl3_hf_folder,
               "Qwen2.5-VL-7B-Instruct": replica.qwen2_5_vl_folder}


@pytest.mark.parametrize("name", sorted(HUB_FOLDERS))
def test_hub_laid_out_folders_load_answer_pope_and_train(tmp_path, name):
    """Every file the hub repository ships (InternVL's video_preprocessor_config.json; Qwen's none,
    which transformers fills in): load_model builds the image path without torchvision, then
    eval_pope.py answer and train.py --model run on the folder, as a user runs them."""
    import subprocess
    import sys


    paths = replica.build(str(tmp_path), unlabeled=3, pope_images=2, questions_per_image=2)
    folder = HUB_FOLDERS[name](str(tmp_path / name))
    model, processor = models.load_model(folder)
    expected = {"InternVL3-1B-hf": "InternVLProcessor",
                "Qwen2.5-VL-7B-Instruct": "Qwen2_5_VLProcessor"}[name]
    assert expected in [cls.__name__ for cls in type(processor).__mro__]
    # the PIL backend: no torchvision needed
    assert type(processor.image_processor).__name__.endswith("Pil")
    assert processor.tokenizer.convert_ids_to_tokens(
        model.config.image_token_id) == processor.image_token

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="2")
    question_file = os.path.join(paths["pope"], "coco_pope_random.json")
    answer = subprocess.run([sys.executable, "eval_pope.py", "answer", "--model", folder,
                             "--questions", question_file, "--images", paths["val2014"], "--out",
                             str(tmp_path / "answers.jsonl"), "--device", "cpu", "--decoding",
                             "vcd-greedy", "--max-new-tokens", "2"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-2000:]
    assert len(open(tmp_path / "answers.jsonl").read().splitlines()) == 4
    train = subprocess.run([sys.executable, "train.py", "--model", folder, "--images",
                            paths["train2014"], "--pope", paths["pope"], "--pope-images",
                            paths["val2014"], "--out", str(tmp_path / "out"), "--divergence",
                            "reverse", "--steps", "1", "--batch-size", "2", "--probes-per-image",
                            "1", "--description-tokens", "2", "--sample-seeds", "1",
                            "--no-progress"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    results = json.load(open(tmp_path / "out" / "results.json"))
    assert list(results["seed_reverse"]["greedy"]) == ["random", "popular", "adversarial"]
    merged = str(tmp_path / "out" / "seed_reverse" / "merged")
    assert (os.path.isfile(os.path.join(merged, "video_preprocessor_config.json"))
            # carried over as it was
            == os.path.isfile(os.path.join(folder, "video_preprocessor_config.json")))
    reloaded, reprocessor = models.load_model(merged)
    assert models.chat_prompt(reprocessor,
                              "Is there a cat?") == models.chat_prompt(processor, "Is there a cat?")
