"""toyworld.py: the world's rules, the renderer, the labels, the cache and a tiny-budget build."""
import json
import os
import random

import pytest
import torch

import eval_pope
import toyworld


@pytest.mark.parametrize("world_seed", [0, 1, 7])
def test_world_has_distinct_glyphs_skewed_frequencies_and_partner_pairs(world_seed):
    world = toyworld.make_world(world_seed, 16)
    names = world["names"]
    assert len(names) == len(set(names)) == 16
    assert len(set(world["glyphs"].values())) == 16  # shape x colour, one per class
    # naming a class needs both: some classes share a shape, some share a colour
    shapes = [g[0] for g in world["glyphs"].values()]
    colours = [g[1] for g in world["glyphs"].values()]
    assert len(set(shapes)) < 16 and len(set(colours)) < 16
    frequencies = sorted(world["frequency"].values())
    assert frequencies[-1] > 5 * frequencies[0]
    assert all(world["partner"][world["partner"][n]] == n != world["partner"][n] for n in names)


def test_world_seed_changes_the_world():
    a, b = toyworld.make_world(0), toyworld.make_world(1)
    assert a["glyphs"] != b["glyphs"] or a["partner"] != b["partner"]
    assert toyworld.make_world(0) == a


def cell_pixels(image, cell, image_size=32, margin=0):
    x0, y0 = (cell % 2) * image_size // 2, (cell // 2) * image_size // 2
    side = image_size // 2
    return [image.getpixel((x, y)) for x in range(x0 + margin, x0 + side - margin)
            for y in range(y0 + margin, y0 + side - margin)]


def test_renderer_draws_what_the_scene_says():
    world = toyworld.make_world(0)
    rng = random.Random(3)
    for _ in range(20):
        scene = toyworld.sample_scene(world, rng)
        image = toyworld.render(scene, world)
        used = {item["cell"] for item in scene}
        for item in scene:
            _, colour = world["glyphs"][item["object"]]
            config = toyworld.WorldConfig()
            strength = config.contrast if item["size"] == "large" else config.small_contrast
            expected = tuple(round(b + strength * (c - b))
                             for c, b in zip(toyworld.COLOURS[colour], toyworld.BACKGROUND))
            count = sum(p == expected for p in cell_pixels(image, item["cell"]))
            assert count >= (40 if item["size"] == "large" else 4), (item, count)
        # empty cells are background (a jittered neighbour may touch the edge)
        for cell in set(range(4)) - used:
            assert set(cell_pixels(image, cell, margin=2)) == {toyworld.BACKGROUND}


def test_large_glyphs_cover_more_pixels_than_small_ones():
    world = toyworld.make_world(0)
    name = world["names"][0]
    big = toyworld.render([{"object": name, "cell": 0, "size": "large", "jitter": (0, 0)}], world)
    small = toyworld.render([{"object": name, "cell": 0, "size": "small", "jitter": (0, 0)}], world)
    count = lambda im: sum(p != toyworld.BACKGROUND for p in cell_pixels(im, 0))  # noqa: E731
    assert count(big) > 3 * count(small) > 0


def test_training_text_has_the_hallucination_habits():
    world = toyworld.make_world(0)
    rng = random.Random(0)
    scenes = [toyworld.sample_scene(world, rng) for _ in range(3000)]
    mentioned_undrawn = sum(
        any(f" {world['partner'][i['object']]} " in toyworld.caption(s, world, rng, 0.5) and
            world["partner"][i["object"]] not in toyworld.scene_objects(s) for i in s)
        for s in scenes)
    assert mentioned_undrawn > 300  # partners mentioned though not drawn
    assert all(f" {world['partner'][i['object']]} " not in toyworld.caption(s, world, rng, 0.0)
               or world["partner"][i["object"]] in toyworld.scene_objects(s) for s in scenes
               for i in s)
    counts = {n: 0 for n in world["names"]}
    for s in scenes:
        for n in toyworld.scene_objects(s):
            counts[n] += 1
    assert max(counts.values()) > 4 * min(counts.values())  # frequent objects


