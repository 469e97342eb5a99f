import os

import torch

# Triton kernels run on CPU tensors through the interpreter when there is no GPU; the flag
# must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """Path of a briefly trained mini supernet checkpoint (bundled Fashion-MNIST, built once)."""
    from mini_checkpoint import make_trained_checkpoint

    return make_trained_checkpoint(tmp_path_factory.mktemp("mini") / "trained.pt")
