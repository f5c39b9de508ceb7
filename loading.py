"""What each round of SEED reads: the unlabeled images it samples, and its batches prepared ahead.

Paper: SEED (arXiv 2507.04680), METHOD.md 5: every round makes its purified examples from unlabeled
images. The paper says nothing of how many; this file is ours, plumbing that changes no formula:
- a round samples only the images its training draws from (`images_per_round`), fresh images each
  round while the folder has them (`round_samples`), so a run over COCO's 82,783 files makes the
  examples it trains on and not twenty times more;
- batches are prepared on a background thread while the model computes (`prefetched`): reading and
  preprocessing a COCO photo takes about as long as a GPU's pass over it.
"""
import hashlib
import json
import math
import os
import queue
import random
import threading

# seed.hold_out keeps max(batch, n / 20) examples out of training, to measure the void mass
HELD_OUT_SHARE = 1 / 20


def images_per_round(steps, batch_size, probes_per_image):
    """The images a round needs so that its examples cover what its training draws:
    ceil(steps x batch / (1 + probes per image) / (1 - held-out share)): each image gives one
    description and `probes_per_image` probes, and a twentieth of the examples is held out."""
    examples = steps * batch_size / (1 - HELD_OUT_SHARE)
    return math.ceil(examples / (1 + probes_per_image))


def sample_order(names, random_seed):
    """The folder's files in the seeded order in which rounds take them: sorted, then shuffled, so
    the sample depends on the seed and the file names alone, not on the order the disk lists
    them."""
    order = sorted(names)
    random.Random(f"images/{random_seed}").shuffle(order)
    return order


def round_samples(ordered, per_round, rounds, fresh=True):
    """Each round's items out of `ordered`: round r takes the next `per_round` after round r - 1's
    (fresh images every round), wrapping round to the start, the images taken longest ago, only
    when the list runs out; fresh=False gives every round the same first `per_round`."""
    per_round = min(per_round, len(ordered))
    if not fresh:
        return [ordered[:per_round] for _ in range(rounds)]
    return [[ordered[(r * per_round + i) % len(ordered)] for i in range(per_round)]
            for r in range(rounds)]


def needed(per_round, rounds, fresh=True):
    """How many distinct items round_samples takes from the front of the list."""
    return per_round * rounds if fresh else per_round


def sample_id(images):
    """16 hex digits naming a round's sample, in order: its files' names, or a PIL image's pixels.
    An examples log records it, so that a resume over another sample is refused."""
    digest = hashlib.sha256()
    for image in images:
        if isinstance(image, (str, os.PathLike)):
            digest.update(json.dumps(os.path.basename(image)).encode())
        else:
            digest.update(json.dumps([image.mode, image.size]).encode() + image.tobytes())
    return digest.hexdigest()[:16]


def prefetched(items, prepare, ahead=2):
    """prepare(item) for every item, in order, computed on one background thread up to `ahead`
    items before the caller asks for them.

    A thread, not DataLoader worker processes: PIL's decoding and resizing, numpy's arithmetic and
    the tokenizer release the GIL, so one thread overlaps the images with the model's pass; nothing
    is pickled, and CUDA stays in one process. An error in prepare is raised here, at its item.
    """
    if ahead < 1:
        yield from map(prepare, items)
        return
    results = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def work():
        for item in items:
            if stop.is_set():
                return
            try:
                results.put((True, prepare(item)))
            except BaseException as error:  # handed to the caller, raised at this item
                results.put((False, error))
                return

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in range(len(items)):
            ok, value = results.get()
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock a worker waiting on a full queue
            try:
                results.get_nowait()
            except queue.Empty:
                thread.join(0.01)
