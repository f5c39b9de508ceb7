"""Run bookkeeping: atomic writes, checkpoints and resume, and the one decode-and-log loop.

Paper: SEED (arXiv 2507.04680) says nothing about files; this is ours, so that nothing is lost on a
crash and a resumed run equals an uninterrupted one (METHOD.md 5's rounds, checkpointed):
- every file a run's result depends on is written to a temporary name and renamed (`write_json`,
  `replace_folder`), or appended a batch at a time and fsynced (`decode_and_log`);
- every record and checkpoint says what it was made with, and a resume with other settings is
  refused, naming the setting (`resume_records`, `resume_point`);
- `decode_and_log` is the loop that SEED's purified examples and POPE's answers share: a batch per
  process out of each chunk under torchrun, gathered in order, appended by process 0.
"""
import contextlib
import json
import os
import shutil
import sys

import torch

import adapter
import distributed


@contextlib.contextmanager
def written_aside(tmp):
    """The temporary file or folder `tmp`, removed if the block fails (a full disk, say), so that
    nothing half-written is left behind, under the final name or beside it. A failed write that a
    library reports in its own words (safetensors') is raised as the OSError it is."""
    try:
        yield tmp
    except BaseException as error:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        failed = os_error_of(error, tmp)
        if failed is not None:
            raise failed from error
        raise


def os_error_of(error, path):
    """The OSError behind a failed write that safetensors' writer reports as "... I/O error: No
    space left on device (os error 28)", naming `path`; None for any other error."""
    import re

    found = None if isinstance(error, OSError) else re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), path)


def write_json(path, value, **options):
    """`value` as JSON in `path`, via path + '.tmp' and a rename: never half a file there."""
    with written_aside(os.fspath(path) + ".tmp") as tmp, open(tmp, "w") as f:
        json.dump(value, f, **options)
    os.replace(tmp, path)


def write_json_lines(path, records):
    """`records` as JSON lines in `path`, via path + '.tmp' and a rename."""
    with written_aside(os.fspath(path) + ".tmp") as tmp, open(tmp, "w") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
    os.replace(tmp, path)


def short(error, limit=300):
    """An exception as one line of at most `limit` characters: its type and its message."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[:limit] + " ..."


class InUse(Exception):
    """An output another process is writing."""


def claim(path):
    """Claim the output `path` (a folder, or a file, made if missing) for this process until it
    exits or closes the returned handle: an exclusive fcntl.flock, which the kernel releases when
    the process dies, so a killed run never leaves a stale claim. Raises InUse naming the process
    that holds it (from /proc/locks, where there is one)."""
    import fcntl

    flags = os.O_RDONLY if os.path.isdir(path) else os.O_WRONLY | os.O_CREAT | os.O_APPEND
    descriptor = os.open(path, flags, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(os.fstat(descriptor))
        os.close(descriptor)
        raise InUse(f"{path} is being written by another process"
                    + (f" (pid {holder})" if holder else "")
                    + ": wait for it to end, or write elsewhere") from None
    return Claim(descriptor)


class Claim:
    """A claimed output (claim): released by close(), or when the process ends."""

    def __init__(self, descriptor):
        self.descriptor = descriptor

    def close(self):
        if self.descriptor is not None:
            os.close(self.descriptor)
            self.descriptor = None


def lock_holder(stat):
    """The pid holding a flock on the file of `stat`, from /proc/locks (Linux), or None."""
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE <pid> <major>:<minor>:<inode> 0 EOF"
                at = fields.index("FLOCK") if "FLOCK" in fields else None
                if at is not None and fields[at + 4].endswith(f":{stat.st_ino}"):
                    return int(fields[at + 3])
    except (OSError, ValueError, IndexError):
        pass
    return None


def replace_folder(tmp, path):
    """Put the finished folder `tmp` in place of `path`: the old one renamed aside first (a rename
    is atomic) and removed only once the new one is in place."""
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(tmp, path)
    shutil.rmtree(path + ".old", ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# JSON-lines records, and what they were made with

def json_lines(path):
    """[(line number, record)] of a JSON-lines file, read only: blank lines skipped, every other
    line a JSON object, else an error naming the file and the line. The file is never changed
    (scoring must not alter what it scores)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: " + ("a folder, not a file" if os.path.isdir(path)
                                        else "no such file"))
    records = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not UTF-8 text (byte "
                                 f"0x{raw[error.start]:02x} at column {error.start + 1})") from None
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not a JSON line ({error.msg} at column "
                                 f"{error.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: a JSON {type(record).__name__}, not an "
                                 f"object (a record)")
            records.append((line_number, record))
    return records


