"""Deployment: pick a stitch for the resources at hand, and ship it alone.

* :mod:`snnet.deploy.profiling` measures every stitch's latency and peak memory on this device
  (:mod:`snnet.deploy.memory` first refuses an input size or batch that cannot run or fit);
* :mod:`snnet.budget` (re-exported here) picks the most accurate stitch within a budget in
  FLOPs, params, latency or memory (``StitchedNet.select(budget=...)``);
* :mod:`snnet.deploy.export` writes one stitch as a standalone model (safetensors + config,
  ``torch.export``, ONNX, each checksummed) and loads it back verified;
* :mod:`snnet.deploy.controller` picks the stitch for each batch of a server under a latency SLO
  (plain, no HTTP), and :mod:`snnet.deploy.serve` (a package) is that server (FastAPI + uvicorn,
  the model in a process of its own; imported only by ``snnet serve``, since its packages are the
  optional ``serve`` extra); :mod:`snnet.deploy.ray` runs it as Ray Serve replicas (the ``ray`` extra);
* :mod:`snnet.deploy.loadgen` loads a running server as its users would (closed loop, open loop
  on bursty or ramping arrival traces) for the serving benchmarks.
"""

from ..budget import Budget, Selection, parse_budget, select_stitch
from ..results import read_rows
from .export import (FORMATS, STITCH_CONFIG, STITCH_WEIGHTS, StitchRoute, export_onnx, export_program, export_stitch, extract, load_onnx,
                     load_program, load_stitch, route_bytes, save_stitch, stitch_config)
from .profiling import ProfileResult, ProfileSettings, merge_profile, profile

__all__ = [
    "Budget", "FORMATS", "STITCH_CONFIG", "STITCH_WEIGHTS", "ProfileResult", "ProfileSettings", "Selection", "StitchRoute", "export_onnx", "export_program",
    "export_stitch", "extract", "load_onnx", "load_program", "load_stitch", "merge_profile", "parse_budget", "profile", "read_rows", "route_bytes",
    "save_stitch", "select_stitch", "stitch_config",
]
