"""nbval runs each notebook in a new Jupyter kernel. A kernel that dies before it answers (seen
once in `make test`: "Kernel died before replying to kernel_info", at the first cell of a notebook
whose cells then all errored) is started again, up to twice, before its notebook fails: a kernel's
start is not what the notebooks test, and the notebook's cells still run in one kernel."""
import logging

import nbval.kernel

_start_new_kernel = nbval.kernel.start_new_kernel
_ATTEMPTS = 3


def _start_new_kernel_again_if_it_dies(*args, **kwargs):
    for attempt in range(1, _ATTEMPTS + 1):
        try:
            return _start_new_kernel(*args, **kwargs)
        except RuntimeError:
            if attempt == _ATTEMPTS:
                raise
            logging.getLogger(__name__).warning("kernel died at start (attempt %d); starting another", attempt)


nbval.kernel.start_new_kernel = _start_new_kernel_again_if_it_dies