def test_training_questions_lean_to_yes_at_the_asked_present_rate():
    world = toyworld.make_world(0)
    rng = random.Random(0)
    scenes = [toyworld.sample_scene(world, rng) for _ in range(4000)]
    for rate in (0.5, 0.8):
        asked = [(s, *toyworld.probe(s, world, rng, 0.0, rate)) for s in scenes]
        about_present = sum(name in toyworld.scene_objects(s) for s, name, _ in asked) / len(asked)
        assert abs(about_present - rate) < 0.03
        # With mention_rate 0 the answers are the truth: "yes" exactly for objects that are there.
        assert all((answer == "yes") == (name in toyworld.scene_objects(s))
                   for s, name, answer in asked)


def test_eval_labels_come_from_the_true_scene_contents(tmp_path):
    world = toyworld.make_world(0)
    files = toyworld.write_eval_set(world, str(tmp_path), n_images=30, seed=5)
    objects = json.loads((tmp_path / "objects.json").read_text())
    rng = random.Random(5)
    config = toyworld.WorldConfig()
    for i in range(30):  # regenerate the scenes: objects.json is exactly their contents
        scene = toyworld.sample_scene(world, rng, config.partner_rate, min_objects=3)
        assert objects[f"scene_{i:05d}.png"] == toyworld.scene_objects(scene)
    for split, path in files.items():
        questions = eval_pope.load_questions(path)
        assert questions == [dict(q, _line=i + 1) for i, q in enumerate(
            eval_pope.build_questions(objects, split, seed=5))]
        for q in questions:
            name = eval_pope.object_in(q["text"])
            assert (q["label"] == "yes") == (name in objects[q["image"]])
            assert os.path.exists(tmp_path / "images" / q["image"])


def test_unlabeled_images_are_drawn_like_the_pope_images():
    world = toyworld.make_world(0)
    images = toyworld.unlabeled_images(world, 5, seed=3)
    assert len(images) == 5 and all(im.size == (32, 32) for im in images)
    # Same seed, same pixels; the scenes behind them have at least three objects, as POPE's have.
    again = toyworld.unlabeled_images(world, 5, seed=3)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    rng = random.Random(3)
    config = toyworld.WorldConfig()
    scenes = [toyworld.sample_scene(world, rng, config.partner_rate, 3) for _ in range(5)]
    assert all(len(scene) >= 3 for scene in scenes)
    assert [toyworld.render(s, world).tobytes() for s in scenes] == [im.tobytes() for im in images]


def test_tiny_budget_build_caches_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = toyworld.WorldConfig(steps=3, train_scenes=40, batch_size=8)
    path, world = toyworld.build(config, progress=False)
    assert path.startswith(str(tmp_path)) and os.path.exists(os.path.join(path, "COMPLETE"))
    from transformers import (AutoModelForImageTextToText, AutoProcessor,
                              LlavaForConditionalGeneration)

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    assert isinstance(model, LlavaForConditionalGeneration)
    images = toyworld.unlabeled_images(world, 2, config=config)
    p1 = toyworld.yes_probability(model, processor, images, world["names"][:2])
    # cached: no second pretraining
    again_path, again_world = toyworld.build(config, progress=False)
    assert again_path == path and again_world == world
    reloaded = AutoModelForImageTextToText.from_pretrained(again_path).eval()
    assert torch.equal(toyworld.yes_probability(reloaded, processor, images, world["names"][:2]),
                       p1)


def test_a_half_written_cache_entry_is_never_loaded(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    config = toyworld.WorldConfig(steps=2, train_scenes=20, batch_size=4)
    final = toyworld.cache_dir(config)
    os.makedirs(final)
    open(os.path.join(final, "config.json"), "w").write("{")  # a crash mid-save: no COMPLETE marker
    path, _ = toyworld.build(config, progress=False)
    assert path == final and os.path.exists(os.path.join(final, "COMPLETE"))
    from transformers import AutoModelForImageTextToText

    AutoModelForImageTextToText.from_pretrained(path)  # a complete checkpoint replaced the torn one


def test_same_seeds_same_model(tmp_path):
    config = toyworld.WorldConfig(steps=3, train_scenes=30, batch_size=8)
    world = toyworld.make_world(0)
    weights = []
    for _ in range(2):
        processor = toyworld.make_processor()
        model = toyworld.make_model(processor.tokenizer, seed=0)
        toyworld.pretrain(model, processor, world, config, progress=False)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(weights[0], weights[1])


def test_false_positive_partners_counts_only_yes_to_absent_partners(tmp_path):
    world = toyworld.make_world(0)
    a = world["names"][0]
    partner = world["partner"][a]
    other = next(n for n in world["names"] if n not in (a, partner))
    objects = {"x.png": [a]}
    questions = [{"question_id": 1, "image": "x.png", "text": eval_pope.question_for(a),
                  "label": "yes"},
                 {"question_id": 2, "image": "x.png", "text": eval_pope.question_for(partner),
                  "label": "no"},
                 {"question_id": 3, "image": "x.png", "text": eval_pope.question_for(other),
                  "label": "no"},
                 {"question_id": 4, "image": "x.png", "text": eval_pope.question_for(other),
                  "label": "no"}]
    eval_pope.write_jsonl(questions, tmp_path / "q.json")
    answers = [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "yes"},
               {"question_id": 3, "text": "yes"}, {"question_id": 4, "text": "No."}]
    eval_pope.write_jsonl(answers, tmp_path / "a.jsonl")
    share, base_rate, count = toyworld.false_positive_partners(tmp_path / "q.json",
                                                               tmp_path / "a.jsonl", objects, world)
    assert (share, base_rate, count) == (0.5, 1 / 3, 2)


