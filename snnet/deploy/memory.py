"""Whether an input fits: a size the network can take, in a batch this device's memory can hold.

:func:`check_input` refuses, in one line and before any real tensor is made, an image size the
anchors cannot take (a ViT's fixed patch grid, a kernel larger than the image: each chosen stitch
is run once on the ``meta`` device, shapes only) and a batch or size whose input and largest
activation alone exceed this device's free memory. Without it ``snnet profile --img-size 3``
ended in an AssertionError from inside timm and ``--img-size 99999`` or ``--batch-size
100000000`` in an allocation failure (or, with overcommitted memory, the out-of-memory killer).
:func:`available_memory` says how much this device has (on the CPU, within the cgroup's memory limit:
a container's ``--memory``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..budget import MB
from ..errors import SnnetError, reason

if TYPE_CHECKING:
    from ..model import StitchedNet
    from ..space import Stitch

__all__ = ["available_memory", "cgroup_memory_left", "check_input"]


def available_memory(device: str | torch.device = "cpu", root: str | os.PathLike = "/") -> int | None:
    """Bytes this device can still allocate: free memory on a GPU, MemAvailable (what the kernel can give
    without swapping) on Linux, free physical pages elsewhere; None where the system does not say.

    On the CPU, a cgroup's memory limit (a container's ``--memory``, :func:`cgroup_memory_left`) caps the
    figure: a 4 GiB container on a 24 GiB host has 4 GiB, not the host's MemAvailable. ``root`` is where
    ``/proc`` and ``/sys`` are read (a test's fake tree).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    known = [v for v in (cgroup_memory_left(root), _host_available(Path(root))) if v is not None]
    return min(known) if known else None


def _host_available(root: Path) -> int | None:
    try:
        with open(root / "proc" / "meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# cgroup v2's and v1's files: the limit ("max": none), the usage, and the memory.stat entry of the page cache the
# kernel reclaims before it kills for the limit (counted in the usage, but free to take)
_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def cgroup_memory_left(root: str | os.PathLike = "/") -> int | None:
    """Bytes this process can still allocate before its cgroup's memory limit (a container's ``--memory``):
    the tightest of its own memory cgroup and those above it, v2 (``memory.max``) or v1
    (``memory.limit_in_bytes``), their reclaimable page cache counted as free; None without a limit.

    The process's cgroup is read from ``/proc/self/cgroup`` under ``root``; a container that sees its
    own cgroup as the root of ``/sys/fs/cgroup`` (cgroup namespaces, or v1's bind mounts) is found there."""
    root = Path(root)
    own = {"v2": "/", "v1": "/"}
    try:
        for line in (root / "proc" / "self" / "cgroup").read_text().splitlines():
            number, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            if number == "0" and not controllers:
                own["v2"] = path
            elif "memory" in controllers.split(","):
                own["v1"] = path
    except OSError:
        pass
    mount = root / "sys" / "fs" / "cgroup"
    left = []
    for base, path, files in ((mount, own["v2"], _CGROUP_V2), (mount / "memory", own["v1"], _CGROUP_V1)):
        parts = [p for p in Path(path).parts if p not in ("/", "..")]
        for k in range(len(parts), -1, -1):  # the process's own cgroup, then each above it: any may hold the limit
            room = _cgroup_room(base.joinpath(*parts[:k]), files)
            if room is not None:
                left.append(room)
    return min(left) if left else None


def _cgroup_room(folder: Path, files: tuple[str, str, str]) -> int | None:
    """Bytes left under the memory limit of the cgroup ``folder``, None if it sets none (or is not there)."""
    limit_name, usage_name, cache_name = files
    try:
        limit = (folder / limit_name).read_text().strip()
        if limit == "max":
            return None
        usage = int((folder / usage_name).read_text())
        limit_bytes = int(limit)
    except (OSError, ValueError):
        return None
    cache = 0
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == cache_name:
                cache = int(value)
                break
    except (OSError, ValueError):
        pass
    return max(0, limit_bytes - max(0, usage - cache))


class _Largest(TorchDispatchMode):
    """The bytes of the largest tensor any op of a forward creates (on meta tensors: computed, not allocated)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


def _meta_forward(net: "StitchedNet", batch: int, size: Sequence[int]) -> int:
    """One forward of the active stitch on the meta device; the bytes of its largest intermediate tensor."""
    from torch.func import functional_call

    state = {k: v.to("meta") for k, v in [*net.named_parameters(), *net.named_buffers()]}
    p = next(net.parameters())
    x = torch.empty(batch, *size, device="meta", dtype=p.dtype)
    with torch.no_grad(), _Largest() as mode:
        functional_call(net, state, (x,), strict=False)
    return mode.largest


def _largest_activation(net: "StitchedNet", stitches: Sequence["Stitch"]) -> int:
    """Elements, per image, of the largest activation between two blocks on any of ``stitches``' routes at
    the network's own input size (from the specs the stitch space was built from: no forward)."""
    largest = 0
    for s in stitches:
        for seg in s.segments:
            specs = net.space.anchors[seg.anchor].specs
            for spec in specs[seg.start:len(specs) if seg.stop is None else seg.stop + 1]:
                largest = max(largest, spec.positions * spec.channels)
    return largest


def check_input(net: "StitchedNet", batch_sizes: Sequence[int], input_size: Sequence[int] | None = None,
                stitches: Sequence["int | str | Stitch"] | None = None, device: str | torch.device = "cpu",
                what: str = "--img-size") -> None:
    """Refuse, in one line and before any tensor is allocated, an input size some chosen stitch cannot take,
    or a batch whose input plus largest intermediate tensor cannot fit in ``device``'s free memory.

    An input size other than the network's own is tried on every chosen stitch on the meta device
    (shapes only: a few hundred milliseconds a route for a DeiT); at its own size the activations
    between blocks are known already. The memory figure is a lower bound of what a forward needs
    (other tensors are alive at the same time), so nothing that could run is refused. ``what``
    names the option that set the size, for the message.
    """
    own = tuple(int(v) for v in net.input_size)
    size = tuple(int(v) for v in input_size) if input_size is not None else own
    chosen = [net.space[k] for k in stitches] if stitches is not None else list(net.space)
    batch = max(batch_sizes)
    elem = next(net.parameters()).element_size()
    if size == own:
        largest: int | None = batch * elem * _largest_activation(net, chosen)
    else:
        largest = _try_size(net, chosen, batch, size, what)
    free = available_memory(device)
    if largest is None or free is None:
        return
    need = batch * elem * int(torch.Size(size).numel()) + largest
    if need > free:
        raise SnnetError(f"a batch of {batch} inputs of {'x'.join(map(str, size))} needs at least {need / MB:,.0f} MiB "
                         f"on {torch.device(device)} (the input and the largest activation of one forward), and "
                         f"{free / MB:,.0f} MiB are free: choose a smaller batch or input size")


def _try_size(net: "StitchedNet", chosen: Sequence["Stitch"], batch: int, size: tuple[int, ...], what: str) -> int | None:
    """Run every chosen stitch once on the meta device at ``size``: the bytes of the largest tensor any makes,
    None if some op has no meta kernel (the real run will tell), or an error naming the stitch that fails."""
    active, was_training = net.active, net.training
    net.eval()
    largest = 0
    try:
        for s in chosen:
            net.select(s.id)
            try:
                largest = max(largest, _meta_forward(net, batch, size))
            except NotImplementedError:
                return None
            except (RuntimeError, AssertionError, ValueError, IndexError, TypeError) as e:
                raise SnnetError(f"{what} gives {'x'.join(map(str, size))} inputs, which stitch {s.name!r} cannot take "
                                 f"({reason(e)}); this network's own input is {'x'.join(map(str, net.input_size))}") from e
    finally:
        net.select(active.id)
        net.train(was_training)
    return largest
