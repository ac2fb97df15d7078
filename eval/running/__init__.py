"""Running items: the batch runner and the records it writes (one durable JSON line per item)."""
import lazy_loader as _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, submod_attrs={
    "runner": ["Runner", "RunSummary", "run_items", "run_sync"],
    "mcqa": ["McqRunner"],
    "records": ["RECORDS_FILE", "Record", "RecordWriter", "RunLock", "load_records", "record_from_state",
                "write_records", "MCQA_MODE", "mcq_record_from_state"],
})
