"""The paper's run at the paper's scale: images sampled per round, images read once a batch and
ahead of the model, the plan, micro-batches, gradient checkpointing, the out-of-memory found
first."""
import os
import random

import pytest
import torch
from PIL import Image

import adapter
import cli
import conftest
import distributed
import loading
import memory
import models
import replica
import seed
import toyworld

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# Images per round

def test_a_round_samples_what_its_training_draws():
    # 600 steps x 32 rows over (1 description + 6 probes) an image, a twentieth held out
    assert loading.images_per_round(600, 32, 6) == 2888
    assert 2888 * 7 * 0.95 >= 600 * 32 > 2887 * 7 * 0.95
    assert loading.images_per_round(10, 4, 0) == 43


def test_rounds_take_fresh_images_while_the_folder_has_them():
    order = list("abcdefg")
    assert loading.round_samples(order, 3, 2) == [list("abc"), list("def")]
    # the third round runs out: it takes the last one left, then the ones taken longest ago
    assert loading.round_samples(order, 3, 3)[2] == list("gab")
    assert loading.round_samples(order, 3, 3, fresh=False) == [list("abc")] * 3
    assert loading.round_samples(order, 10, 2) == [order, order]  # fewer than a round wants
    assert loading.needed(3, 2) == 6 and loading.needed(3, 2, fresh=False) == 3


def test_the_sample_depends_on_the_seed_and_the_names_alone():
    names = [f"COCO_train2014_{i:012d}.jpg" for i in range(50)]
    shuffled = random.Random(3).sample(names, len(names))
    assert loading.sample_order(names, 0) == loading.sample_order(shuffled, 0)
    assert loading.sample_order(names, 0) != loading.sample_order(names, 1)
    assert sorted(loading.sample_order(names, 0)) == names


def test_a_sample_is_named_by_its_files_or_pixels():
    red, blue = Image.new("RGB", (4, 4), "red"), Image.new("RGB", (4, 4), "blue")
    assert loading.sample_id([red, blue]) != loading.sample_id([blue, red])
    assert loading.sample_id([red]) == loading.sample_id([Image.new("RGB", (4, 4), "red")])
    assert loading.sample_id(["/a/x.jpg", "/a/y.jpg"]) == loading.sample_id(["/b/x.jpg",
                                                                             "/b/y.jpg"])


# ---------------------------------------------------------------------------------------------
# Batches prepared ahead, each image once

def test_prefetched_gives_every_item_in_order_and_raises_at_the_failing_one():
    assert list(loading.prefetched(range(7), lambda i: i * i)) == [i * i for i in range(7)]
    assert list(loading.prefetched([], lambda i: i)) == []
    done = []

    def prepare(i):
        if i == 3:
            raise ValueError("photo 3: cannot read the image")
        done.append(i)
        return i

    seen = []
    with pytest.raises(ValueError, match="photo 3"):
        for item in loading.prefetched(range(10), prepare, ahead=2):
            seen.append(item)
    assert seen == [0, 1, 2] and max(done) <= 2


def test_prefetched_prepares_the_next_item_while_the_caller_works():
    import threading

    started = {i: threading.Event() for i in range(3)}

    def prepare(i):
        started[i].set()
        return i

    seen = []
    for i in loading.prefetched(range(3), prepare):
        seen.append(i)
        if i == 0:  # the caller still busy with item 0: item 1 is being prepared meanwhile
            assert started[1].wait(timeout=30)
    assert seen == [0, 1, 2]
    # the same without a thread: nothing is prepared before it is asked for
    started = {i: threading.Event() for i in range(3)}
    for i in loading.prefetched(range(3), prepare, ahead=0):
        assert not started[i + 1].is_set() if i < 2 else True


PROCESSORS = {"llava-1.5": lambda: replica.make_processor(["cat", "traffic light"]),
              "internvl": conftest.tiny_internvl_processor,
              "qwen2.5-vl": conftest.tiny_qwen_vl_processor}


