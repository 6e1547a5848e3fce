"""The model side: a hand-written LLaMA (and Qwen2), HF-format checkpoints, the tokenizer, and generation."""
from models.checkpoint import DTYPES, load_model, save_model
from models.hf_format import CheckpointError
from models.llama import ModelArgs, Transformer
from models.tokenizer import Tokenizer

__all__ = ["DTYPES", "CheckpointError", "ModelArgs", "Tokenizer", "Transformer", "load_model", "save_model"]
