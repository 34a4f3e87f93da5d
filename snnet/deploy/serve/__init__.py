"""Serving one SN-Net over HTTP, switching stitches to hold a latency target as load changes.

Two kinds of process, so that HTTP and the model never take turns on one interpreter's GIL:

* **server processes** (uvicorn; one, or ``--workers N``) read requests, decode and normalise
  their images straight into shared memory and answer when the batch has run —
  :mod:`.app` (the FastAPI routes, body limits), :mod:`.images` (decoding and normalising a
  request at once), :mod:`.batcher` (the input ring, jobs out, results back), :mod:`.auth` (the
  admin token), :mod:`.metrics` (Prometheus), :mod:`.service` (what a server process holds),
  :mod:`.inline` (the latency path: a lone small request run in the server process while the
  model process has nothing to do);
* **one model process** (:mod:`.engine`): the network, the stitch policy
  (:mod:`snnet.deploy.controller`) and the batching loop; it takes the waiting requests of every
  server process, runs each batch wholly on the stitch named for it, and sends the results back.

:mod:`.config` holds every setting and checks it before anything loads. The Ray Serve
deployment (several replicas, one stitch policy) is :mod:`snnet.deploy.ray`.
"""

from .app import BodyLimits, app_from_env, create_app
from .auth import ADMIN_TOKEN_ENV, check_admin, read_admin_token
from .batcher import BatchResult, Batcher
from .config import ENV_CONFIG, Listen, ServeConfig
from .engine import BatchInfo, EngineInfo, EngineProcess
from .images import Preprocess, decode_image, read_array
from .metrics import Metrics
from .rejected import Rejected
from .service import Service

__all__ = ["ADMIN_TOKEN_ENV", "ENV_CONFIG", "BatchInfo", "BatchResult", "Batcher", "BodyLimits", "EngineInfo", "EngineProcess", "Listen",
           "Metrics", "Preprocess", "Rejected", "ServeConfig", "Service", "app_from_env", "check_admin", "create_app", "decode_image",
           "read_admin_token", "read_array"]
