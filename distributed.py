"""Several processes under torchrun: which share of the work is this process's; the collectives.

Not from the paper (ours): SEED's cost is decoding (the teacher's two-pass purified answers, POPE)
and the SEED steps, so under `torchrun --nproc_per_node N train.py` each process decodes its share
of every chunk of prompts, trains on its rows of every global batch, and the results are gathered;
files are written by process 0 alone. Plain `python train.py` is one process and every function
here is then a no-op (no process group is made). Built on torch.distributed only: NCCL between GPUs,
gloo on the CPU; a collective that waits longer than the timeout fails the job instead of hanging.
Why the split step equals the one-process step: METHOD.md section 7.
"""
import datetime
import json
import os

import torch
import torch.distributed as dist

import models


def launched_processes():
    """torchrun's WORLD_SIZE (1 without torchrun), known before start()."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(timeout_minutes=30):
    """Join torchrun's process group when launched by it (WORLD_SIZE > 1); returns the device.

    Each process takes the GPU of its LOCAL_RANK, or the CPU (gloo) when there is none. Without
    torchrun nothing is started and the device is None (the caller's --device decides).
    """
    if launched_processes() <= 1 or dist.is_initialized():
        return None
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes),
                            device_id=device if cuda else None)
    return device


def stop():
    """Leave the process group, every process at once: process 0 still times the rows and draws the
    pictures when the others are done, and a process that tears its side down while another still
    holds the group open can abort at exit."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """Process 0: the one that prints, shows progress bars and writes files."""
    return rank() == 0


def barrier():
    """Wait for every process (after process 0 has written what the others will read)."""
    if dist.is_initialized():
        dist.barrier()


def process_slice(count, batch_size):
    """(start, stop) of this process's items in a chunk of `count`: process r takes
    [r * batch_size, (r + 1) * batch_size)."""
    start = min(rank() * batch_size, count)
    return start, min(start + batch_size, count)


def batch_starts(count, batch_size):
    """This process's batch starts (every P-th from its rank), for work whose results are summed."""
    return range(rank() * batch_size, count, batch_size * world_size())


def _device():
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather(items):
    """Every process's list, concatenated in rank order, on every process.

    The lists travel as JSON bytes in uint8 tensors (two all_gathers: the sizes, then the padded
    bytes), not through torch.distributed's object collectives, which pickle.
    """
    if not dist.is_initialized():
        return list(items)
    device = _device()
    data = torch.frombuffer(bytearray(json.dumps(list(items)).encode()),
                            dtype=torch.uint8).to(device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.long, device=device))
    longest = max(int(size) for size in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[:data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [item for part, size in zip(parts, sizes)
            for item in json.loads(part[:int(size)].cpu().numpy().tobytes().decode())]


def broadcast(value):
    """Process 0's value (anything JSON can hold), on every process."""
    if not dist.is_initialized():
        return value
    return gather([value if is_main() else None])[0]


def sum_gradients(parameters):
    """Sum every process's gradients of `parameters` in place, in one flat all-reduce."""
    if not dist.is_initialized():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def sum_value(value):
    """A float summed over the processes."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_device())
    dist.all_reduce(tensor)
    return tensor.item()


def process_rows(model, batch, noise_step, generator, micro_batch_size=None):
    """This process's rows of a global batch, in micro-batches of at most micro_batch_size rows,
    each with its share of the batch's response positions: [(micro-batch, share)].

    The SEED loss is a mean over response positions, so a micro-batch's loss times its share,
    summed over the micro-batches and the processes, is the whole batch's loss (and so are the
    gradients, accumulated by backward and summed over the processes by sum_gradients): N
    processes and M micro-batches give one process's step on the whole batch, up to float rounding
    (METHOD.md 7). The distortion is drawn for the whole batch first, with the step's generator, as
    one process draws it, and each part keeps its rows of it (distorted_pixel_values); noise_step
    None: no distortion, for a recorded teacher, whose positions are cut to the part's rows
    instead. One process and no smaller micro-batch: the batch as it is, share 1.
    """
    rows = batch["input_ids"].shape[0]
    micro_batch_size = micro_batch_size or rows
    if world_size() == 1 and micro_batch_size >= rows:
        return [(batch, 1.0)]
    per_process = -(-rows // world_size())
    start, stop = process_slice(rows, per_process)
    net = models.transformers_model(model)
    pixel_rows = models.pixel_rows_per_question(net, batch["pixel_values"], batch["input_ids"])
    per_row = batch["response_mask"][:, 1:].sum(-1).tolist()  # response positions of each row
    distorted = None if noise_step is None else models.distort_images(
        net, batch["pixel_values"], noise_step, generator)
    parts = []
    for first in range(start, stop, micro_batch_size):
        last = min(first + micro_batch_size, stop)
        pixels = slice(sum(pixel_rows[:first]), sum(pixel_rows[:last]))
        positions = slice(sum(per_row[:first]), sum(per_row[:last]))
        part = {key: value[first:last] for key, value in batch.items()
                if key not in ("pixel_values", "teacher_ids", "teacher_logits")}
        part.update({key: batch[key][positions] for key in ("teacher_ids", "teacher_logits")
                     if key in batch})
        part.update(pixel_values=batch["pixel_values"][pixels])
        if distorted is not None:
            part["distorted_pixel_values"] = distorted[pixels]
        parts.append((part, sum(per_row[first:last]) / sum(per_row)))
    return parts
