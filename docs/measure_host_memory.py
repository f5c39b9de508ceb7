"""Peak host memory of the real run's steps on replica checkpoints (tests/replica.py).

    python docs/measure_host_memory.py                        # llava: 200 and 2,000 --images
    python docs/measure_host_memory.py --images 200 500
    python docs/measure_host_memory.py --family internvl3 qwen2.5-vl --phase answer examples
    python docs/measure_host_memory.py --family internvl3 --phase answer --code /tmp/older-code

Builds a replica checkpoint and COCO-sized JPEGs in a temporary folder, runs a step in a child
process and prints the child's peak resident memory (getrusage's ru_maxrss of that child alone)
and wall time:
- --phase train (llava): `train.py --model` at a small budget (one description token per image, no
  probes, one SEED step) over --images unlabeled images: images are read a batch at a time, so the
  peak should not grow with their number;
- --phase answer: `eval_pope.py answer --decoding vcd-greedy --batch-size 4` on 2 images (VCD's two
  passes);
- --phase examples: `train.py --model` making round 0's purified examples of 8 images at
  --eval-batch-size 4, description and probes.
internvl3 and qwen2.5-vl are the replicas at full size where memory depends on it: their real
output vocabularies (151,674 and 152,064 logits a position) and pixel settings (InternVL's 448-px
tiles, 3,328 image tokens for a COCO photo), tiny widths. --code runs another checkout of this
project on the same folders (an older commit, to compare).
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


def peak(command, cwd):
    """(peak resident MiB, seconds) of `command` run as a child."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=dict(os.environ, OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(command[:3])} ... exited with status {status}: "
                         f"{child.stderr.read().decode()[-1500:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def checkpoint(family, root):
    import replica

    if family == "llava":
        return None
    build = {"internvl3": replica.internvl3_hf_folder, "qwen2.5-vl": replica.qwen2_5_vl_folder}
    return build[family](os.path.join(root, family), full_size=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, nargs="+", default=[200, 2000],
                        help="unlabeled image counts to run (--phase train)")
    parser.add_argument("--family", nargs="+", default=["llava"],
                        choices=["llava", "internvl3", "qwen2.5-vl"], help="replica checkpoints")
    parser.add_argument("--phase", nargs="+", default=["train"],
                        choices=["train", "answer", "examples"], help="what to run")
    parser.add_argument("--code", default=ROOT, help="the checkout whose scripts run")
    args = parser.parse_args()
    import replica

    print(f"{'family':<12}{'phase':<10}{'images':>8}{'peak RSS MiB':>14}{'seconds':>10}")
    for family in args.family:
        for phase in args.phase:
            counts = args.images if phase == "train" else [8 if phase == "examples" else 2]
            for count in counts:
                with tempfile.TemporaryDirectory() as root:
                    paths = replica.build(root, unlabeled=count, pope_images=2,
                                          questions_per_image=2)
                    model = checkpoint(family, root) or paths["llava-1.5-7b-replica"]
                    out = os.path.join(root, "out")
                    common = ["--model", model, "--images", paths["train2014"], "--pope",
                              paths["pope"], "--pope-images", paths["val2014"], "--out", out,
                              "--divergence", "reverse", "--sample-seeds", "1", "--no-progress"]
                    if phase == "train":
                        command = ["train.py", *common, "--steps", "1", "--batch-size", "16",
                                   "--probes-per-image", "0", "--description-tokens", "1",
                                   "--eval-batch-size", "8"]
                    elif phase == "examples":  # round 0's examples, then one step: enough
                        command = ["train.py", *common, "--steps", "1", "--batch-size", "2",
                                   "--rounds", "1", "--probes-per-image", "2",
                                   "--description-tokens", "4", "--eval-batch-size", "4"]
                    else:
                        command = ["eval_pope.py", "answer", "--model", model, "--questions",
                                   os.path.join(paths["pope"], "coco_pope_random.json"),
                                   "--images", paths["val2014"], "--out",
                                   os.path.join(root, "answers.jsonl"), "--device", "cpu",
                                   "--decoding", "vcd-greedy", "--batch-size", "4",
                                   "--max-new-tokens", "2"]
                    mib, seconds = peak([sys.executable, *command], args.code)
                    print(f"{family:<12}{phase:<10}{count:>8}{mib:>14.0f}{seconds:>10.0f}",
                          flush=True)


if __name__ == "__main__":
    main()
