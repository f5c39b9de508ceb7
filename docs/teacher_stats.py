"""The recorded purified teacher of SEED's examples logs: plausible-set sizes and bytes (METHOD.md
3).

    python docs/teacher_stats.py out/seed_reverse/round0/examples.jsonl [more logs]

For each log: response positions, the kept tokens a position (mean, max, a histogram), the bytes
the teacher takes a response position, and what that comes to for COCO's 83k training images with
the same number of responses and positions an image.
"""
import json
import statistics
import sys
from collections import Counter

COCO_TRAIN_IMAGES = 82_783


def stats(path):
    counts, teacher_bytes, images = [], 0, set()
    with open(path) as f:
        for line in f:
            record = json.loads(line)
            counts += record["teacher"]["counts"]
            teacher_bytes += len(json.dumps(record["teacher"]))
            images.add(record["image"])
    histogram = Counter(min(c, 16) for c in counts)
    per_position = teacher_bytes / len(counts)
    coco = per_position * len(counts) / len(images) * COCO_TRAIN_IMAGES
    print(f"{path}: {len(counts)} response positions on {len(images)} images; kept tokens a "
          f"position: mean {statistics.mean(counts):.2f}, median {statistics.median(counts)}, max "
          f"{max(counts)}")
    print("  histogram (16 = 16 or more): "
          + ", ".join(f"{k}: {histogram[k]}" for k in sorted(histogram)))
    print(f"  teacher bytes a response position {per_position:.1f} (JSON, base64 int32 ids + "
          f"float32 logits); at COCO scale ({COCO_TRAIN_IMAGES:,} images): {coco / 2**20:.0f} MiB")


if __name__ == "__main__":
    for log in sys.argv[1:]:
        stats(log)
