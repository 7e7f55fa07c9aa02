"""Apparel image-similarity search: the shared code under the top-level scripts (data_preparation.py, the model
scripts, evaluation.py, app.py). One module per concern; nothing here imports a script."""
