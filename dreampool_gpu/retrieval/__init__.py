"""Retrieval as stages: check the request -> candidates -> re-rank -> gather.

- :mod:`~dreampool_gpu.retrieval.request`: every input check of a query, once, at the boundary.
- :mod:`~dreampool_gpu.retrieval.topk`: the one exact stable top-k (ties to the older entry).
- :mod:`~dreampool_gpu.retrieval.stages`: candidate generation over a bank column (chroma
  or embeddings, through the search engine) and the re-rank stages (MMR, hybrid).
- :mod:`~dreampool_gpu.retrieval.modes`: the mode table (mode -> candidate column, filter,
  re-rank, options) that ``DreamPool.retrieve``, ``batch`` and the CLI read.
- :mod:`dreampool_gpu.merge`: combining candidate lists from several sources (shards).

This package imports nothing at import time, so the search engines can use
:mod:`~dreampool_gpu.retrieval.topk` without an import circle.
"""
