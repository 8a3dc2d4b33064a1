"""``cifarlab serve``: a web page and a REST API around one run folder.

:func:`create_app` builds the FastAPI app; :mod:`.batching` groups concurrent requests into one
forward pass and keeps the SHA-256 prediction cache; :mod:`.model` loads the run folder.
"""

from cifarlab.serve.app import ServeSettings, create_app
from cifarlab.serve.model import ServedModel, load_served_model

__all__ = ["ServeSettings", "ServedModel", "create_app", "load_served_model"]