@pytest.mark.parametrize("family", sorted(PROCESSORS))
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_an_image_asked_about_several_times_is_preprocessed_once_to_the_same_batch(
        family, padding_side, monkeypatch, tmp_path):
    processor = PROCESSORS[family]()
    wide, tall = tmp_path / "wide.jpg", tmp_path / "tall.png"
    Image.new("RGB", (96, 40), (200, 30, 30)).save(wide)
    Image.new("RGB", (40, 90), (20, 130, 30)).save(tall)
    square = Image.new("RGB", (50, 50), (0, 0, 230))
    images = [str(wide), str(wide), str(tall), square, str(wide), square]
    texts = ["Is there a cat in the image?", "Describe this image in detail.", "Is there a dog?",
             "Is there a traffic light in the image? Please answer this question with one word.",
             "x", "Is there a hot dog"]
    expected = processor(images=[models.open_image(i) for i in images],
                         text=[models.chat_prompt(processor, t) for t in texts],
                         return_tensors="pt", padding=True, padding_side=padding_side)
    calls = []
    real_call = type(processor).__call__
    monkeypatch.setattr(type(processor), "__call__",
                        lambda self, *a, **k: calls.append(len(k["images"])) or
                        real_call(self, *a, **k))
    batch = models.processed_prompts(processor, images, texts, padding_side)
    assert sorted(batch) == sorted(expected)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert calls == [1, 1, 1]  # three distinct images, each through the processor once
    assert processor.tokenizer.padding_side == PROCESSORS[family]().tokenizer.padding_side


@pytest.mark.parametrize("name", ["InternVL3-1B-hf", "Qwen2.5-VL-7B-Instruct"])
def test_hub_folders_processors_give_the_same_batch_grouped(tmp_path, name):
    folder = {"InternVL3-1B-hf": replica.internvl3_hf_folder,
              "Qwen2.5-VL-7B-Instruct": replica.qwen2_5_vl_folder}[name](str(tmp_path / name))
    processor = models.load_processor(folder)
    photo = tmp_path / "photo.jpg"
    replica.write_jpeg(str(photo), (640, 480), random.Random(0))
    images, texts = [str(photo)] * 3, ["Describe this image in detail.", "Is there a cat?",
                                       "Is there a traffic light in the image?"]
    expected = processor(images=[models.open_image(i) for i in images],
                         text=[models.chat_prompt(processor, t) for t in texts],
                         return_tensors="pt", padding=True, padding_side="left")
    batch = models.prompt_batch(processor, images, texts)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key


# ---------------------------------------------------------------------------------------------
# Micro-batches and gradient checkpointing: the whole batch's gradients

def toy_batch(processor, rows=6, seed_=0):
    world = toyworld.make_world(0)
    images = toyworld.unlabeled_images(world, rows, seed=seed_)
    rng = random.Random(seed_)
    vocab = processor.tokenizer
    words = ["a", "cat", "and", "a", "dog", "."]
    examples = [{"image": i, "prompt": "Describe the image.",
                 "response": vocab.convert_tokens_to_ids(words[:rng.randint(2, 6)])}
                for i in range(rows)]
    batch = seed.collate(examples, processor, images)
    n = int(batch["response_mask"][:, 1:].sum())
    g = torch.Generator().manual_seed(seed_)
    batch["teacher_ids"] = torch.stack([torch.randperm(len(vocab), generator=g)[:5]
                                        for _ in range(n)])
    batch["teacher_logits"] = torch.randn(n, 5, generator=g)
    return batch


def moved_llava(processor, targets=("q_proj", "v_proj")):
    model = toyworld.make_model(processor.tokenizer, seed=0)
    params = adapter.add_adapter(model, targets=targets)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)  # B away from zero: the student has moved
    return model, params


def step_gradients(model, params, batch, micro_batch_size, teacher):
    noise_step = None if teacher == "recorded" else 600
    for p in params:
        p.grad = None
    generator = torch.Generator().manual_seed(1)
    for rows, share in distributed.process_rows(model, batch, noise_step, generator,
                                                micro_batch_size):
        if teacher == "recorded":
            loss, _, _ = seed.recorded_seed_step(model, rows, "reverse", void_eps=1e-4)
        else:
            loss, _, _ = seed.seed_step(model, rows, "reverse", noise_step=600,
                                        generator=torch.Generator().manual_seed(1),
                                        void_eps=1e-4)
        (loss * share).backward()
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("teacher", ["recorded", "online"])
def test_micro_batches_give_the_whole_batchs_gradients(processor, teacher):
    model, params = moved_llava(processor)
    batch = toy_batch(processor)
    whole = step_gradients(model, params, batch, None, teacher)
    assert sum(float(g.abs().sum()) for g in whole) > 0
    for micro in (1, 2, 4):
        parts = step_gradients(model, params, batch, micro, teacher)
        for a, b in zip(whole, parts):  # float rounding of a sum taken in another order
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_less(processor):
    import bench

    model, params = moved_llava(processor, targets=("all-linear",))
    batch = toy_batch(processor)

    def gradients():
        for p in params:
            p.grad = None
        saved, loss = bench.saved_bytes(model, lambda: seed.recorded_seed_step(model, batch)[0])
        loss.backward()
        return saved, [p.grad.clone() for p in params]

    plain_saved, plain = gradients()
    models.checkpoint_decoder_layers(model)
    kept_saved, checkpointed = gradients()
    models.checkpoint_decoder_layers(model, enable=False)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert kept_saved < 0.6 * plain_saved
    assert gradients()[0] == plain_saved  # the wrap taken off


