"""Low-level ops: per-filter reductions (torch / C++ / CUDA / Triton), the linear-path combine,
and loading of the C++/CUDA extension in ``csrc/``."""
