import pytest
import torch

VOCAB = 128  # the vocabulary of every tiny model here


@pytest.fixture(scope="session")
def tokens():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
