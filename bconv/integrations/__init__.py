"""bconv in the training frameworks people already use.

Each integration is a module of its own that imports its framework, so ``import bconv`` imports
none of them:

- ``bconv.integrations.lightning``: :class:`~bconv.integrations.lightning.PTLCallback`, for
  Lightning's ``Trainer`` (``pip install "bconv[lightning]"``).
- Hugging Face Accelerate needs no module: :class:`bconv.LatentState` registers the cells' state with
  ``accelerator.register_for_checkpointing`` (docs/guides/lightning-accelerate.md).
"""