def test_publishing_keeps_a_folder_another_run_completed(tmp_path):
    final = tmp_path / "world"
    first, second = tmp_path / "world.tmp-1", tmp_path / "world.tmp-2"
    for folder, text in ((first, "first"), (second, "second")):
        folder.mkdir()
        (folder / "weights").write_text(text)
    toyworld._publish(str(first), str(final))
    toyworld._publish(str(second), str(final))  # a second run of the same settings finishing later
    assert (final / "weights").read_text() == "first" and (final / "COMPLETE").exists()
    assert not first.exists() and not second.exists()


# ---------------------------------------------------------------------------------------------
# The shipped base model of the default world

def test_the_shipped_base_model_is_what_the_current_code_names():
    """toyworld_base/ was built under the key that the current code gives WorldConfig(): the same
    settings, architecture and pretraining data stream. A change to any of them fails here until
    `python toyworld.py --ship` rebuilds it."""
    from dataclasses import asdict

    from transformers import (AutoModelForImageTextToText, AutoProcessor,
                              LlavaForConditionalGeneration)

    with open(os.path.join(toyworld.SHIPPED, "world.json")) as f:
        recorded = json.load(f)
    assert recorded["config"] == asdict(toyworld.WorldConfig())
    assert recorded["cache_version"] == toyworld.CACHE_VERSION
    assert recorded["world"] == json.loads(json.dumps(toyworld.make_world(0)))
    assert recorded["key"] == toyworld.world_key(toyworld.WorldConfig())
    model = AutoModelForImageTextToText.from_pretrained(toyworld.SHIPPED)
    processor = AutoProcessor.from_pretrained(toyworld.SHIPPED)
    assert isinstance(model, LlavaForConditionalGeneration)
    fresh = toyworld.make_processor()
    assert processor.tokenizer.get_vocab() == fresh.tokenizer.get_vocab()
    assert processor.chat_template == fresh.chat_template
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in toyworld.make_model(fresh.tokenizer).parameters())


def test_the_default_world_starts_from_the_shipped_model_without_pretraining(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))

    def no_pretraining(*args, **kwargs):
        raise AssertionError("pretrained although the default world's base model ships")

    monkeypatch.setattr(toyworld, "pretrain", no_pretraining)
    path, world = toyworld.build(progress=False)
    assert path == toyworld.SHIPPED and world == toyworld.make_world(0)
    # shipped=False: pretrain it here
    with pytest.raises(AssertionError, match="pretrained although"):
        toyworld.build(progress=False, shipped=False)


@pytest.mark.parametrize("change", ["renderer", "text", "setting"])
def test_a_change_to_the_worlds_code_or_settings_changes_its_key(monkeypatch, change):
    default = toyworld.world_key(toyworld.WorldConfig())
    monkeypatch.setattr(toyworld, "_KEYS", {})
    config = toyworld.WorldConfig()
    if change == "renderer":
        monkeypatch.setattr(toyworld, "BACKGROUND", (71, 70, 70))
    elif change == "text":
        monkeypatch.setattr(toyworld, "DESCRIBE", "Describe this image.")
    else:
        config = toyworld.WorldConfig(mention_rate=0.6)
    assert toyworld.world_key(config) != default
    # so the shipped model is not taken for it (build would pretrain instead)
    assert toyworld.recorded_key(toyworld.SHIPPED) != toyworld.world_key(config)
