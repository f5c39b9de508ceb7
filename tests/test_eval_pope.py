"""eval_pope.py: the official files, the official parser, the metrics, the builder's rules,
resuming."""
import json
import os

import pytest
import torch

import decode
import eval_pope
import models
import runs

POPE_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "pope")


@pytest.mark.skipif(not os.path.isdir(POPE_DIR),
                    reason="the official POPE files live in ../shared/data/pope")
@pytest.mark.parametrize("split", eval_pope.SPLITS)
def test_official_files_load(split):
    questions = eval_pope.load_questions(os.path.join(POPE_DIR, f"coco_pope_{split}.json"))
    assert len(questions) == 3000
    assert sum(q["label"] == "yes" for q in questions) == 1500
    assert len({q["image"] for q in questions}) == 500
    # and they alternate yes / no, as our builder does
    assert [q["label"] for q in questions[:6]] == ["yes", "no"] * 3


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("no", "no"), ("No.", "no"), ("NO", "yes"), ("Yes.", "yes"),
    ("Yes, there is no dog", "no"), ("There is not a dog.", "no"), ("Yes. No.", "yes"),
    ("Nope", "yes"), ("no,", "no"), ("", "yes"), ("I do not know", "no"), ("not", "no"),
    ("Yes, there is a cat. No dog.", "yes"), ("nothing", "yes"),
])
def test_parse_answer_follows_the_official_rule(text, expected):
    assert eval_pope.parse_answer(text) == expected


def test_score_on_hand_built_confusion_matrix():
    labels = ["yes"] * 6 + ["no"] * 4
    predictions = ["yes"] * 4 + ["no"] * 2 + ["yes"] * 1 + ["no"] * 3  # tp 4, fn 2, fp 1, tn 3
    m = eval_pope.score(predictions, labels)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (4, 2, 1, 3)
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["precision"] == pytest.approx(0.8)
    assert m["recall"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 0.8 * (4 / 6) / (0.8 + 4 / 6))
    assert m["yes_ratio"] == pytest.approx(0.5)


def test_score_without_positive_predictions_is_zero_not_a_crash():
    m = eval_pope.score(["no"] * 4, ["yes", "no", "yes", "no"])
    assert m["precision"] == 0.0 and m["f1"] == 0.0 and m["accuracy"] == 0.5 and m[
        "yes_ratio"] == 0.0


ANNOTATIONS = {
    # dog appears in 4 images, cat 3, bird 2, fish 2 (always with dog), car 1 ...
    "a.jpg": ["cat", "tree", "lamp"],
    "b.jpg": ["dog", "fish", "ball"],
    "c.jpg": ["dog", "fish", "cup"],
    "d.jpg": ["dog", "cat", "bird"],
    "e.jpg": ["dog", "cat", "bird", "car"],
    "f.jpg": ["cup"],  # fewer than 3 objects: skipped
}


def by_image(records):
    grouped = {}
    for r in records:
        grouped.setdefault(r["image"], []).append(r)
    return grouped


@pytest.mark.parametrize("split", eval_pope.SPLITS)
def test_builder_follows_the_format_and_the_rules(split):
    records = eval_pope.build_questions(ANNOTATIONS, split, per_image=3, seed=0)
    assert [r["question_id"] for r in records] == list(range(1, len(records) + 1))
    assert set(by_image(records)) == {"a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"}
    for image, rs in by_image(records).items():
        assert [r["label"] for r in rs] == ["yes", "no"] * 3
        names = [eval_pope.object_in(r["text"]) for r in rs]
        assert all(n in ANNOTATIONS[image] for n in names[0::2])
        negatives = names[1::2]
        assert all(n not in ANNOTATIONS[image] for n in negatives) and len(set(negatives)) == 3
        assert set(records[0]) == {"question_id", "image", "text", "label"}
    assert eval_pope.build_questions(ANNOTATIONS, split, seed=0) == records  # same seed, same file


def test_popular_negatives_are_the_most_frequent_absent_objects():
    rs = by_image(eval_pope.build_questions(ANNOTATIONS, "popular"))
    # frequency: dog 4, cat 3, bird 2, cup 2, fish 2, then singletons; ties broken by name
    assert [r["text"] for r in rs["a.jpg"][1::2]] == [eval_pope.question_for(n)
                                                      for n in ("dog", "bird", "cup")]
    assert [r["text"] for r in rs["b.jpg"][1::2]] == [eval_pope.question_for(n)
                                                      for n in ("cat", "bird", "cup")]


