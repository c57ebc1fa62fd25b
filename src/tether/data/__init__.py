"""Data: JSONL schemas and validation, tokenisation, rankings → pairs."""

from tether.data.io import DataError, read_jsonl, write_json, write_jsonl
from tether.data.schemas import (
    ChatFormatError,
    Demonstration,
    Ranking,
    load_demonstrations,
    load_rankings,
    parse_demonstration,
    parse_ranking,
    rankings_to_pairs,
)
from tether.data.tokenize import Encoder, pad_left, pad_right

__all__ = [
    "DataError",
    "ChatFormatError",
    "read_jsonl",
    "write_json",
    "write_jsonl",
    "Demonstration",
    "Ranking",
    "load_demonstrations",
    "load_rankings",
    "parse_demonstration",
    "parse_ranking",
    "rankings_to_pairs",
    "Encoder",
    "pad_left",
    "pad_right",
]
