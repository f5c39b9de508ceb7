"""eval_chair.py: the metric's word rules case by case, its figures against a hand count on a
COCO-format folder written here, and build / answer / score as a user runs them."""
import json
import os
import subprocess
import sys

import pytest

import eval_chair
import replica

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TABLE = os.path.join(ROOT, "..", "shared", "data", "chair", "synonyms.txt")


def categories(text):
    return [category for _, category in eval_chair.mentions(text)]


@pytest.mark.skipif(not os.path.isfile(SHARED_TABLE), reason="the published table lives in "
                    "../shared/data/chair")
def test_the_synonym_table_is_the_published_one_byte_for_byte():
    with open(SHARED_TABLE, "rb") as a, open(eval_chair.SYNONYMS, "rb") as b:
        assert a.read() == b.read()


def test_the_table_reads_as_published_quirks_included():
    table = eval_chair.CATEGORY_OF
    assert len(set(table.values())) == 80
    assert table["puppy"] == "dog" and table["sofa"] == "couch" and table["bow tie"] == "tie"
    # kept as published: entries with a leading space, and one with a capital, never match a word
    assert table[" motor bike"] == "motorcycle" and table[" cheesecake"] == "cake"
    assert categories("a motor bike, a cheesecake and an iPhone") == []
    assert categories("a motorbike, a cupcake and a phone") == ["motorcycle", "cake",
                                                                "cell phone"]


@pytest.mark.parametrize("text,expected", [
    # plurals, regular and irregular
    ("two dogs and three cats", ["dog", "cat"]),
    ("men, women and children", ["person", "person", "person"]),
    ("buses on the road, a bus", ["bus", "bus"]),
    ("ties and a bow tie", ["tie", "tie"]),
    ("knives, forks, spoons", ["knife", "fork", "spoon"]),
    ("mice near the keyboards", ["mouse", "keyboard"]),
    ("geese and puppies", ["bird", "dog"]),
    ("skis and scissors", ["skis", "scissors"]),
    ("sandwiches on benches with couches", ["sandwich", "bench", "couch"]),
    ("bananas, pizzas and giraffes", ["banana", "pizza", "giraffe"]),
    ("calves and oxen", ["cow", "cow"]),
    # two-word names, merged left to right
    ("a hot dog and a dog", ["hot dog", "dog"]),
    ("teddy bears beside a bear", ["teddy bear", "bear"]),
    ("two traffic lights and a stop sign", ["traffic light", "stop sign"]),
    ("wine glasses on a dining table", ["wine glass", "dining table"]),
    ("a tennis racket", ["tennis racket"]),
    ("a cell phone and a laptop computer", ["cell phone", "laptop"]),
    # the original's special cases
    ("a baby elephant and an adult giraffe", ["elephant", "giraffe"]),
    ("a baby in a crib", ["person"]),
    ("a passenger jet and a passenger train", ["airplane", "train"]),
    ("a passenger on the bus", ["person", "bus"]),
    ("the toilet seat is up", ["toilet"]),
    ("a seat next to the toilet, and another seat", ["toilet"]),
    ("a seat and a chair", ["chair", "chair"]),
    ("the train tracks and home plate", []),
    # negations still count, every occurrence counts
    ("there is no dog in the image", ["dog"]),
    ("a dog, a cat and another dog", ["dog", "cat", "dog"]),
    # possessives and sentence punctuation
    ("the dog's bowl.", ["dog", "bowl"]),
    ("A CAT! A car? (a truck)", ["cat", "car", "truck"]),
    # verb forms never count
    ("a man is skiing; a woman is training; a born leader", ["person", "person"]),
])
def test_the_word_rules_case_by_case(text, expected):
    assert categories(text) == expected


def test_singular_by_its_rules():
    cases = {"dogs": "dog", "ties": "tie", "puppies": "puppy", "ladies": "lady", "glasses": "glass",
             "boxes": "box", "benches": "bench", "bus": "bus", "tennis": "tennis", "grass": "grass",
             "vases": "vase", "horses": "horse", "canoes": "canoe", "skiing": "skiing",
             "walked": "walked", "people": "people", "men": "man", "teeth": "tooth"}
    assert {w: eval_chair.singular(w) for w in cases} == cases


