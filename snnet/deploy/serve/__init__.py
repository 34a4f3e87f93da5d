"""Serving one SN-Net over HTTP, switching stitches to hold a latency target as load changes.

The pieces, outermost first:

* :mod:`.app` — the FastAPI app (run by uvicorn): ``POST /predict``, ``GET /health``,
  ``GET /metrics`` (Prometheus text), ``GET``/``PUT /stitch``. Handlers only read and check the
  request, decode images and wait for their batch.
* :mod:`.batcher` — dynamic batching: requests queue in arrival order (a bounded queue: past
  ``max_queue`` images a request gets 503 at once); a batch closes when it holds ``max_batch``
  images or ``max_wait_ms`` after its first request arrived; the
  :class:`~snnet.deploy.controller.StitchController` names its stitch; batches run one after
  another, each wholly on the stitch chosen for it, so switching never drops or reorders a request.
* :mod:`.service` — the network, its ladder of Pareto-optimal stitches, the latency table
  (from ``results.json`` when ``snnet profile --batch-sizes`` wrote one, else measured here at
  start), the controller and the metrics (:mod:`.metrics`).
* :mod:`.images` — PNG or JPEG, decoded with Pillow after checking the declared size against
  ``max_pixels``, converted to the network's channels and resized and normalised exactly as
  ``snnet eval`` reads an image folder (or, with ``resize=False``, refused when of another size).
* :mod:`.config` — :class:`ServeConfig`, every setting of one server.
"""

from .app import app_from_env, create_app
from .batcher import BatchResult, Batcher
from .config import ENV_CONFIG, ServeConfig
from .images import Preprocess, decode_image
from .metrics import Metrics
from .rejected import Rejected
from .service import Service

__all__ = ["ENV_CONFIG", "BatchResult", "Batcher", "Metrics", "Preprocess", "Rejected", "ServeConfig", "Service", "app_from_env",
           "create_app", "decode_image"]
