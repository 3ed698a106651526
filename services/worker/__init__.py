"""The engine worker: one process shell (``shell``) serving a prefill or a decode role."""