def test_adversarial_negatives_co_occur_most_with_their_positive():
    annotations = {f"{i}.jpg": ["cat", "dog", "tree"] for i in range(3)}
    annotations.update({f"{i}.jpg": ["fish", "boat", "sea"] for i in range(3, 5)})
    annotations.update({"6.jpg": ["cat", "dog", "car"], "7.jpg": ["fish", "boat", "lamp"]})
    rs = by_image(eval_pope.build_questions(annotations, "adversarial"))
    name = lambda r: eval_pope.object_in(r["text"])
    pairs = [(name(p), name(n)) for p, n in zip(rs["6.jpg"][0::2], rs["6.jpg"][1::2])]
    # tree co-occurs 3x with cat and dog: it follows whichever of them comes first; the rest fall
    # back to the most frequent absent objects (boat, fish: 3 images each, ties by name).
    assert {n for _, n in pairs} == {"tree", "boat", "fish"}
    first = next(p for p in pairs if p[0] in ("cat", "dog"))
    assert first[1] == "tree"
    pairs = [(name(p), name(n)) for p, n in zip(rs["7.jpg"][0::2], rs["7.jpg"][1::2])]
    assert "sea" == next(n for p, n in pairs if p in ("fish", "boat"))


def test_an_before_a_vowel():
    assert eval_pope.question_for("apple") == "Is there an apple in the image?"
    assert eval_pope.question_for("dog") == "Is there a dog in the image?"


def test_object_in_inverts_question_for():
    for name in ["apple", "dog", "traffic light", "hair drier", "anvil cat"]:
        assert eval_pope.object_in(eval_pope.question_for(name)) == name
    with pytest.raises(ValueError, match="not a POPE question"):
        eval_pope.object_in("Describe the image.")

    # the names SEED probes real checkpoints with by default
    assert len(set(eval_pope.COCO_OBJECTS)) == 80
    if os.path.isdir(POPE_DIR):  # every official question asks about one of them
        questions = eval_pope.load_questions(os.path.join(POPE_DIR, "coco_pope_adversarial.json"))
        assert {eval_pope.object_in(q["text"]) for q in questions} <= set(eval_pope.COCO_OBJECTS)


def test_bad_question_files_name_the_file_and_line(tmp_path):
    bad = tmp_path / "q.json"
    bad.write_text(
        '{"question_id": 1, "image": "x.png", "text": "Is there a cat in the image?"}\n{oops\n')
    with pytest.raises(ValueError, match=r"q.json:2: not a JSON line"):
        eval_pope.load_questions(bad)
    bad.write_text('{"question_id": 7, "text": "Is there a cat in the image?"}\n')
    with pytest.raises(ValueError, match=r"q.json:1: question_id 7 lacks \['image'\]"):
        eval_pope.load_questions(bad)
    bad.write_text("\n")
    with pytest.raises(ValueError, match="no questions"):
        eval_pope.load_questions(bad)


def test_score_files_names_missing_and_extra_ids(tmp_path):
    questions = [{"question_id": i, "image": "x.png", "text": "Is there a cat in the image?",
                  "label": "yes"}
                 for i in (1, 2, 3)]
    eval_pope.write_jsonl(questions, tmp_path / "q.json")
    eval_pope.write_jsonl([{"question_id": 1, "text": "Yes"}, {"question_id": 2, "text": "No"}],
                          tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="no answer for question_id 3"):
        eval_pope.score_files(tmp_path / "q.json", tmp_path / "a.jsonl")
    eval_pope.write_jsonl([{"question_id": i, "text": "Yes"} for i in (1, 2, 3, 9)],
                          tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match="question_id 9 is not a question there"):
        eval_pope.score_files(tmp_path / "q.json", tmp_path / "a.jsonl")


# ---------------------------------------------------------------------------------------------
# answer: end to end on a tiny real LLaVA with a local tokenizer and processor

@pytest.fixture
def question_set(tmp_path):
    import toyworld

    world = toyworld.make_world(0)
    return toyworld.write_eval_set(world, str(tmp_path / "pope"),
                                   n_images=6), str(tmp_path / "pope" / "images")


