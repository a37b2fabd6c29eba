"""sharekv: an LLM inference engine for large batches of prompts that share context."""

from sharekv.config import EngineArgs
from sharekv.llm import LLM
from sharekv.outputs import CompletionOutput, RequestOutput
from sharekv.sampling_params import SamplingParams

__all__ = ["LLM", "CompletionOutput", "EngineArgs", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
