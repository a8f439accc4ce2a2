"""Structured event logging: one event name plus key=value fields per line (or JSON).

Use `event(log, "worker.model_loaded", tenant=..., ms=...)`; never prose. The success path of a
request logs nothing.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "mf_fields"


def event(logger: logging.Logger, event_name: str, /, level: int = logging.INFO, **fields: Any) -> None:
    if logger.isEnabledFor(level):
        logger.log(level, event_name, extra={_FIELDS: fields})


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS, {})
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        parts = [f"{stamp} {record.levelname.lower():5} {record.name} {record.getMessage()}"]
        parts += [f"{k}={_kv(v)}" for k, v in fields.items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def _kv(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if (" " in text or not text) else text


def configure(fmt: str = "text", level: str = "info") -> None:
    """Sets up the root logger once per process; fmt is 'text' (key=value) or 'json'."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
