"""Recipes: conversions between naming schemes, as plain data.

A recipe is a function of a model's shape (heads, width, which tensors to
fuse) that returns a :class:`~sdtree.transforms.Transform` pipeline built
from the key and tensor transforms of :mod:`sdtree.transforms`: its ``repr``
lists every step, it has an exact ``inverse()``, and, like its steps, it
applies to model and optimizer state dicts alike.

- :mod:`sdtree.recipes.llama`: Hugging Face Llama -> torchtitan
  (``hf_to_torchtitan``; back with its ``inverse()``).
- :mod:`sdtree.recipes.moe`: Mixtral-style experts stacked into torchtitan's
  grouped experts (``mixtral_to_torchtitan``, ``mixtral_experts_to_torchtitan``).
- :func:`tie_weights` / :func:`untie_weights`: one tensor stored under a
  second key, and dropped again (tied embeddings).
"""

from sdtree.recipes import llama, moe
from sdtree.recipes._tying import tie_weights, untie_weights

__all__ = ["llama", "moe", "tie_weights", "untie_weights"]
