"""The zero-copy metadata upload kernel against ``copy_`` (compiled on CUDA; under the interpreter on CPU)."""

import pytest
import torch

if not torch.cuda.is_available():
    from morphserve.kernels.triton_support import enable_interpreter

    enable_interpreter()

from morphserve.kernels.host_upload import upload  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("n", [1, 7, 1024, 5000])
def test_upload_equals_copy(n):
    src = torch.randint(-2**62, 2**62, (n,), dtype=torch.int64)
    if DEV == "cuda":
        src = src.pin_memory()
    dst = torch.full((n,), -1, dtype=torch.int64, device=DEV)
    upload(dst, src)
    want = torch.empty_like(dst).copy_(src)
    assert torch.equal(dst.cpu(), want.cpu())


def test_upload_rejects_bad_arguments():
    with pytest.raises(ValueError, match="same dtype and size"):
        upload(torch.zeros(4, dtype=torch.int64, device=DEV), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        upload(torch.zeros(4, dtype=torch.int64, device=DEV), torch.zeros(8, dtype=torch.int64)[::2])
    if DEV == "cuda":
        with pytest.raises(ValueError, match="must be pinned"):
            upload(torch.zeros(4, dtype=torch.int64, device=DEV), torch.zeros(4, dtype=torch.int64))
