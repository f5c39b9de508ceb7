"""The purified teacher recorded while the examples are made (METHOD.md 3): exact, sparse, and
enough to train.

The recorded teacher is compared with the online one (seed_step's clean and distorted teacher
passes, adapter off) given the very noise each example was made with, on LLaVA, InternVL with tiles
of different counts and Qwen2-VL; the sparse losses with the dense ones; a recorded SEED step, a
recorded self_evolve under resume, and the bytes it costs.
"""
import json

import pytest
import torch
from PIL import Image

import adapter
import decode
import losses
import models
import purge
import runs
import seed
from conftest import tiny_internvl, tiny_internvl_processor, tiny_qwen_vl, tiny_qwen_vl_processor

NOISE_STEP = 600


def to_sparse(dense):
    """A dense purified teacher (voids at -inf) as its list: (ids, logits), (N, K), padded with
    -inf."""
    kept = torch.isfinite(dense)
    width = int(kept.sum(-1).max())
    ids = torch.zeros(dense.shape[0], width, dtype=torch.long)
    logits = torch.full((dense.shape[0], width), float("-inf"))
    for row in range(dense.shape[0]):
        where = kept[row].nonzero().flatten()
        ids[row, :len(where)], logits[row, :len(where)] = where, dense[row, where]
    return ids, logits


def densify(ids, logits, vocabulary):
    """The dense teacher of a list: its logits at its ids, -inf (a void) everywhere else."""
    dense = torch.full((ids.shape[0], vocabulary), float("-inf"))
    kept = torch.isfinite(logits)  # padding (any id, -inf) writes nothing
    rows = torch.arange(ids.shape[0])[:, None].expand_as(ids)
    dense[rows[kept], ids[kept]] = logits[kept]
    return dense


@pytest.mark.parametrize("pair", [("reverse_kl", "sparse_reverse_kl"),
                                  ("forward_kl", "sparse_forward_kl"),
                                  ("void_mass", "sparse_void_mass")])
def test_the_sparse_losses_equal_the_dense_ones_in_value_and_gradient(pair):
    torch.manual_seed(0)
    clean, distorted = 3 * torch.randn(9, 300), 3 * torch.randn(9, 300)
    teacher = purge.purify(clean, distorted)
    # voids and modes
    assert torch.isinf(teacher).any(-1).all() and (torch.isfinite(teacher).sum(-1) > 1).any()
    ids, logits = to_sparse(teacher)
    student = torch.randn(9, 300, requires_grad=True)
    dense_fn, sparse_fn = getattr(losses, pair[0]), getattr(losses, pair[1])
    extra = {"eps": 1e-4} if pair[0] == "reverse_kl" else {}
    dense = dense_fn(student, teacher, **extra)
    (dense_grad,) = torch.autograd.grad(dense, student)
    sparse = sparse_fn(student, ids, logits, **extra)
    (sparse_grad,) = torch.autograd.grad(sparse, student)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-4, atol=1e-7)
    # a list missing one kept token is another teacher: the test would see it
    if pair[0] != "void_mass":
        short = logits.clone()
        short[:, 0] = float("-inf")
        assert not torch.allclose(sparse_fn(student, ids, short, **extra), dense)


def family(name):
    """(model, processor, images) of one family; images of different sizes (InternVL: 1 and 5
    tiles)."""
    g = torch.Generator().manual_seed(0)
    sizes = {"llava": [(32, 32)] * 3, "internvl": [(40, 40), (160, 40), (40, 40)],
             "qwen2_vl": [(32, 32), (64, 40), (40, 100)]}[name]
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
              for w, h in sizes]
    if name == "llava":  # the toy world's trained base model: peaked distributions, small kept sets
        import toyworld

        path, world = toyworld.build()
        model, processor = models.load_model(path)
        return model, processor, toyworld.unlabeled_images(world, 3, seed=5)
    if name == "internvl":
        processor = tiny_internvl_processor()
        return tiny_internvl(len(processor.tokenizer), processor.image_token_id), processor, images
    processor = tiny_qwen_vl_processor()
    return tiny_qwen_vl(processor, "qwen2_vl"), processor, images


