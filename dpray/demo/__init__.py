"""Offline demo assets for ``dpray demo`` (synthetic private chat logs, no download)."""

from dpray.demo.corpus import generate_demo_records, write_demo_jsonl

__all__ = ["generate_demo_records", "write_demo_jsonl"]