def test_words_split_as_nltk_splits_them():
    assert eval_chair.words("The dog's bowl, a T-shirt; don't.") == [
        "the", "dog", "bowl", "a", "t-shirt", "do"]


# ---------------------------------------------------------------------------------------------
# The figures against a hand count

def write_coco(folder):
    """instances_val2014.json and captions_val2014.json for three images."""
    os.makedirs(folder, exist_ok=True)
    categories_ = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"},
                   {"id": 62, "name": "chair"}, {"id": 3, "name": "car"}]
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (11, 22, 33)]
    instances = {"images": images, "categories": categories_, "annotations": [
        {"image_id": 11, "category_id": 1}, {"image_id": 11, "category_id": 18},
        {"image_id": 22, "category_id": 62}, {"image_id": 33, "category_id": 3},
        {"image_id": 33, "category_id": 3}]}
    captions = {"images": images, "annotations": [
        {"image_id": 11, "caption": "A man walks his puppy."},
        {"image_id": 22, "caption": "A chair next to a potted plant."},
        {"image_id": 33, "caption": "Cars parked on a street."}]}
    for name, value in (("instances_val2014.json", instances),
                        ("captions_val2014.json", captions)):
        with open(os.path.join(folder, name), "w") as f:
            json.dump(value, f)


def test_ground_truth_is_the_instances_and_the_reference_captions(tmp_path):
    write_coco(tmp_path)
    truth = eval_chair.ground_truth(str(tmp_path), [11, 22, 33])
    # image 22: its chair annotated, its potted plant only in a reference caption
    assert truth == {11: {"person", "dog"}, 22: {"chair", "potted plant"}, 33: {"car"}}
    with pytest.raises(ValueError, match="image_id 44 is in none of"):
        eval_chair.ground_truth(str(tmp_path), [11, 44])


def test_the_figures_equal_a_hand_count(tmp_path):
    write_coco(tmp_path)
    descriptions = [
        (11, "A man and his dog sit on a bench. The dog is brown."),  # bench hallucinated
        (22, "A chair and a potted plant."),                           # none
        (33, "Two cars and a truck, and a man beside the truck."),      # truck x2, man
        (11, "A cat."),                                                # cat
    ]
    truth = eval_chair.ground_truth(str(tmp_path), [11, 22, 33])
    figures, per = eval_chair.score(descriptions, truth)
    # mentions, every occurrence: 4 (man, dog, bench, dog) + 2 + 4 (car, truck, man, truck) + 1
    assert figures["mentions"] == 11
    # hallucinated: bench; truck, person, truck; cat -> 5 of 11
    assert figures["chair_i"] == pytest.approx(5 / 11)
    assert figures["chair_s"] == pytest.approx(3 / 4)  # all but the second
    # recall: 11 says person, dog of {person, dog}; 22 both of 2; 33 car of 1; 11 again none of 2
    assert figures["recall"] == pytest.approx((2 + 2 + 1 + 0) / (2 + 2 + 1 + 2))
    assert figures["len"] == pytest.approx((13 + 6 + 11 + 2) / 4)  # words, punctuation off
    assert per[2] == {"image_id": 33, "mentions": ["car", "truck", "person", "truck"],
                      "hallucinated": ["truck", "person", "truck"]}