@pytest.mark.parametrize("decoding", sorted(eval_pope.DECODINGS))
def test_answer_end_to_end_on_tiny_llava(llava, processor, question_set, tmp_path, decoding):
    files, images = question_set
    out = str(tmp_path / "answers.jsonl")
    answers = eval_pope.answer_questions(llava, processor, files["random"], images, out, decoding,
                                         batch_size=5, max_new_tokens=3, progress=False)
    questions = eval_pope.load_questions(files["random"])
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
    assert all(a["prompt"].endswith(eval_pope.PROMPT_SUFFIX) and isinstance(a["text"], str)
               for a in answers)
    metrics = eval_pope.score_files(files["random"], out)
    assert metrics["tp"] + metrics["fp"] + metrics["tn"] + metrics["fn"] == len(questions)


def test_answers_do_not_depend_on_batch_size(llava, processor, question_set, tmp_path):
    files, images = question_set
    runs = []
    for batch_size in (1, 7):
        out = str(tmp_path / f"a{batch_size}.jsonl")
        runs.append(eval_pope.answer_questions(llava, processor, files["popular"], images, out,
                                               "vcd-sample", batch_size=batch_size,
                                               max_new_tokens=4, seed=3, progress=False))
    assert [a["text"] for a in runs[0]] == [a["text"] for a in runs[1]]


def test_resume_after_a_crash_leaves_no_duplicate_and_no_gap(llava, processor, question_set,
                                                             tmp_path):
    files, images = question_set
    full = str(tmp_path / "full.jsonl")
    eval_pope.answer_questions(llava, processor, files["random"], images, full, "sample",
                               batch_size=4, max_new_tokens=3, progress=False)
    crashed = str(tmp_path / "crashed.jsonl")
    lines = open(full).read().splitlines(keepends=True)
    with open(crashed, "w") as f:  # 9 answers written, then a crash in the middle of the 10th line
        f.writelines(lines[:9])
        f.write(lines[9][:15])
    resumed = eval_pope.answer_questions(llava, processor, files["random"], images, crashed,
                                         "sample", batch_size=4, max_new_tokens=3, progress=False)
    ids = [json.loads(line)["question_id"] for line in open(crashed)]
    assert ids == sorted(set(ids)) and len(ids) == len(lines)
    assert open(crashed).read() == open(full).read()  # seeded per question: the same answers
    assert len(resumed) == len(lines)


def test_a_missing_image_names_file_line_and_question(llava, processor, question_set, tmp_path):
    files, images = question_set
    questions = eval_pope.load_questions(files["random"])
    # the last image: earlier batches succeed
    os.remove(os.path.join(images, questions[-1]["image"]))
    out = str(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match=rf"{questions[-1]['image']}: cannot read the image"):
        eval_pope.answer_questions(llava, processor, files["random"], images, out, "greedy",
                                   batch_size=2, max_new_tokens=2, progress=False)
    assert len(open(out).read().splitlines()) >= 2  # the batches answered before the error are kept


def test_cli_build_and_score(tmp_path, capsys):
    objects = tmp_path / "objects.json"
    objects.write_text(json.dumps(ANNOTATIONS))
    eval_pope.main(["build", "--objects", str(objects), "--out", str(tmp_path), "--prefix", "t"])
    q = tmp_path / "t_pope_random.json"
    records = eval_pope.load_questions(q)
    eval_pope.write_jsonl([{"question_id": r["question_id"], "text": "Yes"} for r in records],
                          tmp_path / "a.jsonl")
    eval_pope.main(["score", "--questions", str(q), "--answers", str(tmp_path / "a.jsonl"),
                    "--json", str(tmp_path / "m.json")])
    table = capsys.readouterr().out
    assert "accuracy" in table and "yes-ratio" in table
    metrics = json.loads((tmp_path / "m.json").read_text())[str(tmp_path / "a.jsonl")]
    assert metrics["yes_ratio"] == 1.0 and metrics["recall"] == 1.0 and metrics["precision"] == 0.5


def test_cli_answer_passes_the_contrast_flags_to_vcd_decoding(llava, processor, tmp_path,
                                                              generate_calls):
    from PIL import Image

    llava.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "im.png")
    eval_pope.write_jsonl([{"question_id": 0, "image": "im.png",
                            "text": "Is there a cat in the image?",
                            "label": "yes"}], tmp_path / "q.json")
    common = ["answer", "--model", str(tmp_path / "model"), "--questions", str(tmp_path / "q.json"),
              "--images", str(tmp_path), "--device", "cpu", "--max-new-tokens", "2"]
    eval_pope.main(common + ["--out", str(tmp_path / "vcd.jsonl"), "--decoding", "vcd-greedy",
                             "--alpha", "0.5", "--beta", "0.2", "--noise-step", "700"])
    eval_pope.main(common + ["--out", str(tmp_path / "greedy.jsonl"), "--decoding", "greedy"])
    assert generate_calls == [{"contrast": True, "alpha": 0.5, "beta": 0.2, "noise_step": 700},
                              {"contrast": None, "alpha": None, "beta": None, "noise_step": None}]
    assert len(eval_pope.read_answers(str(tmp_path / "vcd.jsonl"))) == 1


