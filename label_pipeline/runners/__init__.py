"""Runners execute planned shards: ``local`` in this process, ``ray`` on a Ray cluster."""
