"""Scheduling: one mechanism (`scheduler.py`) and policies as hooks (`policy.py`), chosen by name in
`registry.py`; a step crosses to the model runner as plain data (`output.py`)."""
