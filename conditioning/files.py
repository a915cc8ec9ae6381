# Kept only for train/, which still imports it; removed once train/ imports ldm_io directly.
from ldm_io import atomic_directory, atomic_path  # noqa: F401
