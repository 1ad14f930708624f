"""Pretrain a LLaMA model with the engine.

    python examples/pretrain_llama.py                              # tiny model, built-in corpus, one process
    torchrun --nproc_per_node 8 examples/pretrain_llama.py ...     # several processes
    python examples/pretrain_llama.py --help                        # every flag
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a clone, uninstalled

from engine.training import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's teardown: with gloo, worker threads that still hold finished collectives'
    # tensors can abort the process during it (SIGABRT, "terminate called without an active exception") after
    # the run has completed and saved. Everything the run writes is closed and synced by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