def first_difference(made, wanted):
    """(setting, recorded value, wanted value) of the first setting in which two made_with records
    differ, or None: nested dicts looked into, in the order of `wanted`, then `made`'s own."""
    for key in list(wanted) + [k for k in made if k not in wanted]:
        old, new = made.get(key), wanted.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            inner = first_difference(old, new)
            if inner:
                return inner
        elif old != new:
            return key, old, new
    return None


def setting_name(key):
    """How a refusal names a made_with setting: as its flag, or by what it fingerprints."""
    names = {"questions": "the question file (its sha256)",
             "run": "the run's settings (their sha256, run.json)"}
    return names.get(key, "--" + key.replace("_", "-"))


def resume_records(path, made_with):
    """The records a resumed run keeps from the JSON-lines file it appends to: all of them, after
    cutting a torn final line (a crash mid-write leaves one without its newline; only the writer of
    the file, resuming it, may cut it), each of which must have been made with `made_with` (its
    "made_with" field); a record made otherwise is an error naming the setting and both values."""
    if not os.path.exists(path):
        return []
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder, not a JSON-lines file")
    with open(path, "rb") as f:
        data = f.read()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"{path}: cut a torn last line ({len(data) - keep} bytes, no newline): a crash "
              f"mid-write; that line is made again", file=sys.stderr)
    records = []
    for line_number, record in json_lines(path):
        made = record.pop("made_with", None)
        if made is None:
            raise ValueError(f"{path}:{line_number}: the record does not say what it was made with "
                             f"(an older version's file): delete the file, or write elsewhere")
        difference = first_difference(made, made_with)
        if difference:
            key, old, new = difference
            raise ValueError(f"{path}:{line_number}: made with {setting_name(key)} {old!r}, but "
                             f"this run has {new!r}: rerun with the same settings, or write "
                             f"elsewhere (or delete the file)")
        records.append(record)
    return records


def decode_and_log(items, decode_batch, batch_size, path=None, made_with=None, offset=0,
                   progress=False, desc=None, total=None, prepare=None, meter=None):
    """decode_batch(chunk, indices, prepared) -> records over `items` a batch at a time, returned
    in order.

    prepare(chunk): the part of a batch that needs no model (reading and preprocessing its images),
    run on a background thread a batch ahead while the model decodes (loading.prefetched);
    `prepared` is its result (None without prepare). indices: each item's place, offset + its
    index in `items` (what seeds its noise, so an answer never depends on the batch it fell in or
    on where a resumed run restarted). path: a JSON-lines file each batch's records are appended
    to, with "made_with", fsynced before the next batch (a crash loses nothing written). Under
    torchrun each process decodes one batch of every chunk of batch_size x processes items, the
    records are gathered in order, and process 0 writes them. meter(items, seconds): told of each
    chunk as it is done (train.py's plan.Clock).
    """
    import time

    import loading
    from tqdm import tqdm

    records = []
    out = open(path, "a") if path and items and distributed.is_main() else None
    chunk_size = batch_size * distributed.world_size()
    # (start of the chunk, the chunk, this process's part of it)
    chunks = []
    for start in range(0, len(items), chunk_size):
        chunk = items[start:start + chunk_size]
        first, stop = distributed.process_slice(len(chunk), batch_size)
        chunks.append((start, chunk, chunk[first:stop], first))
    ahead = loading.prefetched(chunks, lambda c: prepare(c[2]) if prepare and c[2] else None)
    total = len(items) if total is None else total
    bar = tqdm(total=total, initial=total - len(items), desc=desc, disable=not progress)
    began = time.perf_counter()
    try:
        for (start, chunk, mine, first), prepared in zip(chunks, ahead):
            made = decode_batch(mine, [offset + start + first + j for j in range(len(mine))],
                                prepared) if mine else []
            made = distributed.gather(made)  # the whole chunk, in order, on every process
            if out is not None:
                out.write("".join(json.dumps({**record, "made_with": made_with}) + "\n"
                                  for record in made))
                out.flush()
                # a crash or Ctrl-C after this point loses nothing of this batch
                os.fsync(out.fileno())
            records += made
            bar.update(len(chunk))
            if meter:
                meter(len(chunk), time.perf_counter() - began)
            began = time.perf_counter()
    finally:
        ahead.close()
        bar.close()
        if out is not None:
            out.close()
    return records


