"""The third family: Qwen2.5-VL and Qwen2-VL (image grids, flattened patches, M-RoPE positions).

Tiny models of the real classes from configs, with Qwen2-VL's real image processor
(tests/conftest.py). Images of different sizes in one batch, so rows have different numbers of image
tokens and padding.
"""
import copy

import pytest
import torch
from PIL import Image

import adapter
import decode
import models
import seed
from conftest import (check_the_teacher_is_the_purified_base, take_seed_steps, tiny_qwen_vl,
                      tiny_qwen_vl_processor)

FAMILIES = ["qwen2_5_vl", "qwen2_vl"]
# 4, 8 and 12 image tokens
IMAGES = [((32, 32), (200, 40, 40)), ((64, 40), (40, 200, 40)), ((40, 100), (40, 40, 200))]


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen_vl_processor()


def images():
    g = torch.Generator().manual_seed(0)
    pictures = []
    for size, colour in IMAGES:  # a colour plus noise, so that the distortion and the image matter
        pixels = (torch.tensor(colour).view(1, 1, 3)
                  + 40 * torch.randn(size[1], size[0], 3, generator=g))
        pictures.append(Image.fromarray(pixels.clamp(0, 255).to(torch.uint8).numpy()))
    return pictures


def examples(processor):
    tok = processor.tokenizer
    return [{"image": 0, "prompt": seed.probe_text("cat"),
             "response": tok(" yes").input_ids + [tok.eos_token_id]},
            {"image": 1, "prompt": "Describe the image.",
             "response": tok(" there is a cat and a dog .").input_ids + [tok.eos_token_id]},
            {"image": 2, "prompt": seed.probe_text("dog"),
             "response": tok(" no").input_ids + [tok.eos_token_id]}]


