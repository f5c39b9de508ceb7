"""The plan of a run, printed before its first forward pass: what it will make, and how long.

Paper: SEED (arXiv 2507.04680) runs the phases of METHOD.md 1-6: POPE on the base model and under
VCD decoding, then per round the purified examples and the SEED steps, then POPE on each SEED
model. This file is ours, plumbing: it counts each phase's work from the flags and the data (no
weights are loaded: `train.py --plan` prints it and exits), and once a phase has timed a few of its
batches it says how long that phase and the whole run have left, each kind of work at its own
measured pace (phases of a kind not yet timed are named, not guessed).
"""
import time

import eval_pope

# kinds of work, each timed by its own pace: a POPE answer or CHAIR description with one pass a
# token or with VCD's two, a purified SEED example (two passes a token), a SEED step
KINDS = {"answer": "POPE answers", "vcd answer": "POPE answers, VCD",
         "example": "purified examples", "step": "SEED steps",
         "description": "CHAIR descriptions", "vcd description": "CHAIR descriptions, VCD"}


def count_questions(pope_files):
    """POPE questions per split (each file read, nothing decoded)."""
    return {split: len(eval_pope.load_questions(path)) for split, path in pope_files.items()}


# The phases' names, as train.py starts them (Clock.start) and the plan lists them; `row` is a
# method of report.METHODS (base, vcd, seed_forward, seed_reverse, seed_reverse_vcd)
def pope_phase(row):
    return f"POPE, {row}"


def chair_phase(row):
    return f"CHAIR, {row}"


def examples_phase(divergence, round_index):
    return ("examples of round 0 (the base model's)" if round_index == 0 else
            f"examples of round {round_index} (seed_{divergence})")


def steps_phase(divergence, round_index):
    return f"steps of round {round_index} (seed_{divergence})"


def make_plan(config, questions, images_per_round, chair_images=0):
    """The run's phases in the order train.py runs them: [(name, kind, units)]. questions: POPE
    questions per split; chair_images: descriptions a row writes for CHAIR (0: none)."""
    answers = sum(questions.values()) * (1 + config.sample_seeds)  # greedy + sampled seeds
    examples = images_per_round * (1 + config.probes_per_image)  # a description and the probes

    def row(method, contrast=False):
        rows = [(pope_phase(method), "vcd answer" if contrast else "answer", answers)]
        if chair_images:
            rows.append((chair_phase(method), "vcd description" if contrast else "description",
                         chair_images))
        return rows

    phases = row("base") + row("vcd", contrast=True)
    divergences = ["forward", "reverse"] if config.divergence == "both" else [config.divergence]
    for divergence in divergences:
        for r in range(config.rounds):
            if r or divergence == divergences[0]:  # round 0's examples are made once, shared
                phases.append((examples_phase(divergence, r), "example", examples))
            phases.append((steps_phase(divergence, r), "step", config.steps))
        phases += row(f"seed_{divergence}")
        if divergence == "reverse":
            phases += row("seed_reverse_vcd", contrast=True)
    return phases


def for_run(config, pope_files, images_per_round, distinct_images, chair_images=0):
    """(phases, the plan's text) of a run, from its flags and its data's sizes alone."""
    phases = make_plan(config, count_questions(pope_files), images_per_round, chair_images)
    return phases, describe(phases, config, images_per_round, distinct_images)


def describe(phases, config, images_per_round, distinct_images):
    """The plan as lines of text: the work of each kind, then the phases in order."""
    totals = {}
    for _, kind, units in phases:
        totals[kind] = totals.get(kind, 0) + units
    drawn = config.steps * config.batch_size
    lines = [f"plan: {config.rounds} round(s) x {images_per_round:,} unlabeled images "
             f"({distinct_images:,} distinct), "
             f"{images_per_round * (1 + config.probes_per_image):,} examples made a round (a "
             f"description and {config.probes_per_image} probes an image), {drawn:,} drawn a "
             f"round ({config.steps} steps x {config.batch_size})",
             "plan: " + ", ".join(f"{units:,} {KINDS[kind]}" for kind, units in totals.items())]
    lines += [f"  {i + 1:>2}. {name}: {units:,} {KINDS[kind]}"
              for i, (name, kind, units) in enumerate(phases)]
    return "\n".join(lines)


def duration(seconds):
    return (f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"
            if seconds >= 90 else f"{seconds:.0f} s")


class Clock:
    """The run's pace: train.py names the phase it starts (`start`), the work meters what it has
    done (`tick(units, seconds)`, a batch at a time), and after `report_after` batches of a phase
    the clock says what that phase and the whole run have left."""

    def __init__(self, phases, say, report_after=3):
        self.phases, self.say, self.report_after = list(phases), say, report_after
        self.done = {name: 0 for name, _, _ in self.phases}
        self.pace = {}  # kind -> [units, seconds] measured
        self.current, self.ticks = None, 0

    def start(self, name):
        self.current, self.ticks = name, 0

    def tick(self, units, seconds):
        if self.current not in self.done:
            return
        kind = next(k for n, k, _ in self.phases if n == self.current)
        self.done[self.current] += units
        measured = self.pace.setdefault(kind, [0, 0.0])
        measured[0], measured[1] = measured[0] + units, measured[1] + seconds
        self.ticks += 1
        if self.ticks == self.report_after:
            self.say(self.remaining())

    def remaining(self):
        """'<phase>: ~T left; the run: ~T left (+ phases not yet timed)' from the paces so far."""
        left, untimed = 0.0, []
        for name, kind, units in self.phases:
            todo = max(units - self.done[name], 0)
            if not todo:
                continue
            if kind in self.pace and self.pace[kind][0]:
                left += todo * self.pace[kind][1] / self.pace[kind][0]
            else:
                untimed.append(KINDS[kind])
        name, kind, units = next(p for p in self.phases if p[0] == self.current)
        pace = self.pace[kind][1] / self.pace[kind][0]
        phase_left = max(units - self.done[name], 0) * pace
        return (f"time: {name}: {duration(phase_left)} left; the run: {duration(left)} left" + (
            f" + {', '.join(dict.fromkeys(untimed))} not yet timed" if untimed else ""))

    def timed(self, iterable):
        """Each item of `iterable` as a step of the current phase: tick(1, its seconds)."""
        began = time.perf_counter()
        for item in iterable:
            yield item
            now = time.perf_counter()
            self.tick(1, now - began)
            began = now
