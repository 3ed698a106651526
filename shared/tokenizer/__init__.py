"""The frontend's text layer: tokenizer and chat template, streaming detokenizer, stop strings.

- ``tokenizer.Tokenizer``: load (``"builtin"`` or a local model directory), encode, decode,
  ``apply_chat_template``, ``eos_token_ids``, ``word_token_ids``
- ``detokenizer.IncrementalDetokenizer``: token ids -> new complete text, per stream
- ``stop.StopStringMatcher``: cuts streamed text before the first stop string
"""

from shared.tokenizer.detokenizer import IncrementalDetokenizer
from shared.tokenizer.stop import StopStringMatcher
from shared.tokenizer.tokenizer import BUILTIN, Tokenizer

__all__ = ["BUILTIN", "IncrementalDetokenizer", "StopStringMatcher", "Tokenizer"]