def read_examples_log(path, made_with):
    """The records a stopped make_examples left in `path` (a torn last line cut), each with its
    number; a record made with other settings than `made_with` is refused (resume_records)."""
    records = resume_records(path, made_with)
    return [{**record, "_record": n} for n, record in enumerate(records, 1)]


def examples_log(path, made_with, batch_size, progress=False, meter=None):
    """seed.make_examples' `answer` for a run: the purified answers appended to the examples log at
    `path` as they are made, and a stopped run's records in it kept (each must be the very prompt
    this run asks: the same kind, image and text), the rest decoded after them, under torchrun
    split over the processes."""
    # process 0 reads (and cuts a torn last line), every process continues from the same record
    left = distributed.broadcast(read_examples_log(path, made_with) if distributed.is_main()
                                 else None)

    def answer(prompts, decode_batch, kind, prepare=None):
        nonlocal left
        kept, left = left[:len(prompts)], left[len(prompts):]  # descriptions first, then probes
        for record, (index, text) in zip(kept, prompts):
            if (record.get("kind"), record.get("image"), record.get("prompt")) != (kind, index,
                                                                                   text):
                raise ValueError(f"{path}: record {record['_record']} is {record.get('kind')} "
                                 f"{record.get('prompt')!r} on image {record.get('image')}, but "
                                 f"this run's is {kind} {text!r} on image {index}: the file was "
                                 f"made with other images or settings (delete it, or run without "
                                 f"--resume)")
        kept = [{k: v for k, v in record.items() if k != "_record"} for record in kept]
        return kept + decode_and_log(prompts[len(kept):], decode_batch, batch_size, path, made_with,
                                     offset=len(kept), progress=progress, desc=f"purified {kind}s",
                                     total=len(prompts), prepare=prepare, meter=meter)

    return answer


# ---------------------------------------------------------------------------------------------
# Checkpoints: adapter + optimiser + step, written atomically, no pickle

def save_checkpoint(model, optimizer, path, round_index, step, made_with=None, log=()):
    """Adapter, optimiser moments (safetensors), step and the log of the round's steps so far
    (progress.json): one folder swapped in."""
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for key, slots in state["state"].items():
        for name, value in slots.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{key}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{key}.{name}"] = float(value)
    with written_aside(path + ".tmp") as tmp:
        adapter.save_adapter(model, tmp)
        save_file(tensors, os.path.join(tmp, "optimizer.safetensors"))
        with open(os.path.join(tmp, "progress.json"), "w") as f:
            json.dump({"round": round_index, "step": step, "scalars": scalars,
                       "made_with": made_with, "log": list(log)}, f)
    replace_folder(tmp, path)


