"""`python -m engine.training [flags]` (and `torchrun -m engine.training`): the pretraining command line."""
import os
import sys

from engine.training import main

code = main()
# Leave without the interpreter's teardown: gloo worker threads that still hold finished collectives' tensors can
# abort the process there after the run has completed and saved (see examples/pretrain_llama.py).
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)
