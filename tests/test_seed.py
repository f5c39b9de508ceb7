"""seed.py: the SEED step on both families of the paper (LLaVA, InternVL), evolve, resume."""
import json
import os

import pytest
import torch

import adapter
import decode
import losses
import models
import purge
import runs
import seed
from conftest import check_the_teacher_is_the_purified_base, take_seed_steps, tiny_internvl


def llava_batch(processor, images_count=3):
    import toyworld

    world = toyworld.make_world(0)
    images = toyworld.unlabeled_images(world, images_count, seed=1)
    examples = [{"image": i, "prompt": seed.probe_text("cat"),
                 "response": processor.tokenizer(" yes").input_ids + [3]}
                for i in range(images_count)]
    examples.append({"image": 0, "prompt": "Describe the image.",
                     "response": processor.tokenizer(
                         " there is a cat and a dog .").input_ids + [3]})
    return seed.collate(examples, processor, images), examples, images


def internvl_batch(model, batch=2):
    """Input ids with the image placeholders InternVL expects, and a response at the end of each
    row."""
    n_image_tokens = models.image_features(model, torch.zeros(1, 3, 32, 32)).shape[0]
    g = torch.Generator().manual_seed(0)
    rows = [[7, 8] + [model.config.image_token_id] * n_image_tokens
            + torch.randint(10, 60, (5 + i,), generator=g).tolist() for i in range(batch)]
    length = max(map(len, rows))
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    attention_mask = torch.zeros(batch, length, dtype=torch.long)
    response_mask = torch.zeros(batch, length, dtype=torch.bool)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
        response_mask[i, len(row) - 3:len(row)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "response_mask": response_mask,
            "pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def check_seed_step_moves_only_the_adapter(model, batch, divergence):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = adapter.add_adapter(model, rank=4)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    values = []
    for step in range(3):
        loss, teacher, student = seed.seed_step(model, batch, divergence,
                                                generator=torch.Generator().manual_seed(step))
        assert torch.isfinite(loss) and student.shape == teacher.shape
        # response positions only
        assert student.shape[0] == int(batch["response_mask"][:, 1:].sum())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        values.append(loss.item())
    assert values[0] >= 0 and values[-1] != values[0]
    changed = {n.replace(".base.", ".") for n, p in model.named_parameters()
               if n.replace(".base.", ".") in before
               and not torch.equal(p, before[n.replace(".base.", ".")])}
    assert not changed
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters()
               if n.endswith(".B"))


@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_seed_step_on_tiny_llava(llava, processor, divergence):
    batch, _, _ = llava_batch(processor)
    check_seed_step_moves_only_the_adapter(llava, batch, divergence)


@pytest.mark.parametrize("divergence", ["reverse", "forward"])
def test_seed_step_on_tiny_internvl(divergence):
    model = tiny_internvl()
    check_seed_step_moves_only_the_adapter(model, internvl_batch(model), divergence)


def test_response_logits_equal_the_full_forward_at_response_positions(llava, processor):
    batch, _, _ = llava_batch(processor)
    with torch.no_grad():
        full = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits
        features = models.image_features(llava, batch["pixel_values"])
        positions = models.position_ids(llava, batch["input_ids"], batch["attention_mask"])
        fast = seed.response_logits(llava, batch["input_ids"], batch["attention_mask"], positions,
                                    features, batch["response_mask"])
    torch.testing.assert_close(fast, full[:, :-1][batch["response_mask"][:, 1:]], rtol=1e-5,
                               atol=1e-5)