@pytest.mark.parametrize("name", ["llava", "internvl", "qwen2_vl"])
def test_the_recorded_teacher_equals_the_online_one_given_the_examples_noise(name):
    """At every response position, the end token's included: the same kept tokens and the same
    purified logits (to 1e-4: the decoding loop's cached, left-padded passes against the step's full
    right-padded ones), once the adapter has moved (the teacher is the base all the same)."""
    model, processor, images = family(name)
    names = ["cat", "dog", "car", "tree"]
    examples = seed.make_examples(model, processor, images, names, probes_per_image=2,
                                  max_new_tokens=5, noise_step=NOISE_STEP, batch_size=2)
    assert all(e["response"][-1] == processor.tokenizer.eos_token_id for e in examples)
    adapter.add_adapter(model, rank=4, alpha_r=8.0)
    with torch.no_grad():  # a student away from the base: the teacher must not follow it
        for layer in adapter.adapter_layers(model).values():
            layer.B.normal_(0, 0.5)
    batch = seed.collate(examples, processor, images)
    net = models.transformers_model(model)
    batch["distorted_pixel_values"] = models.distort_per_question(
        net, batch["pixel_values"], batch["input_ids"], NOISE_STEP,
        # the draw each example was made with
        [decode.seeded_generator(*e["noise"]) for e in examples])
    _, online, student = seed.seed_step(model, batch, "reverse", noise_step=NOISE_STEP)
    recorded = densify(batch["teacher_ids"], batch["teacher_logits"], online.shape[-1])
    assert online.shape[0] == sum(len(e["response"]) for e in examples)
    # Decoding never emits an image placeholder: it is a void there, and the cut is taken among the
    # tokens that may be emitted. So the recorded teacher is purify of the online teacher's own two
    # passes with the placeholders cut first, and the online one purify of the same passes, uncut.
    placeholders = models.placeholder_token_ids(model, processor)
    with torch.no_grad(), adapter.adapter_disabled(model):
        grid = batch.get("image_grid_thw")
        at = models.position_ids(net, batch["input_ids"], batch["attention_mask"], grid)
        z, z_distorted = (seed.response_logits(net, batch["input_ids"], batch["attention_mask"], at,
                                               models.image_features(net, pixels, grid),
                                               batch["response_mask"])
                          for pixels in (batch["pixel_values"], batch["distorted_pixel_values"]))
    expected = purge.purify(z.index_fill(-1, torch.tensor(placeholders), float("-inf")),
                            z_distorted)
    assert torch.equal(torch.isfinite(recorded), torch.isfinite(expected))
    torch.testing.assert_close(recorded[torch.isfinite(expected)],
                               expected[torch.isfinite(expected)], rtol=1e-4, atol=1e-4)
    as_online = purge.purify(z, z_distorted)
    assert torch.equal(torch.isfinite(online), torch.isfinite(as_online))
    torch.testing.assert_close(online[torch.isfinite(online)], as_online[torch.isfinite(online)],
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(student, z, atol=1e-2)  # the student has moved; the teacher has not


def test_a_recorded_step_is_the_students_pass_with_the_sparse_loss(llava, processor):
    model, _, images = family("llava")
    examples = seed.make_examples(model, processor, images, ["cat", "dog"], probes_per_image=1,
                                  max_new_tokens=4, noise_step=NOISE_STEP)
    params = adapter.add_adapter(model, rank=4, alpha_r=8.0)
    batch = seed.collate(examples, processor, images)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        loss, (ids, logits), student = seed.recorded_seed_step(model, batch, "reverse",
                                                               void_eps=1e-4)
        torch.testing.assert_close(
            loss, losses.reverse_kl(student, densify(ids, logits, student.shape[-1]), eps=1e-4))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert moved and all(".A" in n or ".B" in n for n in moved)


def test_the_examples_log_holds_the_teacher_compactly_and_resumes_it(tmp_path):
    model, processor, images = family("llava")
    log = str(tmp_path / "examples.jsonl")
    settings = dict(probes_per_image=2, max_new_tokens=6, noise_step=NOISE_STEP)
    made_with = seed.example_settings(images, **settings)
    whole = seed.make_examples(model, processor, images, ["cat", "dog"], batch_size=2,
                               answer=runs.examples_log(log, made_with, batch_size=2), **settings)
    lines = open(log).read().splitlines()
    with open(log, "w") as f:  # a run that stopped after three records, mid-way through the fourth
        f.write("\n".join(lines[:3]) + "\n" + lines[3][:40])
    resumed = seed.make_examples(model, processor, images, ["cat", "dog"], batch_size=2,
                                 answer=runs.examples_log(log, made_with, batch_size=2), **settings)
    assert resumed == whole and open(log).read().splitlines() == lines
    # 4 + 4 bytes a kept token, in base64: nothing more
    for record in (json.loads(line) for line in lines):
        counts = record["teacher"]["counts"]
        assert len(counts) == len(record["response"]) + 1  # every answer token and the end token
        for field in ("ids", "logits"):
            assert len(record["teacher"][field]) == 4 * -(-4 * sum(counts) // 3)
