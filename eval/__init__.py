"""Evaluation of DreamBooth adapters: ``python -m eval score`` (every checkpoint of a run on one subject)
and ``python -m eval benchmark`` (train and score subjects x methods, the Table-3-style report).

The metrics themselves live in ``nblora_diffusion.metrics`` so that the app can import them.
"""
