"""resunet.serve: the REST inference service behind ``resunet serve`` (docs/serve.md).

- :mod:`resunet.serve.config`: :class:`ServeConfig` (every setting and default);
- :mod:`resunet.serve.queue`: :class:`JobQueue`, the SQLite job queue (``enqueue``, ``claim``, ``finish``);
- :mod:`resunet.serve.jobs`: job kinds (``segment``; :func:`register_kind` for more) and
  :func:`run_segmentation`, which writes outputs with ``resunet predict``'s batch runner;
- :mod:`resunet.serve.service`: :class:`Service` (state folder, warm model, worker, retention, audit);
- :mod:`resunet.serve.tokens`: bearer tokens stored as SHA-256 hashes;
- :mod:`resunet.serve.metrics`: Prometheus metrics;
- :mod:`resunet.serve.app`: :func:`create_app`, the FastAPI routes.

Importing this package does not import FastAPI or torch; the submodules do.
"""
