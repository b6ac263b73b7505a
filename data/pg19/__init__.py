# (package marker, so train.py can `from data.pg19.prepare import ...`)
