"""``cifarlab serve``: a web page and a REST API around one run folder.

:func:`create_app` builds the FastAPI app (:mod:`.app`); the model is a
:class:`cifarlab.infer.Predictor` loaded once (:mod:`.state`); :mod:`.batching` groups
concurrent requests into one forward pass and keeps the SHA-256 prediction cache;
:mod:`.predict` answers ``/v1/predict``, :mod:`.kserve` the KServe v2 protocol; :mod:`.uploads`,
:mod:`.limits` and :mod:`.errors` handle what comes in and what goes wrong.
"""

from cifarlab.serve.app import create_app
from cifarlab.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