def load_checkpoint(model, optimizer, path):
    """Restore adapter and optimiser moments; returns the log of the round's steps before it."""
    from safetensors.torch import load_file

    adapter.load_adapter(model, path)
    with open(os.path.join(path, "progress.json")) as f:
        progress = json.load(f)
    tensors = load_file(os.path.join(path, "optimizer.safetensors"))
    state = optimizer.state_dict()
    for key in state["param_groups"][0]["params"]:
        slots = {name.split(".", 1)[1]: value for name, value in tensors.items()
                 if name.split(".", 1)[0] == str(key)}
        slots.update({name.split(".", 1)[1]: torch.tensor(value)
                      for name, value in progress["scalars"].items()
                      if name.split(".", 1)[0] == str(key)})
        if slots:
            state["state"][key] = slots
    optimizer.load_state_dict(state)
    return progress["log"]


def resume_point(checkpoint, made_with=None):
    """(round, step) to continue from, as the last checkpoint wrote them; (0, 0) without one. A
    checkpoint written with other settings than `made_with` is refused, naming the setting."""
    if not os.path.exists(os.path.join(checkpoint, "progress.json")):
        return 0, 0
    with open(os.path.join(checkpoint, "progress.json")) as f:
        saved = json.load(f)
    difference = first_difference(saved.get("made_with") or {}, made_with or {})
    if difference:
        key, old, new = difference
        raise ValueError(f"{checkpoint}: written with {setting_name(key)} {old!r}, this run has "
                         f"{new!r}: resume with the same settings, or start elsewhere")
    return saved["round"], saved["step"]


def replay_round(model, round_dir):
    """A round finished before a crash: merge its adapter again and return its summary, its log of
    steps included."""
    adapter.load_adapter(model, round_dir)
    adapter.merge_adapter(model)
    with open(os.path.join(round_dir, "summary.json")) as f:
        return json.load(f)


def finish_round(model, optimizer, round_dir, checkpoint, round_index, summary, write=True,
                 made_with=None):
    """Save the round's adapter (ours, and PEFT's format in <round_dir>/peft), its summary, mark the
    round done in the checkpoint, merge (METHOD.md 4). Round r's adapter applies to the model merged
    with rounds 0..r-1 (round 0's: to the base checkpoint). write=False (processes other than 0
    under torchrun): merge only."""
    if write:
        adapter.save_adapter(model, round_dir)
        adapter.save_peft_adapter(model, os.path.join(round_dir, "peft"),
                                  base_model_name_or_path=getattr(model.config, "_name_or_path",
                                                                  None) or None)
        write_json(os.path.join(round_dir, "summary.json"), summary)
        save_checkpoint(model, optimizer, checkpoint, round_index=round_index + 1, step=0,
                        made_with=made_with)
    adapter.merge_adapter(model)  # the merged model is the next round's teacher


PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json",
                   "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja",
                   "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "added_tokens.json", "special_tokens_map.json")


def save_merged(model, processor, path):
    """The merged model as an ordinary checkpoint in <path>, loadable anywhere with
    AutoModelForImageTextToText / AutoProcessor.from_pretrained: the weights by save_pretrained, and
    the processor, which SEED leaves as it was, as the files of the folder the model came from (byte
    for byte, the video processor's settings among them), else by processor.save_pretrained. Written
    into <path>.tmp and renamed, so a crash never leaves half a checkpoint under the name."""
    if adapter.adapter_layers(model):
        raise ValueError("the model still has an adapter: adapter.merge_adapter(model) first")
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with written_aside(tmp):
        write_merged(model, processor, tmp)
    replace_folder(tmp, path)


def write_merged(model, processor, tmp):
    """save_merged's files, into the folder `tmp`."""
    model.save_pretrained(tmp)
    source = getattr(model, "name_or_path", "") or ""
    shipped = [n for n in PROCESSOR_FILES if os.path.isfile(os.path.join(source, n))]
    for name in shipped:
        shutil.copy(os.path.join(source, name), tmp)
    if not shipped:
        processor.save_pretrained(tmp)