# ---------------------------------------------------------------------------------------------
# Reading answers for a score never changes the file; only a resuming writer cuts a torn last line

MADE_WITH = {"decoding": "greedy"}


def sixty_answers(tmp_path):
    questions = [{"question_id": i, "image": "x.png", "text": "Is there a cat in the image?",
                  "label": "yes" if i % 2 else "no"} for i in range(1, 61)]
    eval_pope.write_jsonl(questions, tmp_path / "q.json")
    lines = [json.dumps({"question_id": i, "text": "Yes" if i % 3 else "No",
                         "made_with": MADE_WITH}) + "\n" for i in range(1, 61)]
    return str(tmp_path / "q.json"), lines


def test_scoring_never_changes_the_answers_file(tmp_path):
    questions, lines = sixty_answers(tmp_path)
    expected = eval_pope.score([eval_pope.parse_answer(json.loads(l)["text"]) for l in lines],
                               ["yes" if i % 2 else "no" for i in range(1, 61)])
    # a blank line after the 10th answer
    with_blank = "".join(lines[:10]) + "\n" + "".join(lines[10:])
    no_final_newline = "".join(lines).rstrip("\n")  # the last answer without its newline
    for name, text in (("blank.jsonl", with_blank), ("no_newline.jsonl", no_final_newline)):
        path = tmp_path / name
        path.write_bytes(text.encode())
        assert eval_pope.score_files(questions, str(path)) == expected  # all 60 answers scored
        assert path.read_bytes() == text.encode(), name  # byte for byte as it was


def test_a_bad_answer_line_is_an_error_naming_file_and_line_and_changes_nothing(tmp_path):
    questions, lines = sixty_answers(tmp_path)
    path = tmp_path / "a.jsonl"
    text = "".join(lines[:5]) + "{oops\n" + "".join(lines[5:])
    path.write_text(text)
    with pytest.raises(ValueError, match=r"a.jsonl:6: not a JSON line"):
        eval_pope.score_files(questions, str(path))
    with pytest.raises(ValueError, match=r"a.jsonl:6: not a JSON line"):
        # not a torn *final* line: the writer does not cut it either
        runs.resume_records(str(path), MADE_WITH)
    assert path.read_text() == text
    with pytest.raises(ValueError, match=r"missing.jsonl: no such file"):
        eval_pope.score_files(questions, str(tmp_path / "missing.jsonl"))


def test_resuming_cuts_only_a_torn_final_line_and_says_so(tmp_path, capsys):
    _, lines = sixty_answers(tmp_path)
    path = tmp_path / "a.jsonl"
    # a blank line, then a crash mid-write
    path.write_text("".join(lines[:7]) + "\n" + lines[7][:12])
    answers = runs.resume_records(str(path), MADE_WITH)
    assert [a["question_id"] for a in answers] == list(range(1, 8))
    assert path.read_text() == "".join(lines[:7]) + "\n"  # the blank line stays, the torn line goes
    assert "cut a torn last line" in capsys.readouterr().err


def test_the_three_splits_share_their_yes_questions():
    positives = {}
    for split in eval_pope.SPLITS:
        records = eval_pope.build_questions(ANNOTATIONS, split, seed=4)
        positives[split] = [(r["image"], r["text"]) for r in records if r["label"] == "yes"]
    assert positives["random"] == positives["popular"] == positives["adversarial"]
    assert len(positives["random"]) == 15


# ---------------------------------------------------------------------------------------------
# VCD decoding: the contrast of independent full passes at every position; the batch does not matter

def full_pass_logits(model, inputs, generated, pixel_values):
    """Last-position logits of one uncached forward pass over the prompt plus the tokens so far."""
    input_ids = torch.cat([inputs["input_ids"], torch.tensor(generated, dtype=torch.long).reshape(
        len(inputs["input_ids"]), -1)], dim=1)
    attention_mask = torch.cat([inputs["attention_mask"],
                                torch.ones_like(input_ids[:, inputs["input_ids"].shape[1]:])],
                               dim=1)
    # left padding: positions count real tokens
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     pixel_values=pixel_values).logits[:, -1].float()


