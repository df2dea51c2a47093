"""File formats that checkpoint.py reads and writes beside its own (Meta's and Hugging Face's
layouts live in checkpoint.py). Only checkpoint.py imports these modules."""
