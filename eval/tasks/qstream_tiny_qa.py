"""Dataset loader of the qstream_tiny_qa task: resolves ``data_files`` next to this file, so
the task runs from any current directory (lm-eval would resolve a plain relative path against
the current directory)."""
from pathlib import Path

import datasets


def load(data_files: str = "qstream_tiny_qa.jsonl", **_metadata):
    path = Path(data_files)
    if not path.is_absolute():
        path = Path(__file__).resolve().parent / path
    return datasets.load_dataset("json", data_files={"test": str(path)})
