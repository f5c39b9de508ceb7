"""Peak host memory of `train.py --model` on the llava-1.5 replica, against the number of unlabeled
images.

    python docs/measure_host_memory.py                 # 200 and 2,000 images (README, "A real run")
    python docs/measure_host_memory.py --images 200 500

Builds tests/replica.py's checkpoint and COCO-sized JPEGs in a temporary folder, runs train.py in a
child process at a small budget (one description token per image, no probes, one SEED step), and
prints the child's peak resident memory (getrusage's ru_maxrss of that child alone) and wall time.
Images are read a batch at a time, so the peak should not grow with the number of images; an
all-in-memory list of 640 x 480 RGB images would add about 0.9 MB per image.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000],
                        help="unlabeled image counts to run")
    args = parser.parse_args()
    import replica

    print(f"{'images':>8}{'peak RSS MiB':>14}{'seconds':>10}")
    for count in args.images:
        with tempfile.TemporaryDirectory() as root:
            paths = replica.build(root, unlabeled=count, pope_images=4, questions_per_image=2)
            command = [sys.executable, os.path.join(ROOT, "train.py"), "--model",
                       paths["llava-1.5-7b-replica"], "--images", paths["train2014"], "--pope",
                       paths["pope"], "--pope-images", paths["val2014"],
                       "--out", os.path.join(root, "out"), "--divergence", "reverse",
                       "--steps", "1", "--batch-size", "16", "--probes-per-image", "0",
                       "--description-tokens", "1", "--sample-seeds", "1", "--eval-batch-size", "8",
                       "--no-progress"]
            start = time.perf_counter()
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            _, status, usage = os.wait4(child.pid, 0)
            if status != 0:
                raise SystemExit(f"train.py exited with status {status} on {count} images")
            print(f"{count:>8}{usage.ru_maxrss / 1024:>14.0f}{time.perf_counter() - start:>10.0f}",
                  flush=True)


if __name__ == "__main__":
    main()