def test_a_training_run_in_micro_batches_ends_with_the_whole_batchs_adapter(processor, tmp_path):
    import test_seed

    whole, _ = test_seed.small_evolve(toyworld.make_model(processor.tokenizer, seed=0), processor,
                                      str(tmp_path / "whole"), adapter_targets="all-linear",
                                      checkpoint_every=0)
    parts, _ = test_seed.small_evolve(toyworld.make_model(processor.tokenizer, seed=0), processor,
                                      str(tmp_path / "parts"), adapter_targets="all-linear",
                                      micro_batch_size=1, gradient_checkpointing=True,
                                      checkpoint_every=0)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "round0" / "adapter.safetensors")
    b = load_file(tmp_path / "parts" / "round0" / "adapter.safetensors")
    assert any(float(a[n].abs().sum()) > 0 for n in a if n.endswith(".B"))
    for name in a:  # six steps of AdamW: float rounding only
        assert float((b[name] - a[name]).norm() / a[name].norm()) <= 1e-4, name


# ---------------------------------------------------------------------------------------------
# The out-of-memory found first

def simulated_gpu(fits_up_to, peak_per_row=10):
    def try_rows(n):
        if n > fits_up_to:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return n * peak_per_row
    return try_rows


def test_the_largest_micro_batch_that_fits_is_found_by_halving():
    assert memory.find_fit(simulated_gpu(8), 32, limit=1000)[0] == 8
    assert memory.find_fit(simulated_gpu(32), 32, limit=1000)[0] == 32
    fit, tried = memory.find_fit(simulated_gpu(32), 32, limit=100)  # fits, but not the headroom
    assert fit == 8 and tried[16] == 160
    assert memory.find_fit(simulated_gpu(0), 32, limit=1000)[0] is None
    with pytest.raises(RuntimeError, match="not memory"):
        memory.find_fit(lambda n: (_ for _ in ()).throw(RuntimeError("not memory")), 4, 10)


class FakeGPU:
    """torch.cuda as a GPU of 80 GiB whose training steps fit up to `rows` rows: memory.micro_batch
    runs its real code on the CPU model, only the memory figures and the error are simulated."""

    def __init__(self, monkeypatch, rows, per_row=2**30):
        self.rows, self.per_row = rows, per_row
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda device: type("P", (), {"total_memory": 80 * 2**30}))
        monkeypatch.setattr(memory, "training_step_peak", self.step)

    def step(self, model, batch, step_loss):
        n = batch["input_ids"].shape[0]
        step_loss(batch).backward()  # the real step, on the CPU
        if n > self.rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB")
        return n * self.per_row


def micro_batch_on(monkeypatch, processor, rows, **flags):
    """memory.micro_batch as on a GPU whose steps fit up to `rows` rows (FakeGPU)."""
    model = toyworld.make_model(processor.tokenizer, seed=0)
    config = cli.Config(batch_size=32, description_tokens=4, **flags)
    FakeGPU(monkeypatch, rows)
    monkeypatch.setattr(memory, "device_of", lambda model: torch.device("cuda"))
    images = toyworld.unlabeled_images(toyworld.make_world(0), 3, seed=1)
    said = []
    try:
        fit = memory.micro_batch(model, processor, images, ["Describe the image.",
                                                            "Is there a cat in the image?"],
                                 config, lambda batch: seed.recorded_seed_step(model, batch)[0],
                                 said.append)
    finally:
        assert not adapter.adapter_layers(model)  # the probe's adapter taken off again
    return fit, said


def test_auto_micro_batch_takes_the_largest_that_fits(monkeypatch, processor):
    fit, said = micro_batch_on(monkeypatch, processor, rows=8)
    assert fit == 8
    assert "--micro-batch-size 8, the largest that fits" in said[0]


def test_a_micro_batch_that_does_not_fit_stops_the_run_naming_the_cures(monkeypatch, processor):
    with pytest.raises(memory.DoesNotFit) as refusal:
        micro_batch_on(monkeypatch, processor, rows=4, micro_batch_size=16)
    message = str(refusal.value)
    assert "--micro-batch-size 16" in message and "--micro-batch-size 4 fits" in message
    assert "--gradient-checkpointing" in message and "\n" not in message
    with pytest.raises(memory.DoesNotFit, match="one row .* add --gradient-checkpointing"):
        micro_batch_on(monkeypatch, processor, rows=0)
