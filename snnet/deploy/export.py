"""One stitch as a standalone model: extract its route, save it, export it.

:func:`extract` turns one stitch into a plain :class:`StitchRoute` module holding only the
weights its route uses; :func:`save_stitch`/:func:`load_stitch` (safetensors + config, rebuilt
without the stitched network), :func:`export_program` (``torch.export``) and :func:`export_onnx`
(verified with onnxruntime) write it. Every file is written to a temporary name, verified, then
renamed into place; nothing half-written is left behind.

An exported folder's ``config.json`` records the SHA-256 of every file exported with it;
:func:`load_stitch`, :func:`load_program` and :func:`load_onnx` refuse a file whose bytes differ
and warn when no checksum can be found for it.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
from torch import nn

from .. import adapters  # noqa: F401  (registers snnet's adapters: the command line imports the package without them)
from ..anchors import ActivationSpec, AnchorSpec, Route, create_anchor, cut_parts, split_model, without_final_norm
from ..errors import CheckpointError, ExportError, SnnetError, reason, user_stacklevel
from ..io import (atomic_write, in_saved_dtype, record_checksum, recorded_previous, replacing, safetensors_kind,
                  verify_checksum, warn_unverified)
from ..results import check_writable
from ..space import Stitch
from ..stitching import StitchingLayer

if TYPE_CHECKING:
    from ..model import StitchedNet

__all__ = ["FORMATS", "STITCH_CONFIG", "STITCH_WEIGHTS", "StitchRoute", "export_onnx", "export_program", "export_stitch", "extract",
           "load_onnx", "load_program", "load_stitch", "route_bytes", "save_stitch", "stitch_config"]

class _Hop(nn.Module):
    """A middle segment of a longer route: its blocks, then the stitching layer out of it."""

    def __init__(self, blocks: Sequence[nn.Module], stitch: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.stitch = stitch


class StitchRoute(nn.Module):
    """One stitch as a plain module: source stem and blocks, stitching layer, target blocks, head.

    An anchor is a route with an identity stitch and no target blocks. A route of more than two
    segments (SN-Netv2's round trips, three-anchor routes) keeps each middle segment and the
    layer after it in ``via`` (so a two-segment route has exactly the tensors it always had).
    ``forward`` runs the same modules in the same order as :meth:`StitchedNet.forward` does.
    """

    def __init__(self, src_stem: nn.Module, src_blocks: Sequence[nn.Module], stitch: nn.Module | None,
                 dst_blocks: Sequence[nn.Module], head: nn.Module,
                 via: Sequence[tuple[Sequence[nn.Module], nn.Module]] = ()) -> None:
        super().__init__()
        self.src_stem = src_stem
        self.src_blocks = nn.ModuleList(src_blocks)
        self.stitch = stitch if stitch is not None else nn.Identity()
        self.via = nn.ModuleList([_Hop(blocks, layer) for blocks, layer in via])
        self.dst_blocks = nn.ModuleList(dst_blocks)
        self.head = head

    @classmethod
    def of(cls, route: Route) -> "StitchRoute":
        """From a :class:`snnet.anchors.Route` (segments' blocks and the layers between them)."""
        blocks, layers = route.blocks, route.layers
        if len(blocks) == 1:
            return cls(route.stem, blocks[0], None, [], route.head)
        via = [(blocks[k], layers[k]) for k in range(1, len(blocks) - 1)]
        return cls(route.stem, blocks[0], layers[0], blocks[-1], route.head, via)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.src_stem(x)
        for blk in self.src_blocks:
            h = blk(h)
        h = self.stitch(h)
        for hop in self.via:
            for blk in hop.blocks:
                h = blk(h)
            h = hop.stitch(h)
        for blk in self.dst_blocks:
            h = blk(h)
        return self.head(h)


def _route_view(net: "StitchedNet", stitch: Stitch) -> StitchRoute:
    """A route sharing the network's modules (no copy): for counting bytes and for :func:`extract`."""
    return StitchRoute.of(net.route(stitch))


def route_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def extract(net: "StitchedNet", stitch: int | str | Stitch) -> StitchRoute:
    """A standalone copy of one stitch: deep copies of only the modules on its route, in eval mode."""
    s = net.space[stitch]
    route = copy.deepcopy(_route_view(net, s))  # one deepcopy keeps weights shared within the route shared
    if not s.is_anchor:  # low-rank stitching layers ship merged: one plain layer, the map the network computes
        route.stitch = route.stitch.merged()
        for hop in route.via:
            hop.stitch = hop.stitch.merged()
    route.snnet_stitch = s.name  # type: ignore[assignment]  # plain attribute: where it came from
    return route.eval()


# ====================================================================================== files

STITCH_CONFIG = "config.json"
STITCH_WEIGHTS = "model.safetensors"
STITCH_FORMAT = "snnet-stitch"
# 1: one source, one stitching layer, one target (src/src_end/dst/dst_start/stitching_layer);
# 2: any route: "anchors" and "segments" (+ "stitching_layers", one between two segments);
# 3: "head": "without_final_norm", a stitched route of a network in the reference route mode (DeiT);
# 4: "cut": "sublayer", segments that count a ViT's sublayers (snnet.anchors.cut_parts)
STITCH_VERSION = 4
HEAD_WITHOUT_NORM = "without_final_norm"
FORMATS = ("safetensors", "pt2", "onnx")
FORMAT_FILES = {"safetensors": STITCH_WEIGHTS, "pt2": "model.pt2", "onnx": "model.onnx"}
_REEXPORT = "export the stitch again"


def _missing_dirs(out: str | os.PathLike) -> list[Path]:
    """``out`` and those of its parents that do not exist yet, deepest first: what a failed export removes again."""
    return [p for p in [Path(out), *Path(out).parents] if not p.exists()]


def _remove_empty(dirs: Sequence[Path]) -> None:
    """Remove the folders ``dirs`` (deepest first) that are empty; the others stay."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            return


def _check_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove a file can be written there, before any work."""
    return check_writable(out, error=ExportError)


def stitch_config(net: "StitchedNet", stitch: int | str | Stitch) -> dict[str, Any]:
    """Everything :func:`load_stitch` needs to rebuild a stitch without the stitched network."""
    s = net.space[stitch]

    def anchor(k: int) -> dict[str, Any]:
        spec = net.specs[k]
        if spec is not None:  # rebuilt from its timm name at random init; the weights come from the file
            spec = AnchorSpec(spec.name, False, None, spec.kwargs).to_dict()
        return {"label": net.labels[k], "kind": net.anchors[k].kind, "spec": spec}

    used = list(dict.fromkeys(s.anchors))  # each anchor once, in the order the route first enters it
    layers = [{"src_spec": asdict(net.space.layers[k].src_spec), "dst_spec": asdict(net.space.layers[k].dst_spec)}
              for k in s.layers]  # plain layers: a low-rank layer is exported merged
    # the reference route mode ends some stitched routes without the last anchor's final norm
    bare = net.head_of(s) is not net.anchors[s.anchors[-1]].head
    cut = net.space.config.cut
    return {
        "format": STITCH_FORMAT, "version": STITCH_VERSION if cut != "block" else 3 if bare else 2, "id": s.id, "name": s.name,
        **({"head": HEAD_WITHOUT_NORM} if bare else {}),
        **({"cut": cut} if cut != "block" else {}),
        "anchors": [anchor(k) for k in used],
        "segments": [{"anchor": used.index(seg.anchor), "start": seg.start, "stop": seg.stop} for seg in s.segments],
        "stitching_layers": layers,
        "input_size": list(net.input_size), "num_classes": net.num_classes,
        "data_config": {k: v for k, v in net.anchors[s.src].data_config.items() if k != "num_classes"},
    }


def _v2_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 stitch config (source, one layer, target) in version 2's terms."""
    if cfg["dst"] is None:
        return dict(cfg, anchors=[cfg["src"]], segments=[{"anchor": 0, "start": 0, "stop": None}], stitching_layers=[])
    return dict(cfg, anchors=[cfg["src"], cfg["dst"]], stitching_layers=[cfg["stitching_layer"]],
                segments=[{"anchor": 0, "start": 0, "stop": cfg["src_end"]}, {"anchor": 1, "start": cfg["dst_start"], "stop": None}])


def save_stitch(route: StitchRoute, directory: str | os.PathLike, config: Mapping[str, Any]) -> Path:
    """Write ``model.safetensors`` (the route's weights only) and ``config.json``, each atomically.

    ``config`` is :func:`stitch_config` of the stitch the route was extracted from; the saved
    config also records the weights file's SHA-256, which :func:`load_stitch` checks.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    check_export_folder(directory, ("safetensors",))  # a saved network's files, or an export's it would mix with
    out = _check_dir(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in route.state_dict().items()}
    # safetensors refuses tensors sharing memory; clone the rare shared ones
    seen: set[int] = set()
    for k, v in state.items():
        if v.untyped_storage().data_ptr() in seen:
            state[k] = v.clone()
        seen.add(state[k].untyped_storage().data_ptr())

    def verify(p: Path) -> None:
        with safe_open(str(p), "pt") as f:
            if set(f.keys()) != set(state):
                raise ExportError(f"{p} does not hold the route's tensors after writing: disk full or filesystem error?")

    saved = dict(config)

    def write(p: Path) -> None:
        save_file(state, str(p), metadata={"format": "pt", "snnet": STITCH_FORMAT})
        verify(p)
        record_checksum(saved, STITCH_WEIGHTS, p)

    with replacing([out / STITCH_WEIGHTS], out / STITCH_CONFIG):  # the stitch saved before stays loadable
        atomic_write(out / STITCH_WEIGHTS, write)
        atomic_write(out / STITCH_CONFIG, lambda p: p.write_text(json.dumps(saved, indent=2) + "\n"))
    return out


def _spec(d: Mapping[str, Any]) -> ActivationSpec:
    return ActivationSpec(d["layout"], int(d["channels"]), tuple(d["spatial"]))


def load_stitch(directory: str | os.PathLike, anchors: Sequence[nn.Module] | None = None,
                map_location: str | torch.device = "cpu") -> StitchRoute:
    """Rebuild a stitch saved by :func:`save_stitch`, without its stitched network.

    The route's anchors are built from their timm names at random init, cut to the route, and
    the saved weights loaded (strictly). Anchors that were your own modules must be passed
    again as ``anchors`` (each anchor the route uses once, in the order it first enters them:
    source, then target for a two-segment stitch), freshly constructed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..devices import default_device

    # a device this machine lacks (or a typo) is said as such, before any work: not as a corrupt file or torch's traceback
    map_location = default_device(map_location)
    directory = Path(directory)
    cfg_path, w_path = directory / STITCH_CONFIG, directory / STITCH_WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{directory} is not an exported stitch: it needs {STITCH_CONFIG} and {STITCH_WEIGHTS} "
                              "(written by `snnet export --format safetensors`)")
    try:  # every field read before anything is built: a damaged config.json fails here, in one line
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict) or cfg.get("format") != STITCH_FORMAT:
            raise KeyError("format")
        newer = cfg.get("version", 0) > STITCH_VERSION
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt or not an exported snnet stitch ({type(e).__name__}: {e})") from e
    if newer:  # before its fields are read: a newer format may name them otherwise
        raise CheckpointError(f"{cfg_path} was written by a newer snnet (format {cfg['version']}); upgrade snnet")
    try:
        if cfg.get("version", 0) <= 1:
            cfg = _v2_config(cfg)
        ends, segments = cfg["anchors"], cfg["segments"]
        if not segments or len(cfg["stitching_layers"]) != len(segments) - 1:
            raise KeyError("stitching_layers")
        labels = [str(end["label"]) for end in ends]
        specs = [AnchorSpec.from_dict(end["spec"]) if end["spec"] is not None else None for end in ends]
        cuts = [(int(seg["anchor"]), *(None if seg[k] is None else int(seg[k]) for k in ("start", "stop"))) for seg in segments]
        if any(not 0 <= a < len(ends) for a, _, _ in cuts):
            raise IndexError(f"a segment names an anchor beyond the {len(ends)} listed")
        layer_specs = [(_spec(d["src_spec"]), _spec(d["dst_spec"])) for d in cfg["stitching_layers"]]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{cfg_path} is corrupt or not an exported snnet stitch ({type(e).__name__}: {e}); "
                              f"{_REEXPORT}") from e
    if anchors is not None and len(anchors) != len(ends):
        raise CheckpointError(f"this stitch uses {len(ends)} anchors, {len(anchors)} were given")
    w_path = _checked(w_path, cfg, cfg_path)
    parts = []
    for k, (label, spec) in enumerate(zip(labels, specs)):
        if anchors is not None:
            module = anchors[k]
        elif spec is None:
            raise CheckpointError(f"anchor {label!r} was your own module: pass it again with load_stitch(dir, anchors=[...])")
        else:
            module = create_anchor(spec)
        parts.append(cut_parts(split_model(module), cfg.get("cut", "block"), label))
    blocks = [list(parts[a].blocks[start:stop]) for a, start, stop in cuts]
    layers = [StitchingLayer(src, dst) for src, dst in layer_specs]
    first, last = parts[cuts[0][0]], parts[cuts[-1][0]]
    head = without_final_norm(last.head) if cfg.get("head") == HEAD_WITHOUT_NORM else last.head
    if head is None:
        raise CheckpointError(f"{cfg_path} ends its route without a final norm, which anchor "
                              f"{labels[cuts[-1][0]]!r} does not have; export the stitch again")
    route = StitchRoute.of(Route(first.stem, tuple(tuple(b) for b in blocks), tuple(layers), head))
    try:
        state = load_file(str(w_path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{w_path} is corrupt or unreadable ({e}); {_REEXPORT}") from e
    own = route.state_dict()
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if bad:
        raise CheckpointError(f"{w_path} does not match the route its config describes (first mismatches: "
                              f"{', '.join(bad[:3])}); {_REEXPORT}")
    route.load_state_dict(state)
    route.snnet_stitch = cfg["name"]  # type: ignore[assignment]
    return in_saved_dtype(route, state).to(map_location).eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _batch_dim() -> dict[str, dict[int, Any]]:
    # the batch size stays free in the exported graph (AUTO keeps it static if the model pins it)
    return {"x": {0: torch.export.Dim.AUTO}}


def trace(route: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of a route with a free batch size: the one trace both the ``.pt2`` and the
    ONNX file are made from (tracing is most of an export's time).

    An example of one item is traced as two (the same item twice): torch.export specialises a
    dimension of size 1 to the constant 1, which would leave a program that refuses other batches."""
    if example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:]).contiguous()
    try:
        return torch.export.export(route.eval(), (example,), dynamic_shapes=_batch_dim())
    except Exception as e:  # torch raises many kinds here; say which model part failed
        raise ExportError(f"torch.export could not trace this stitch: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def export_program(route: nn.Module, example: torch.Tensor, path: str | os.PathLike, atol: float = 1e-5,
                   program: torch.export.ExportedProgram | None = None) -> Path:
    """Export with ``torch.export`` (or take ``program``, :func:`trace` of ``route``) and save a ``.pt2``
    program; verified by reloading and comparing outputs."""
    path = Path(path)
    _check_dir(path.parent)
    route = route.eval()
    with torch.inference_mode():
        want = route(example)
    program = program if program is not None else trace(route, example)

    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with torch.inference_mode():
        got = torch.export.load(io.BytesIO(buffer.getvalue())).module()(example)
    diff = _max_diff(got, want)
    if not diff <= atol:
        raise ExportError(f"the torch.export program's outputs differ from the stitch's by {diff:.3g} (> {atol}); not saved")
    atomic_write(path, lambda p: p.write_bytes(buffer.getvalue()))
    return path


def export_onnx(route: nn.Module, example: torch.Tensor, path: str | os.PathLike, atol: float = 1e-5,
                program: torch.export.ExportedProgram | None = None) -> Path:
    """Export to ONNX (torch's dynamo exporter, from ``program``, :func:`trace` of ``route``, when
    given) and verify with onnxruntime on CPU.

    The file is written to a temporary name, run with onnxruntime on ``example``, and renamed
    into place only if its outputs are within ``atol`` of PyTorch's; otherwise it is deleted
    and :class:`~snnet.errors.ExportError` raised.
    """
    path = Path(path)
    _check_dir(path.parent)
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("ONNX export needs onnx, onnxscript and onnxruntime: pip install 'snnet[export]'") from e
    route = route.eval()
    with torch.inference_mode():
        want = route(example).cpu()

    def write_and_verify(p: Path) -> None:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                onnx_program = torch.onnx.export(program if program is not None else trace(route, example), (example,),
                                                 dynamo=True, input_names=["x"], output_names=["logits"], verbose=False)
        except ExportError:
            raise
        except Exception as e:
            raise ExportError(f"ONNX export of this stitch failed: {type(e).__name__}: {str(e).splitlines()[0]}") from e
        onnx_program.save(str(p), external_data=False)  # one self-contained file
        try:
            sess = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: example.detach().cpu().numpy()})[0])
        except Exception as e:
            raise ExportError(f"onnxruntime cannot run the exported ONNX file ({type(e).__name__}: {e}); not saved") from e
        diff = _max_diff(got, want)
        if not diff <= atol:
            raise ExportError(f"onnxruntime's outputs differ from the stitch's by {diff:.3g} (> {atol}); ONNX file not saved")

    atomic_write(path, write_and_verify)  # a file that fails verification is deleted, never renamed into place
    return path


def export_stitch(net: "StitchedNet", stitch: int | str | Stitch, out: str | os.PathLike,
                  formats: Sequence[str] = FORMATS, batch_size: int = 2, atol: float = 1e-5) -> dict[str, Path]:
    """Extract one stitch and write it in each of ``formats`` into ``out``, all or nothing.

    Formats: ``safetensors`` (``model.safetensors`` + ``config.json``, :func:`load_stitch`),
    ``pt2`` (``model.pt2``, :func:`load_program`), ``onnx`` (``model.onnx``, :func:`load_onnx`).
    ``config.json`` (the stitch's description) is written with any format and records the SHA-256
    of every file, which the loaders check. Every file is staged in a temporary folder inside
    ``out`` and verified; the files move into ``out`` only when every format succeeded, so a
    failure leaves ``out`` as it was. Over an earlier export, its files' bytes stay until the new
    ``config.json`` is in: stopped between the files, the earlier export still loads; failing between them
    with an error, it is put back as it was. The example input is a random batch at the network's input size.
    """
    from .memory import check_input

    formats = _check_formats(formats)
    if batch_size < 1:  # a batch of 0 traced a program that refuses every real batch, "verified" on no input at all
        raise ExportError(f"batch_size must be at least 1 (the example batch traced and verified), got {batch_size}")
    s = net.space[stitch]  # unknown stitch: fails before any work
    if "onnx" in formats and next(net.parameters()).dtype == torch.bfloat16:  # not after tracing, as onnxruntime's InvalidGraph
        raise ExportError("a bfloat16 network cannot be exported to ONNX: onnxruntime, which verifies the file, has no "
                          "bfloat16 convolutions on CPU; export --format safetensors,pt2, or convert the network to float16 first")
    check_export_folder(out, formats)
    check_input(net, [batch_size], stitches=[s], what="the network")  # a batch_size that cannot fit in memory
    made = _missing_dirs(out)  # a failure leaves no empty --out behind
    out = _check_dir(out)
    try:
        return _export_staged(net, s, out, formats, batch_size, atol)
    except BaseException:
        _remove_empty(made)
        raise


def _export_staged(net: "StitchedNet", s: Stitch, out: Path, formats: Sequence[str], batch_size: int,
                   atol: float) -> dict[str, Path]:
    route = extract(net, s).cpu()
    # a half-precision network is traced and checked in its own dtype, to within that dtype's rounding
    dtype = next((p.dtype for p in route.parameters() if p.is_floating_point()), torch.float32)
    example = torch.randn(batch_size, *net.input_size, generator=torch.Generator().manual_seed(0)).to(dtype)
    atol = max(atol, 4 * torch.finfo(dtype).eps)  # float32: atol as given (4 eps = 5e-7)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".snnet-export-"))
    try:
        config = stitch_config(net, s)
        if "safetensors" in formats:
            save_stitch(route, stage, config)
            config = json.loads((stage / STITCH_CONFIG).read_text())  # with the weights' checksum
        program = trace(route, example) if {"pt2", "onnx"} & set(formats) else None
        if "pt2" in formats:
            path = export_program(route, example, stage / FORMAT_FILES["pt2"], atol, program)
            record_checksum(config, path.name, path)
        if "onnx" in formats:
            path = export_onnx(route, example, stage / FORMAT_FILES["onnx"], atol, program)
            record_checksum(config, path.name, path)
        atomic_write(stage / STITCH_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
        names = [FORMAT_FILES[f] for f in formats]
        # over an export, each file's old bytes stay (hard links) until the new config.json is in: an export stopped
        # between its files leaves the old config.json beside them, and the old export loadable (_checked); one that
        # fails there puts them back
        paths = {}
        try:
            with replacing([out / name for name in names], out / STITCH_CONFIG):
                for name in names + [STITCH_CONFIG]:  # the record of the files last
                    os.replace(stage / name, out / name)
                    paths[name] = out / name
        except SnnetError:  # the earlier export could not be put back: the message says where it is
            raise
        except Exception as e:
            raise ExportError(f"moving the export into {out} failed ({reason(e)}); {out} is left as it was before "
                              "this export: fix that and export again") from e
        return paths
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def check_export_folder(out: str | os.PathLike, formats: Sequence[str]) -> None:
    """Refuse, before any work, an ``out`` whose files an export would wrongly mix or overwrite: a saved
    stitched network's config.json, or files of formats not exported now (they would sit beside a
    config.json describing, and checksumming, another export)."""
    out = Path(out)
    cfg = out / STITCH_CONFIG
    if cfg.is_dir() or any((out / name).is_dir() for name in FORMAT_FILES.values()):
        raise ExportError(f"--out {out} holds a folder named like an export file ({STITCH_CONFIG}, "
                          f"{', '.join(FORMAT_FILES.values())}); choose another --out")
    if cfg.is_file():
        try:
            kind = json.loads(cfg.read_text()).get("format")
        except (ValueError, AttributeError, OSError):
            kind = None
        if kind != STITCH_FORMAT:
            raise ExportError(f"--out {out} holds a {STITCH_CONFIG} that is not an exported stitch's (a saved network?); "
                              "exporting there would overwrite it: choose another --out")
    elif (out / STITCH_WEIGHTS).is_file() and safetensors_kind(out / STITCH_WEIGHTS) != STITCH_FORMAT:
        # weights without their config.json (a network's save cut before it, or copied by hand): they would be replaced
        raise ExportError(f"--out {out} holds a {STITCH_WEIGHTS} that is not an exported stitch's (a saved network's "
                          f"weights without its {STITCH_CONFIG}?); exporting there would overwrite it: choose another --out")
    else:  # no config.json: a program or ONNX file here is no export's record (one of the user's own, or an export cut short)
        strays = [FORMAT_FILES[f] for f in ("pt2", "onnx") if (out / FORMAT_FILES[f]).exists()]
        if strays:
            raise ExportError(f"--out {out} holds {', '.join(strays)} without an export's {STITCH_CONFIG} (a file of your own, "
                              "or an export stopped before its end); exporting there would overwrite it: delete it if it "
                              "is a leftover, or choose another --out")
    stale = [name for f, name in FORMAT_FILES.items() if f not in formats and (out / name).exists()]
    if stale:
        raise ExportError(f"--out {out} holds {', '.join(stale)} of an earlier export, which this one (--format "
                          f"{','.join(formats)}) would leave beside its new {STITCH_CONFIG}: export every format "
                          "again or choose another --out")


def _verified(path: str | os.PathLike, kind: str) -> Path:
    """``path``, an exported file, after checking it against the SHA-256 in the ``config.json`` beside it
    (a warning if there is none to check: never a silent pass)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is not a file: give the {kind} file `snnet export` wrote")
    record = path.parent / STITCH_CONFIG
    if not record.is_file():
        warn_unverified(path, f"there is no {STITCH_CONFIG} beside it to hold its SHA-256", _REEXPORT)
        return path
    try:
        cfg = json.loads(record.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise CheckpointError(f"{record} is corrupt ({e}), so {path} cannot be verified; {_REEXPORT}") from e
    return _checked(path, cfg, record)


def _checked(path: Path, cfg: Mapping[str, Any], record: Path) -> Path:
    """``path`` after checking it against the SHA-256 ``cfg`` (read from ``record``) holds, or, when an export over
    another stopped between its files, the bytes of the export before it that ``record`` still describes."""
    try:
        verify_checksum(path, cfg, record, _REEXPORT, error=CheckpointError)
    except CheckpointError:
        previous = recorded_previous(path, cfg)
        if previous is None:
            raise
        import warnings

        warnings.warn(f"{path.parent}: an export was interrupted before its {STITCH_CONFIG}; loading the stitch exported "
                      f"before it ({previous.name}). Export the stitch again to finish the interrupted export",
                      stacklevel=user_stacklevel())
        return previous
    return path


def load_program(path: str | os.PathLike) -> "torch.export.ExportedProgram":
    """An exported ``model.pt2`` (``torch.export``), after verifying its checksum: ``load_program(p).module()(x)``."""
    path = _verified(path, FORMAT_FILES["pt2"])
    try:
        # torch.export.load takes a file by name only if it ends in .pt2: the one kept by a stopped export is read as bytes
        return torch.export.load(str(path) if path.suffix == ".pt2" else io.BytesIO(path.read_bytes()))
    except Exception as e:  # torch raises many kinds for a file that is not a program
        raise CheckpointError(f"{path} is not a readable torch.export program ({type(e).__name__}); {_REEXPORT}") from e


def load_onnx(path: str | os.PathLike, providers: Sequence[str] | str = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime ``InferenceSession`` of an exported ``model.onnx``, after verifying its checksum.
    ``providers``: onnxruntime's execution providers, first choice first (one may be given as a string)."""
    path = _verified(path, FORMAT_FILES["onnx"])
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("running ONNX needs onnxruntime: pip install 'snnet[export]'") from e
    chosen = [providers] if isinstance(providers, str) else list(providers)  # a string is one provider, not its letters
    available = ort.get_available_providers()
    missing = [p for p in chosen if p not in available]
    if missing or not chosen:
        raise ExportError(f"this onnxruntime has no execution provider {', '.join(map(repr, missing)) or '(none given)'}; "
                          f"it has {', '.join(available)} (a GPU's needs onnxruntime-gpu)")
    try:
        return ort.InferenceSession(str(path), providers=chosen)
    except Exception as e:  # onnxruntime raises its own types for a file it cannot parse
        raise CheckpointError(f"{path} is not a readable ONNX model ({type(e).__name__}); {_REEXPORT}") from e


def _check_formats(formats: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(formats, str):
        formats = formats.split(",")
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in formats if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise ExportError(f"unknown export format {', '.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return chosen
