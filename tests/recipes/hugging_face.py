"""What the recipe tests ask of a transformers model: its logits, and the
state dict its ``save_pretrained`` writes (the checkpoint's own layout)."""

import os
import tempfile

import torch
from safetensors.torch import load_file


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def saved_state_dict(model):
    """The tensors of the safetensors file ``model.save_pretrained`` writes."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return load_file(os.path.join(directory, "model.safetensors"))
