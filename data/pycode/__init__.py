# (package marker, so train.py can `from data.pycode.prepare import ...`)