def chair(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "eval_chair.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_score_prints_the_figures_and_writes_each_descriptions_mentions(tmp_path):
    write_coco(tmp_path / "annotations")
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps({"image_id": i, "caption": c}) + "\n" for i, c in [
        (11, "A man and a dog."), (33, "A car and a bus.")]))
    done = chair("score", "--annotations", tmp_path / "annotations", "--captions", captions,
                 "--out", tmp_path / "per.jsonl", "--json", tmp_path / "figures.json")
    assert done.returncode == 0, done.stderr
    assert "CHAIR_s" in done.stdout and "50.0" in done.stdout
    per = [json.loads(line) for line in (tmp_path / "per.jsonl").read_text().splitlines()]
    assert per[1] == {"image_id": 33, "mentions": ["car", "bus"], "hallucinated": ["bus"]}
    assert json.loads((tmp_path / "figures.json").read_text())["chair_i"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("line,message", [
    ('{"image_id": "11", "caption": "a dog"}', "captions.jsonl:2: \"image_id\" must be an integer"),
    ('{"image_id": 11, "caption": 3}', "captions.jsonl:2: \"caption\" must be a string"),
    ('{"image_id": 11, "caption": "a dog"', "captions.jsonl:2: not a JSON line"),
    ('{"image_id": 99, "caption": "a dog"}', "image_id 99 is in none of"),
])
def test_bad_descriptions_are_refused_in_one_line_naming_the_line(tmp_path, line, message):
    write_coco(tmp_path / "annotations")
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"image_id": 11, "caption": "a dog"}\n' + line + "\n")
    done = chair("score", "--annotations", tmp_path / "annotations", "--captions", captions)
    assert done.returncode == 2 and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_score_refuses_a_folder_without_annotations(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.jsonl").write_text('{"image_id": 1, "caption": "x"}\n')
    done = chair("score", "--annotations", tmp_path / "empty", "--captions", tmp_path / "c.jsonl")
    assert done.returncode == 2 and "no instances_*2014.json" in done.stderr


# ---------------------------------------------------------------------------------------------
# build and answer

def test_build_draws_a_seeded_sample_and_keeps_what_exists(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for i in range(20):
        (images / f"COCO_val2014_{i:012d}.jpg").write_bytes(b"")
    done = chair("build", "--images", images, "--out", tmp_path / "s.jsonl", "--count", 5)
    assert done.returncode == 0, done.stderr
    sample = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(sample) == 5 and all(s["image"] == f"COCO_val2014_{s['image_id']:012d}.jpg"
                                    for s in sample)
    assert sample == eval_chair.sample_images(str(images), 5, seed=0)
    assert sample != eval_chair.sample_images(str(images), 5, seed=1)
    again = chair("build", "--images", images, "--out", tmp_path / "s.jsonl", "--count", 3)
    assert again.returncode == 2 and "exists (--overwrite replaces it)" in again.stderr
    assert len((tmp_path / "s.jsonl").read_text().splitlines()) == 5


@pytest.fixture(scope="module")
def coco_replica(tmp_path_factory):
    root = tmp_path_factory.mktemp("chair")
    paths = replica.build(str(root), unlabeled=1, pope_images=3, questions_per_image=1)
    sample = root / "sample.jsonl"
    assert chair("build", "--images", paths["val2014"], "--out", sample).returncode == 0
    return root, paths, sample


@pytest.mark.parametrize("decoding", ["greedy", "vcd-sample"])
def test_answer_describes_every_image_and_resumes_after_the_last(coco_replica, decoding):
    root, paths, sample = coco_replica
    out = root / f"{decoding}.jsonl"
    flags = ["answer", "--model", paths["llava-1.5-7b-replica"], "--sample", sample, "--images",
             paths["val2014"], "--out", out, "--decoding", decoding, "--max-new-tokens", 4,
             "--batch-size", 2, "--device", "cpu"]
    done = chair(*flags)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    ids = [json.loads(line)["image_id"] for line in sample.read_text().splitlines()]
    assert [r["image_id"] for r in records] == ids
    assert all(r["prompt"] == eval_chair.PROMPT and isinstance(r["caption"], str) for r in records)
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:1]))
    again = chair(*flags)
    # the same descriptions, made again only after the first
    assert again.returncode == 0 and out.read_text().splitlines()[1:] == [
        json.dumps(r) for r in records[1:]]
    other = chair(*flags[:-6], "--max-new-tokens", 5, "--batch-size", 2, "--device", "cpu")
    assert other.returncode == 2 and "made with --max-new-tokens 4" in other.stderr
