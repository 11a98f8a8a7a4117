"""Experiment binaries (resnet, transformer), their configs and the reproduction suites.

Importing this package (every binary here, and every `scripts` entry point through
`scripts/__init__.py`) first sets TensorFlow's console environment, since TensorFlow reads it
when it is first imported. TensorFlow is only the input pipeline (and, through clu, the
summary writer), so its C++ INFO lines are noise on the console: `TF_CPP_MIN_LOG_LEVEL=1`. On
CPUs where it turns on its oneDNN kernels (AVX-512, Intel and AMD alike) it says so before its
logging starts, which that level does not silence, and a refusal or a SIGTERM message must be
the only line on stderr: `TF_ENABLE_ONEDNN_OPTS=0` (the model runs in JAX; the input pipeline
has no use for them). Both are defaults: a value already in the environment wins. The
library (`ilbp`) sets nothing, so a notebook keeps its own TensorFlow settings.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
