"""The decode core: one decode loop that offline `generate` and the server both drive.

  params.py   DecodeParams: the decode parameters, their defaults and validation
  request.py  a request's state and the events its client reads
  policy.py   admission, the queue bound, groups of rows and the decode rules on the host (no torch)
  layout.py   where groups sit in the cache, padded graph buckets (pure functions)
  batch.py    the persistent per-row state as device tensors
  runner.py   owns the model's cache, the batch and the CUDA graphs; executes a plan
  graphs.py   the capture protocol (eager warm-up, capture, replay) and the WHILE node
  prefix_cache.py  the prefix cache's chained keys, LRU under a budget, pins (no torch)
  prefix_store.py  its tensors and its part of a prefill (restore a row, save segments)
  core.py     DecodeCore: submit from any thread, step on one
  llm.py      generate: submit every prompt, step until done
"""
from .core import DecodeCore
from .llm import GenerationResult, Generator
from .params import MODES, DecodeParams, ParamError
from .policy import QueueFull
from .request import Request

__all__ = ["DecodeCore", "DecodeParams", "GenerationResult", "Generator", "MODES", "ParamError", "QueueFull",
           "Request"]