def test_seed_step_teacher_is_the_purified_base(llava, processor):
    """At init the student equals the base; the teacher is purify(clean, distorted) of the base."""
    batch, _, _ = llava_batch(processor)
    adapter.add_adapter(llava)
    loss, teacher, student = seed.seed_step(llava, batch,
                                            generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = llava(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        noisy = purge.distort(batch["pixel_values"], 500, torch.Generator().manual_seed(5))
        full_distorted = llava(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=noisy).logits
    at = batch["response_mask"][:, 1:]
    expected = purge.purify(full[:, :-1][at], full_distorted[:, :-1][at])
    assert torch.equal(torch.isinf(teacher), torch.isinf(expected))
    torch.testing.assert_close(teacher[~torch.isinf(teacher)], expected[~torch.isinf(expected)],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(student, full[:, :-1][at], rtol=1e-5, atol=1e-5)
    assert loss.item() == pytest.approx(losses.reverse_kl(student, teacher).item())


def test_void_eps_sets_the_reverse_kl_floor(llava, processor):
    """seed_step's void_eps is the reverse KL's floor: at init the student has mass on every
    void."""
    batch, _, _ = llava_batch(processor)
    adapter.add_adapter(llava)
    values = {}
    # beta 0.9: a strict plausibility cut, so the untrained model's rows have voids
    for eps in (1e-8, 1e-2):
        loss, teacher, student = seed.seed_step(llava, batch, beta=0.9, void_eps=eps,
                                                generator=torch.Generator().manual_seed(5))
        assert torch.isinf(teacher).any()
        assert loss.item() == pytest.approx(losses.reverse_kl(student, teacher, eps=eps).item())
        values[eps] = loss.item()
    assert values[1e-2] < values[1e-8]  # a higher floor charges the void mass less
    forward, teacher, student = seed.seed_step(llava, batch, "forward", beta=0.9,
                                               generator=torch.Generator().manual_seed(5),
                                               void_eps=1e-2)
    # no floor in forward KL
    assert forward.item() == pytest.approx(losses.forward_kl(student, teacher).item())


def small_evolve(model, processor, out_dir, **kwargs):
    """train.self_evolve at a tiny budget: the loop that python train.py runs."""
    import cli
    import toyworld
    import train

    world = toyworld.make_world(0)
    images = toyworld.unlabeled_images(world, 6, seed=2)
    options = dict(rounds=1, steps=6, batch_size=4, eval_batch_size=4, probes_per_image=2,
                   description_tokens=4, checkpoint_every=2, progress=False, noise_step=500)
    options.update(kwargs)
    config = cli.Config(**options)
    return train.self_evolve(model, processor, [images] * config.rounds, world["names"], out_dir,
                             config, divergence="reverse", description=toyworld.DESCRIBE)


def test_choose_probes_asks_about_named_objects_and_their_co_occurring_ones():
    import random

    objects = ["cat", "dog", "cup", "key", "hat", "bell", "drum", "kite"]
    # Across the descriptions "cat" comes with "dog" (3 times) far more often than with any other.
    named = [["cat", "dog"], ["cat", "dog"], ["cat", "dog", "cup"], ["cat"], ["key"], []]
    chosen = seed.choose_probes(named, objects, probes_per_image=6, rng=random.Random(0))
    assert [len(c) for c in chosen] == [6] * 6 and all(len(set(c)) == 6 for c in chosen)
    for names, picks in zip(named, chosen):
        # at most half of the 6 go to named objects: all of these
        assert set(names[:3]) <= set(picks)
        assert all(p in objects for p in picks)
    # The image whose description names only "cat": of its 5 other probes, 2 go to the objects that
    # co-occur with "cat" ("dog" 3 times, "cup" once), whatever the rng; the other 3 are random.
    for s in range(20):
        assert {"dog", "cup"} <= set(seed.choose_probes(named, objects, 6, random.Random(s))[3])
    # "key" co-occurs with nothing: its other probes are random unnamed objects (never "key" twice)
    assert chosen[4].count("key") == 1
    # More named objects than half the probes: only half go to them, the rest are unnamed.
    many = seed.choose_probes([objects[:5]], objects, probes_per_image=4, rng=random.Random(1))[0]
    assert len(many) == 4 and len(set(many) & set(objects[:5])) == 2
    # Seeded: the same rng seed gives the same probes.
    assert seed.choose_probes(named, objects, 6, random.Random(0)) == chosen


def test_two_round_evolve_merges_twice(llava, processor, tmp_path):
    model, history = small_evolve(llava, processor, str(tmp_path), rounds=2)
    assert [h["round"] for h in history] == [0, 1]
    assert not adapter.adapter_layers(model)  # merged: a plain model again
    assert os.path.exists(tmp_path / "round0" / "adapter.safetensors")
    assert os.path.exists(tmp_path / "round1" / "adapter.safetensors")
    assert all(len(h["log"]) == 6 and 0 <= h["void_mass"] <= 1 for h in history)


@pytest.mark.parametrize("teacher,loss",
                         [("online", "reverse_kl"), ("recorded", "sparse_reverse_kl")])
def test_evolve_trains_at_its_void_eps(llava, processor, tmp_path, monkeypatch, teacher, loss):
    seen = []
    real = getattr(losses, loss)

    def recording_reverse_kl(*args, eps=1e-8, **kwargs):
        if torch.is_grad_enabled():  # a training step, not the no-grad void-mass measurement
            seen.append(eps)
        return real(*args, eps=eps, **kwargs)

    monkeypatch.setattr(losses, loss, recording_reverse_kl)
    small_evolve(llava, processor, str(tmp_path / "a"), steps=2, checkpoint_every=0, void_eps=3e-3,
                 teacher=teacher)
    assert seen == [3e-3, 3e-3]  # both training steps; the void-mass measurements need no loss
    seen.clear()
    small_evolve(llava, processor, str(tmp_path / "b"), steps=1, checkpoint_every=0,
                 teacher=teacher)
    assert seen == [1e-4]  # the default of the training recipe


@pytest.mark.parametrize("teacher", ["online", "recorded"])
def test_resume_equals_an_uninterrupted_run(processor, tmp_path, monkeypatch, teacher):
    import toyworld

    whole = toyworld.make_model(processor.tokenizer, seed=0)
    _, whole_history = small_evolve(whole, processor, str(tmp_path / "whole"), teacher=teacher)

    real_save = runs.save_checkpoint

    def crash_after_step_four(model, optimizer, path, round_index, step, made_with, log):
        real_save(model, optimizer, path, round_index, step, made_with, log)
        if step == 4:
            raise KeyboardInterrupt  # the run dies right after its step-4 checkpoint

    monkeypatch.setattr(runs, "save_checkpoint", crash_after_step_four)
    with pytest.raises(KeyboardInterrupt):
        small_evolve(toyworld.make_model(processor.tokenizer, seed=0), processor,
                     str(tmp_path / "part"), teacher=teacher)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "part" / "checkpoint" / "progress.json").read_text())
    assert (progress["round"], progress["step"]) == (0, 4)

    resumed = toyworld.make_model(processor.tokenizer, seed=0)
    _, history = small_evolve(resumed, processor, str(tmp_path / "part"), resume=True,
                              teacher=teacher)
    # only the missing steps ran, and the log of the steps before the crash came with the checkpoint
    assert [x["step"] for x in history[0]["log"]] == [0, 1, 2, 3, 4, 5]
    assert history[0]["log"] == whole_history[0]["log"]
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_the_teacher_stays_the_purified_base_after_the_adapter_has_moved(llava, processor):
    """With B away from zero the student is no longer the base; the teacher must still be."""
    import copy

    batch, _, _ = llava_batch(processor)
    base = copy.deepcopy(llava)
    adapter.add_adapter(llava, rank=4)
    torch.manual_seed(3)
    for layer in adapter.adapter_layers(llava).values():
        torch.nn.init.normal_(layer.B, std=0.5)
    noisy = purge.distort(batch["pixel_values"], 600, torch.Generator().manual_seed(5))
    check_the_teacher_is_the_purified_base(llava, base, batch, 5, noisy)


def test_collate_refuses_a_response_holding_the_image_placeholder(processor):
    images = [None]
    placeholder = processor.image_token_id
    example = {"image": 0, "prompt": seed.probe_text("cat"), "response": [placeholder, 3]}
    with pytest.raises(ValueError, match=rf"holds an image placeholder token \[{placeholder}\]"):
        seed.collate([example], processor, images)


def test_evolve_refuses_too_few_examples_to_train_on(llava, processor, tmp_path):
    # 6 images x 3 prompts = 18 examples, a batch of 18: all of them would be held out
    with pytest.raises(ValueError,
                       match="18 SEED examples: 18 are held out to measure the void mass"):
        small_evolve(llava, processor, str(tmp_path), steps=1, batch_size=18)


def test_seed_step_on_internvl_images_with_different_tile_counts():
    from PIL import Image

    from conftest import tiny_internvl, tiny_internvl_processor

    processor = tiny_internvl_processor()
    model = tiny_internvl(len(processor.tokenizer), processor.image_token_id)
    images = [Image.new("RGB", (40, 40), (200, 60, 60)), Image.new("RGB", (160, 40), (60, 200, 60))]
    eos = processor.tokenizer.eos_token_id
    examples = [{"image": 0, "prompt": seed.probe_text("cat"),
                 "response": processor.tokenizer(" yes").input_ids + [eos]},
                {"image": 1, "prompt": "Describe the image.",
                 "response": processor.tokenizer(" there is a cat and a dog .").input_ids + [eos]}]
    batch = seed.collate(examples, processor, images)
    assert batch["pixel_values"].shape[0] == 1 + 5  # one tile, then four and a thumbnail
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits
        fast = seed.response_logits(model, batch["input_ids"], batch["attention_mask"],
                                    models.position_ids(model, batch["input_ids"],
                                                        batch["attention_mask"]),
                                    models.image_features(model, batch["pixel_values"]),
                                    batch["response_mask"])
    torch.testing.assert_close(fast, full[:, :-1][batch["response_mask"][:, 1:]], rtol=1e-5,
                               atol=1e-5)
    check_seed_step_moves_only_the_adapter(model, batch, "reverse")


def test_mentions_count_every_occurrence_as_chair_does():
    names = ["cat", "dog", "traffic light"]
    text = "There is a cat, two dogs and a cat beside a traffic light."
    assert seed.mentions(text, names) == ["cat", "cat", "dog", "traffic light"]
    assert seed.mentioned_objects(text, names) == ["cat", "dog", "traffic light"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_batching_leaves_the_tokenizer_as_it_found_it(processor, side):
    """prompt_batch pads on the left and collate on the right, each for its own call only."""
    batch, examples, images = llava_batch(processor)
    processor.tokenizer.padding_side = side
    try:
        left = models.prompt_batch(processor, images[:2],
                                   ["Describe the image.", seed.probe_text("cat")])
        assert processor.tokenizer.padding_side == side
        right = seed.collate(examples, processor, images)
        assert processor.tokenizer.padding_side == side
    finally:
        processor.tokenizer.padding_side = "right"
    assert (left["attention_mask"][:, -1] == 1).all() and (left["attention_mask"][:, 0] == 0).any()
    assert (right["attention_mask"][:, 0] == 1).all() and torch.equal(right["input_ids"],
                                                                      batch["input_ids"])


def test_probes_are_worded_as_pope_asks():
    """seed.py words its probes itself (it imports no evaluation code): exactly POPE's question and
    suffix."""
    import eval_pope

    for name in list(eval_pope.COCO_OBJECTS) + ["apple", "umbrella", "eagle owl"]:
        assert seed.probe_text(name) == eval_pope.question_for(name) + eval_pope.PROMPT_SUFFIX


def test_the_readme_loop_runs_as_written():
    """The README's "SEED in your own training code" block, run as written (2 steps, not 600; 8
    images, not 400): it gets its own model, processor, images and object names, and ends with a
    merged, changed model."""
    import re

    readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "README.md")).read()
    section = readme[readme.index("## SEED in your own training code"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "seed.recorded_seed_step(" in code and "loss.backward()" in code and "range(600)" in code
    assert "unlabeled_images(world, 400)" in code
    namespace = {}
    exec(code.replace("range(600)", "range(2)").replace("unlabeled_images(world, 400)",
                                                        "unlabeled_images(world, 8)"),
         namespace)
    model = namespace["model"]
    assert not adapter.adapter_layers(model)  # merged: a plain model again
    base, _ = models.load_model(namespace["model_path"])
    base_weights = dict(base.named_parameters())
    # and it learned something
    assert any(not torch.equal(p, base_weights[n]) for n, p in model.named_parameters())


def test_seed_step_on_a_peft_wrapped_llava(llava, processor):
    """The README's PEFT lines: get_peft_model, then seed_step unchanged, PEFT's disable_adapter()
    the teacher."""
    import copy

    from peft import LoraConfig, get_peft_model

    batch, _, _ = llava_batch(processor)
    base = copy.deepcopy(llava)
    before = {n: p.detach().clone() for n, p in llava.named_parameters()}
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=r".*language_model.*\.(q_proj|v_proj)")  # the decoder's only
    model = get_peft_model(llava, config)
    take_seed_steps(model, batch, [p for p in model.parameters() if p.requires_grad], lr=1e-2)
    moved = {n for n, p in model.named_parameters() if "lora_" in n and "lora_B" in n
             and p.abs().sum() > 0}
    assert moved  # LoRA's B has left zero: the student is no longer the base
    for name, p in model.named_parameters():  # everything that is not LoRA is as it was
        if "lora_" not in name:
            original = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            assert torch.equal(p, before[original]), name
    # After the moves the teacher is still purify of the *base* model's clean and distorted logits.
    noisy = purge.distort(batch["pixel_values"], 600, torch.Generator().manual_seed(9))
    check_the_teacher_is_the_purified_base(model, base, batch, 9, noisy)


def test_a_run_stopped_during_example_generation_resumes_to_the_same_examples_and_adapter(
        processor, tmp_path, monkeypatch):
    import toyworld

    whole = toyworld.make_model(processor.tokenizer, seed=0)
    small_evolve(whole, processor, str(tmp_path / "whole"))
    real_generate, calls = decode.generate, []

    def stop_on_the_third_batch(*args, **kwargs):
        calls.append(1)
        # descriptions are 2 batches of 4 (6 images): this is the first probe batch
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(decode, "generate", stop_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        small_evolve(toyworld.make_model(processor.tokenizer, seed=0), processor,
                     str(tmp_path / "part"))
    monkeypatch.setattr(decode, "generate", real_generate)
    log = tmp_path / "part" / "round0" / "examples.jsonl"
    assert [json.loads(line)["kind"]
            for line in log.read_text().splitlines()] == ["description"] * 6
    with open(log, "a") as f:
        f.write('{"kind": "probe", "ima')  # and the crash tore a line in half
    made_again = []
    monkeypatch.setattr(decode, "generate", lambda *a,
                        **k: made_again.append(1) or real_generate(*a, **k))
    resumed = toyworld.make_model(processor.tokenizer, seed=0)
    small_evolve(resumed, processor, str(tmp_path / "part"), resume=True)
    # The six descriptions were not decoded again: only the probes were (3 batches of 4), and the
    # void mass's passes ran.
    assert log.read_text() == (tmp_path / "whole" / "round0" / "examples.jsonl").read_text()
    assert len(made_again) == 3
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_resume_with_other_settings_is_refused_naming_the_record(llava, processor, tmp_path):
    import shutil

    import toyworld

    small_evolve(llava, processor, str(tmp_path), steps=1, checkpoint_every=0)
    shutil.rmtree(tmp_path / "checkpoint")  # as if it had stopped before its first checkpoint

    refusal = r"examples.jsonl:1: made with --probes-per-image 2, but this run has 3"
    with pytest.raises(ValueError, match=refusal):
        small_evolve(toyworld.make_model(processor.tokenizer, seed=0), processor, str(tmp_path),
                     steps=1, checkpoint_every=0, probes_per_image=3, resume=True)