def test_the_processor_flattens_patches_and_gives_each_image_its_grid(processor):
    batch = seed.collate(examples(processor), processor, images())
    # resized to 16-px multiples
    assert batch["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 8], [1, 12, 4]]
    # a row per patch, two frames each
    assert batch["pixel_values"].shape == (16 + 32 + 48, 3 * 2 * 8 * 8)
    per_row = (batch["input_ids"] == processor.image_token_id).sum(-1).tolist()
    assert per_row == [4, 8, 12]  # a token per 2 x 2 merged patches


def token_types(batch, processor):
    """Qwen's mm_token_type_ids for the full forward of a collated batch: 1 on image tokens."""
    return (batch["input_ids"] == processor.image_token_id).long()


@pytest.mark.parametrize("family", FAMILIES)
def test_response_logits_equal_the_full_forward_at_response_positions(processor, family):
    model = tiny_qwen_vl(processor, family)
    batch = seed.collate(examples(processor), processor, images())
    at = batch["response_mask"][:, 1:]
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                     mm_token_type_ids=token_types(batch, processor)).logits[:, :-1][at]
        features = models.image_features(model, batch["pixel_values"], batch["image_grid_thw"])
        positions = models.position_ids(model, batch["input_ids"], batch["attention_mask"],
                                        batch["image_grid_thw"])
        ours = seed.response_logits(model, batch["input_ids"], batch["attention_mask"], positions,
                                    features, batch["response_mask"])
        # the 1-D positions of the other families would be wrong here: the test can tell them apart
        embeddings = model.get_input_embeddings()(batch["input_ids"]).masked_scatter(
            (batch["input_ids"] == model.config.image_token_id)[..., None], features)
        flat = model.model(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                           position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(
                               min=0)).last_hidden_state
        wrong = model.lm_head(flat[:, :-1][at])
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(wrong, full, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_seed_step_moves_only_the_adapter_and_the_teacher_is_the_purified_base(processor, family):
    model = tiny_qwen_vl(processor, family)
    base = copy.deepcopy(model)
    batch = seed.collate(examples(processor), processor, images())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    take_seed_steps(model, batch, adapter.add_adapter(model, rank=4), lr=2e-2)
    for name, p in model.named_parameters():
        if not name.endswith((".A", ".B")):
            assert torch.equal(p, before[name.replace(".base.", ".")]), name
    noisy = models.distort_images(base, batch["pixel_values"], 600,
                                  torch.Generator().manual_seed(7))
    check_the_teacher_is_the_purified_base(model, base, batch, 7, noisy,
                                           image_grid_thw=batch["image_grid_thw"],
                                           mm_token_type_ids=token_types(batch, processor))


def test_the_distortion_is_one_noise_per_frame_shared_by_its_temporal_copies(processor):
    import purge

    model = tiny_qwen_vl(processor)
    pixels = seed.collate(examples(processor), processor, images())["pixel_values"]
    # a row: channels x temporal copies x 8 x 8 pixels
    frames = pixels.view(pixels.shape[0], 3, 2, 64)
    # a still image: its two copies are one frame
    assert torch.equal(frames[:, :, 0], frames[:, :, 1])
    noisy = models.distort_images(model, pixels, 500,
                                  torch.Generator().manual_seed(0)).view_as(frames)
    abar = purge.noise_schedule()[500].item()
    eps = torch.randn((pixels.shape[0], 3, 1, 64), generator=torch.Generator().manual_seed(0))
    # sqrt(abar) v + sqrt(1 - abar) eps
    expected = abar ** 0.5 * frames[:, :, :1] + (1 - abar) ** 0.5 * eps
    torch.testing.assert_close(noisy, expected.expand_as(frames), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_decoding_equals_transformers_generate_token_for_token(processor, family):
    model = tiny_qwen_vl(processor, family)
    inputs = models.prompt_batch(processor, images(),
                                 ["Is there a cat in the image?", "Describe the image.",
                                  "Is there a dog?"])
    assert (inputs["attention_mask"] == 0).any()  # left padding is really there
    placeholders = models.placeholder_token_ids(model, processor)
    eos = processor.tokenizer.eos_token_id
    with torch.no_grad():
        reference = model.generate(**inputs, max_new_tokens=8, do_sample=False,
                                   suppress_tokens=placeholders, eos_token_id=eos,
                                   pad_token_id=processor.tokenizer.pad_token_id)
    reference = [row[:row.index(eos)] if eos in row else row
                 for row in reference[:, inputs["input_ids"].shape[1]:].tolist()]
    ours = decode.generate(model, inputs, max_new_tokens=8, eos_token_id=eos,
                           suppress_token_ids=placeholders)
    assert ours == reference
    # most rows decode several tokens: positions past the prompt are tested
    assert sum(map(len, ours)) >= 12


@pytest.mark.parametrize("decoding", ["vcd-sample", "vcd-greedy"])
def test_vcd_answers_do_not_depend_on_the_batch(processor, decoding):
    import eval_pope

    model = tiny_qwen_vl(processor)
    texts = ["Is there a cat in the image?", "Describe the image.", "Is there a dog?"]
    generators = lambda rows: [decode.seeded_generator(0, i) for i in rows]  # noqa: E731
    options = dict(eos_token_id=processor.tokenizer.eos_token_id, noise_step=600,
                   suppress_token_ids=models.placeholder_token_ids(model, processor),
                   **eval_pope.DECODINGS[decoding])
    together = decode.generate(model, models.prompt_batch(processor, images(), texts), 6,
                               generators=generators(range(3)), **options)
    alone = [decode.generate(model, models.prompt_batch(processor, [images()[i]], [texts[i]]), 6,
                             generators=generators([i]), **options)[0] for i in range(3)]
    assert together == alone
    if decoding == "vcd-greedy":  # the premise: the contrast changes answers, so the noise matters
        plain = decode.generate(model, models.prompt_batch(processor, images(), texts), 6,
                                **{**options, "contrast": False})
        assert plain != together


def test_self_evolve_and_pope_run_on_qwen_as_on_llava(processor, tmp_path):
    """train.py's loop and POPE answering on a Qwen2.5-VL (AutoProcessor cannot load its processor
    here: the video processor needs torchvision, which does not import beside this CPU torch; with
    it, train.py --model loads the same classes)."""
    import cli
    import eval_pope
    import report
    import train

    model = tiny_qwen_vl(processor)
    pictures = images() * 2
    for i, picture in enumerate(pictures[:3]):
        picture.save(tmp_path / f"val{i}.png")
    questions = [{"question_id": i + 1, "image": f"val{i % 3}.png",
                  "text": f"Is there a {o} in the image?",
                  "label": "yes" if i % 2 else "no"}
                 for i, o in enumerate(["cat", "dog", "cup", "key"])]
    eval_pope.write_jsonl(questions, str(tmp_path / "coco_pope_random.json"))
    config = cli.Config(steps=3, batch_size=4, probes_per_image=2, description_tokens=4,
                        checkpoint_every=0, progress=False, noise_step=500, sample_seeds=1,
                        eval_batch_size=4, out=str(tmp_path))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, history = train.self_evolve(model, processor, [pictures] * config.rounds,
                                       ["cat", "dog", "cup", "key"],
                                       str(tmp_path / "seed"), config, divergence="reverse",
                                       description="Describe the image.")
    assert len(history[0]["log"]) == 3 and all(torch.isfinite(torch.tensor(x["loss"]))
                                               for x in history[0]["log"])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    # the default adapter: every linear layer of the decoder, merged into their weights
    linears = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight",
               "gate_proj.weight", "up_proj.weight", "down_proj.weight")
    assert changed and all(".language_model." in n and n.endswith(linears) for n in changed)
    assert {n.rsplit(".", 2)[-2] for n in changed} == {t.split(".")[0] for t in linears}
    results = report.evaluate(model, processor, {"random": str(tmp_path / "coco_pope_random.json")},
                              str(tmp_path), str(tmp_path / "answers"), config, contrast=True)
    assert 0 <= results["greedy"]["random"]["f1"] <= 1
    assert len(
        eval_pope.read_answers(str(tmp_path / "answers" / "vcd-greedy_random_seed0.jsonl"))) == 4


def test_a_checkpoint_whose_processor_cannot_be_built_is_refused_naming_it(processor, tmp_path):
    # Saved from the torchvision-free processor of these tests, the folder names a processor class
    # AutoProcessor cannot build, and it falls back to the bare tokenizer: refused, not used.
    model = tiny_qwen_vl(processor)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError,
                       match=rf"{tmp_path}: AutoProcessor gave a \w+, not an image-text processor"):
        models.load_model(str(tmp_path))
