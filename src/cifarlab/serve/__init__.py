"""``cifarlab serve``: a web page and a REST API around one run folder.

:func:`cifarlab.serve.app.create_app` builds the FastAPI app; the model is a
:class:`cifarlab.infer.Predictor` loaded once (:mod:`.reload`, which also swaps runs in every
worker); :mod:`.batching` groups concurrent requests into one forward pass and keeps the SHA-256
prediction cache; :mod:`.predict` answers ``/v1/predict``, :mod:`.kserve` the KServe v2 protocol
(its tensors: :mod:`.tensors`); :mod:`.uploads`, :mod:`.budget`, :mod:`.limits`,
:mod:`.protocol` and :mod:`.errors` handle what comes in and what goes wrong.

This package module imports nothing: the process that parses large v2 JSON bodies imports
:mod:`.tensors` alone, without torch.
"""
