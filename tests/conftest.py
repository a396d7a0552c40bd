import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # The tests' tensors are small: a second thread saves little, and on a busy machine every
    # parallel op waits for it (each op took ~45 ms instead of ~0.1 ms here). Subprocesses the tests
    # start keep their own default.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