@pytest.mark.parametrize("sample", [False, True])
def test_vcd_tokens_are_purify_of_independent_full_passes_at_every_position(llava, llava_inputs,
                                                                            sample):
    import purge

    steps, noise_step, alpha, beta = 5, 600, 1.5, 0.05
    seeds = [11, 12]
    ids = decode.generate(llava, llava_inputs, steps, sample=sample, contrast=True, alpha=alpha,
                          beta=beta, noise_step=noise_step,
                          generators=[torch.Generator().manual_seed(s) for s in seeds])
    # The same noise, drawn independently: each question's image is distorted by its own
    # generator, which then samples.
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    clean_pixels = llava_inputs["pixel_values"]
    distorted_pixels = torch.cat(
        [purge.distort(p[None], noise_step, g) for p, g in zip(clean_pixels, generators)])
    placeholder = llava.config.image_token_id
    expected = [[], []]
    for _ in range(steps):
        prefix = [row for row in expected]
        clean = full_pass_logits(llava, llava_inputs, prefix, clean_pixels)
        clean[:, placeholder] = float("-inf")  # the placeholder is never an answer token
        distorted = full_pass_logits(llava, llava_inputs, prefix, distorted_pixels)
        purified = purge.purify(clean, distorted, alpha, beta)
        token = decode._sample_next(purified, generators, 1.0,
                                    1.0) if sample else purified.argmax(-1)
        for row, t in zip(expected, token.tolist()):
            row.append(t)
    assert ids == expected


def biased_toward_the_placeholder(model):
    """The same model with a bias on its output layer that makes the image placeholder its
    argmax."""
    old = model.get_output_embeddings()
    head = torch.nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[model.config.image_token_id] = 1e3
    model.lm_head = head
    return model


@pytest.mark.parametrize("decoding", sorted(eval_pope.DECODINGS))
def test_decoding_never_emits_the_image_placeholder(llava, llava_inputs, decoding):
    model = biased_toward_the_placeholder(llava)
    with torch.no_grad():
        assert (model(**llava_inputs).logits[:, -1].argmax(-1) == model.config.image_token_id).all()
    ids = decode.generate(model, llava_inputs, 4, **eval_pope.DECODINGS[decoding])
    assert all(model.config.image_token_id not in row for row in ids) and all(len(row) == 4
                                                                              for row in ids)


@pytest.mark.parametrize("decoding", ["greedy", "vcd-greedy", "vcd-sample"])
def test_internvl_answers_do_not_depend_on_the_batch_when_tile_counts_differ(decoding):
    from PIL import Image

    from conftest import tiny_internvl, tiny_internvl_processor

    processor = tiny_internvl_processor()
    model = tiny_internvl(len(processor.tokenizer), processor.image_token_id)
    images = [Image.new("RGB", (40, 40), (200, 60, 60)), Image.new("RGB", (160, 40), (60, 200, 60)),
              Image.new("RGB", (40, 100), (60, 60, 200))]
    texts = [eval_pope.question_for(n) + eval_pope.PROMPT_SUFFIX for n in ("cat", "dog", "tree")]

    # A strong contrast at heavy noise, so that on this untrained model the noise moves the answers
    contrast = dict(alpha=3.0, beta=0.01, noise_step=900) if "vcd" in decoding else {}

    def answer(indices, seed=100):
        inputs = models.prompt_batch(processor, [images[i] for i in indices],
                                     [texts[i] for i in indices])
        return inputs["pixel_values"].shape[0], decode.generate(
            model, inputs, 6, generators=[torch.Generator().manual_seed(seed + i) for i in indices],
            suppress_token_ids=models.placeholder_token_ids(model, processor),
            **eval_pope.DECODINGS[decoding], **contrast)

    alone = [answer([i]) for i in range(3)]
    # square: one tile; wide 4:1: 4 + thumbnail; 2.5:1: 3 + 1
    assert [tiles for tiles, _ in alone] == [1, 5, 4]
    tiles, together = answer([0, 1, 2])
    assert tiles == 10 and together == [ids[0] for _, ids in alone]
    # the premise: other noise gives other answers, so noise from another question would show
    if contrast:
        assert answer([0, 1, 2], seed=7)[1] != together
