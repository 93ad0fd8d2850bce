"""One `get_config(arg)` file per stage; `common.py` holds what they share."""
