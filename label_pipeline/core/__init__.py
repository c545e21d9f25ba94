"""The ground floor: the shard contract and process plumbing that every other package builds on.

Nothing here imports from the rest of ``label_pipeline``, from ``expert_zoo`` or from
``prismer_trainer`` (``tests/test_layering.py`` checks it), so the pipeline, the expert zoo and the
trainer can all import it.
"""
