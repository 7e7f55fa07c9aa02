"""Apparel image-similarity search: the shared code under the top-level scripts (data_preparation.py, the model
scripts, evaluation.py, app.py). One module per concern; nothing here imports a script."""
import logging

# transformers imports torchao (the int8 path) whenever it is installed, and torchao 0.18 under torch 2.14 then logs
# deprecation notes about its own enums at every start: not ours to act on.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
